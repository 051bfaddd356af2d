"""``depin ingest`` and ``depin signals``: DIMO settings from env or a credentials file, a progress bar,
an IngestReport; the signal catalog as a table."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from depin_core import paths
from depin_core.errors import ConfigError
from pipelines.cli._output import JsonOpt, emit_json, err_console, say

if TYPE_CHECKING:
    from connectors.dimo.ingest import IngestReport
    from connectors.dimo.settings import DimoSettings


def load_settings(credentials: Path | None) -> DimoSettings:
    """DIMO settings from ``--credentials PATH`` (emulator JSON) or the ``DEPIN_DIMO_*`` environment."""
    from connectors.dimo.settings import DimoSettings

    if credentials is not None:
        if not credentials.exists():
            raise ConfigError(
                f"credentials: {credentials} does not exist; run `depin emulator --credentials-out {credentials}`"
            )
        return DimoSettings.from_credentials_file(credentials)
    settings = DimoSettings()
    settings.require_credentials()
    return settings


async def run_ingest(
    *,
    since: str,
    until: str,
    interval: str,
    signals: str | None,
    vehicles: str | None,
    out: Path | str,
    credentials: Path | None,
    show_progress: bool = True,
    settings: DimoSettings | None = None,
) -> IngestReport:
    """Ingest the flags' window into the dataset ``out``, with a progress bar on stderr."""
    from datetime import UTC, datetime

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from connectors.dimo.client import DimoClient
    from connectors.dimo.go_duration import parse_interval
    from connectors.dimo.ingest import IngestProgress, ingest
    from connectors.dimo.schema import resolve_signals
    from connectors.dimo.store import TelemetryStore
    from depin_core.timeparse import parse_instant

    now = datetime.now(UTC)
    t0 = parse_instant(since, field="since", now=now)
    t1 = parse_instant(until, field="until", now=now)
    step = parse_interval(interval)
    wanted = resolve_signals(s.strip() for s in signals.split(",") if s.strip()) if signals else None
    token_ids = _parse_token_ids(vehicles) if vehicles else None
    settings = settings or load_settings(credentials)
    store = TelemetryStore(out)

    with Progress(
        TextColumn("[bold blue]ingest"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("vehicles"),
        TextColumn("{task.fields[rows]:,} rows"),
        TimeElapsedColumn(),
        console=err_console,
        disable=not show_progress,
        transient=True,
    ) as progress:
        task = progress.add_task("ingest", total=None, rows=0)

        def on_progress(p: IngestProgress) -> None:
            progress.update(task, total=p.vehicles_total, completed=p.vehicles_done, rows=p.rows)

        async with DimoClient(settings) as client:
            return await ingest(
                client,
                store,
                since=t0,
                until=t1,
                interval=step,
                signals=wanted,
                token_ids=token_ids,
                on_progress=on_progress,
            )


def _parse_token_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"vehicles: {text!r} must be comma-separated integer token ids, e.g. 10021,10022"
        ) from None


def ingest(
    since: Annotated[str, typer.Option(help="start: ISO-8601 time or relative duration such as 7d")] = "7d",
    until: Annotated[
        str, typer.Option(help="end (exclusive): ISO-8601 time, relative duration, or 'now'")
    ] = "now",
    interval: Annotated[str, typer.Option(help="bucket width (Go duration: 1m, 30s, 1h)")] = "1m",
    signals: Annotated[
        str | None, typer.Option(help="comma-separated DIMO signals; default: all reported")
    ] = None,
    vehicles: Annotated[
        str | None, typer.Option(help="comma-separated token ids; default: all shared")
    ] = None,
    out: Annotated[
        str,
        typer.Option(
            help="dataset: a directory or s3://bucket/prefix (a Delta table; object-store settings from "
            "DEPIN_DATASET_S3_* or AWS_*)"
        ),
    ] = str(paths.DATASET_DIR),
    credentials: Annotated[
        Path | None, typer.Option(help="credentials JSON (from depin emulator --credentials-out)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Ingest DIMO telemetry into the dataset table, incrementally (per-vehicle watermarks, exactly once)."""
    report = asyncio.run(
        run_ingest(
            since=since,
            until=until,
            interval=interval,
            signals=signals,
            vehicles=vehicles,
            out=out,
            credentials=credentials,
            show_progress=True,
        )
    )
    say(
        "ingested ",
        (f"{report.rows:,}", "bold"),
        f" rows from {report.vehicles} vehicles in {report.seconds:.1f}s "
        f"({report.requests} requests, {report.retries} retries) → {report.dataset}"
        + (f"; {report.up_to_date} already up to date" if report.up_to_date else "")
        + (f"; skipped {len(report.skipped)}" if report.skipped else ""),
    )
    if as_json:
        emit_json(report.to_json())


def list_signals(as_json: JsonOpt = False) -> None:
    """List the DIMO signals the connector knows (name, type, unit, privilege)."""
    from rich.table import Table

    from connectors.dimo.catalog import current_signals

    sigs = current_signals()
    table = Table("signal", "type", "unit", "privilege", "agg")
    for s in sigs.values():
        table.add_row(s.name, s.gql_type, s.unit, s.privilege.removeprefix("VEHICLE_"), s.default_agg)
    err_console.print(table)
    if as_json:
        emit_json(
            {
                "signals": [
                    {
                        "name": s.name,
                        "type": s.gql_type,
                        "unit": s.unit,
                        "privilege": s.privilege,
                        "agg": s.default_agg,
                    }
                    for s in sigs.values()
                ]
            }
        )
