"""``depin dataset info|optimize|vacuum|migrate``: maintenance of the telemetry dataset (a Delta table).

DATASET is a directory or ``s3://bucket/prefix`` (object-store settings from ``DEPIN_DATASET_S3_*`` or the
standard ``AWS_*`` variables); the default is where ``depin ingest`` writes. The work is done by
:mod:`connectors.dimo.maintenance`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from depin_core import paths
from pipelines.cli._output import JsonOpt, emit_json, say

if TYPE_CHECKING:
    from connectors.dimo.store import TelemetryStore

DatasetArg = Annotated[
    str, typer.Argument(metavar="DATASET", help="a directory or s3://bucket/prefix", show_default=True)
]
_DEFAULT = str(paths.DATASET_DIR)


def _store(dataset: str) -> TelemetryStore:
    from connectors.dimo.store import TelemetryStore

    return TelemetryStore(dataset)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.3g} TiB"  # pragma: no cover


def info(dataset: DatasetArg = _DEFAULT, as_json: JsonOpt = False) -> None:
    """Show the dataset: version, rows, vehicles, time range, files, bytes, watermarks, recent commits."""
    from connectors.dimo import maintenance

    doc = maintenance.info(_store(dataset))
    span = (
        f"{doc.first:%Y-%m-%d %H:%M} … {doc.last:%Y-%m-%d %H:%M} UTC" if doc.first and doc.last else "no rows"
    )
    say(("dataset", "bold"), f" {doc.uri}: version {doc.version} ({doc.versions} in the log)")
    say(f"  {doc.rows:,} rows, {doc.vehicles} vehicles, {span}, interval {doc.interval or 'unknown'}")
    say(
        f"  {doc.files} files in {doc.partitions} days, {_size(doc.bytes)}; columns: {', '.join(doc.columns)}"
    )
    if doc.watermarks:
        say(
            f"  watermarks: {doc.watermarks} vehicles, {doc.watermark_min:%Y-%m-%d %H:%M} … "
            f"{doc.watermark_max:%Y-%m-%d %H:%M} UTC"
        )
    else:
        say("  watermarks: none")
    for op in doc.operations[:5]:
        when = f"{op.timestamp:%Y-%m-%d %H:%M:%S}" if op.timestamp else "?"
        say(f"  v{op.version} {when} {op.operation}")
    if as_json:
        emit_json(doc.model_dump(mode="json"))


def optimize(
    dataset: DatasetArg = _DEFAULT,
    zorder: Annotated[
        bool,
        typer.Option("--zorder/--no-zorder", help="cluster rows by (token_id, timestamp) while compacting"),
    ] = True,
    target_mb: Annotated[
        float | None, typer.Option(help="wanted file size in MiB (default: delta-rs', ~100 MiB)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Compact the days that hold several small files into large ones, then checkpoint the log.

    Old files stay (older versions read them) until `depin dataset vacuum`."""
    from connectors.dimo import maintenance
    from depin_core.errors import ConfigError

    if target_mb is not None and target_mb <= 0:
        raise ConfigError(f"--target-mb: {target_mb} must be a positive size in MiB, e.g. 128")
    target = int(target_mb * 2**20) if target_mb is not None else None
    doc = maintenance.optimize(_store(dataset), zorder=zorder, target_size=target)
    if doc["partitions"]:
        say(
            ("optimized", "bold green"),
            f" {doc['dataset']}: {doc['files_removed']} files → {doc['files_added']} in {doc['partitions']} days; "
            f"{doc['files_before']} → {doc['files_after']} files, version {doc['version_before']} → "
            f"{doc['version_after']}",
        )
    else:
        say(
            f"{doc['dataset']}: nothing to compact ({doc['files_after']} files, one per day); log checkpointed"
        )
    if as_json:
        emit_json(doc)


def vacuum(
    dataset: DatasetArg = _DEFAULT,
    retention_hours: Annotated[
        int,
        typer.Option(
            help="keep files that versions of the last N hours still need (below 168 needs --force)"
        ),
    ] = 168,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the files, delete nothing")] = False,
    lite: Annotated[
        bool,
        typer.Option(
            "--lite", help="only files removed by commits (skip the scan for crashed writes' files)"
        ),
    ] = False,
    keep_version: Annotated[
        list[int] | None, typer.Option(metavar="N", help="a version to keep readable (repeat for several)")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="allow a retention below 7 days (only when no writer is running)")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete data files no recent version needs, and files of writes that crashed before their commit."""
    from connectors.dimo import maintenance

    store = _store(dataset)
    files = maintenance.vacuum(
        store,
        retention_hours=retention_hours,
        dry_run=dry_run,
        full=not lite,
        keep_versions=keep_version or (),
        force=force,
    )
    verb = "would delete" if dry_run else "deleted"
    say(("vacuum", "bold"), f" {store.root}: {verb} {len(files)} file(s)")
    for f in files:
        say(f"  {f}")
    if as_json:
        emit_json(
            {
                "dataset": store.root,
                "dry_run": dry_run,
                "full": not lite,
                "retention_hours": retention_hours,
                "keep_versions": sorted(set(keep_version or ())),
                "count": len(files),
                "files": files,
                "version": store.version(),
            }
        )


def migrate(
    old: Annotated[
        str,
        typer.Argument(metavar="OLD", help="dataset directory of the earlier layout (date=…/ and _depin/)"),
    ],
    new: Annotated[
        str,
        typer.Argument(
            metavar="NEW", help="new dataset: an empty or missing directory, or s3://bucket/prefix"
        ),
    ],
    as_json: JsonOpt = False,
) -> None:
    """Copy a Parquet dataset of the earlier layout into a new Delta table (rows, schema, watermarks).

    Safe to rerun after an interruption: days already copied are skipped. OLD is only read."""
    from connectors.dimo import maintenance

    doc = maintenance.migrate(old, new)
    say(
        ("migrated", "bold green"),
        f" {doc.source} → {doc.target}: {doc.rows_copied:,} rows in {doc.days_copied} days copied"
        + (f" ({doc.days_present} days were there already)" if doc.days_present else "")
        + f", {doc.watermarks} watermarks; version {doc.version}. Point --out at the new dataset; "
        "delete the old directory once you have checked it",
    )
    if as_json:
        emit_json(doc.model_dump(mode="json"))


app = typer.Typer(
    name="dataset",
    rich_markup_mode=None,
    help="The telemetry dataset (a Delta table): show, compact, vacuum, or migrate one of the earlier layout.",
    no_args_is_help=True,
)
app.command("info")(info)
app.command("optimize")(optimize)
app.command("vacuum")(vacuum)
app.command("migrate")(migrate)

__all__ = ["app", "info", "migrate", "optimize", "vacuum"]
