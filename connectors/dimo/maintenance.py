"""Maintenance of the telemetry Delta table: compaction, vacuum, a summary, and migration of the earlier layout.

The CLI (``depin dataset info|optimize|vacuum|migrate``) and the flows call these functions.

- :func:`optimize` rewrites the small files that appends leave (one per day per commit) into few large ones,
  clustered by (token_id, timestamp), then writes a checkpoint so that reading the watermarks stays fast.
  The old files stay on disk (older versions still read them) until :func:`vacuum`.
- :func:`vacuum` deletes files no version within the retention needs, and (``full``) files no version ever
  referenced: the staged files of a write that crashed before its commit.
- :func:`migrate` copies a dataset of the earlier layout (``date=YYYY-MM-DD/part-0.parquet`` and
  ``_depin/state.json``) into a new table, one day per commit, then sets its watermarks.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError
from pydantic import BaseModel, Field

from connectors.dimo import _delta
from connectors.dimo.location import TableLocation
from connectors.dimo.schema import SCHEMA_ID, conform_table
from connectors.dimo.store import PARTITION, TelemetryStore
from depin_core.errors import ConfigError, DepinError, PermanentError, TransientError

log = logging.getLogger(__name__)

DEFAULT_RETENTION_HOURS = 168  # Delta's default deletedFileRetentionDuration (7 days)
ZORDER_COLUMNS = ("token_id", "timestamp")
OLD_STATE = Path("_depin") / "state.json"
OLD_PART_FILE = "part-0.parquet"
_OLD_FORMAT_VERSION = 1
_HISTORY_SHOWN = 10
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TRANSIENT = ("connect", "timed out", "timeout", "temporarily", "slow down", "503", "500 ", "concurrent")


def storage_error(where: TableLocation, exc: BaseException) -> DepinError:
    """A one-line error for a failure of delta-rs or the object store (transient when retrying may help)."""
    lines = [ln.strip(" ↳") for ln in _ANSI.sub("", str(exc)).splitlines()]
    lines = [ln for ln in lines if ln]
    text = f"{lines[0]}: {lines[-1]}" if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
    hint = (
        "check the path and its permissions"
        if where.is_local
        else "check DEPIN_DATASET_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL), the credentials, and that the bucket exists"
    )
    cls = TransientError if any(w in text.lower() for w in _TRANSIENT) else PermanentError
    return cls(f"dataset {where.uri}: {text} ({hint})")


@contextlib.contextmanager
def _storage(where: TableLocation) -> Iterator[None]:
    try:
        yield
    except (OSError, DeltaError) as exc:
        raise storage_error(where, exc) from exc


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _store_errors(
    fn: Callable[Concatenate[TelemetryStore, _P], _R],
) -> Callable[Concatenate[TelemetryStore, _P], _R]:
    """Storage failures of ``fn(store, …)`` become one-line DepinErrors (see :func:`storage_error`)."""

    @functools.wraps(fn)
    def wrapper(store: TelemetryStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with _storage(store.location):
            return fn(store, *args, **kwargs)

    return wrapper


def _require(store: TelemetryStore) -> DeltaTable:
    """The store's Delta table; ConfigError (with the fix) when there is none."""
    if not store.exists():  # also refuses a dataset of the earlier layout, naming `depin dataset migrate`
        raise ConfigError(
            f"dataset {store.root} has no Delta table; ingest into it first (`depin ingest --out {store.root}`)"
        )
    dt = _delta.open_table(store.location)
    assert dt is not None
    return dt


def _partitions(dt: DeltaTable) -> Counter[str]:
    """Number of data files per ``date`` partition value."""
    adds = pa.table(dt.get_add_actions(flatten=True))
    if not adds.num_rows:
        return Counter()
    return Counter(str(v) for v in adds.column(f"partition.{PARTITION}").to_pylist())


# ------------------------------------------------------------------------------------------------ optimize


@_store_errors
def optimize(store: TelemetryStore, *, zorder: bool = True, target_size: int | None = None) -> dict[str, Any]:
    """Compact the days that hold more than one file; with ``zorder``, cluster them by (token_id, timestamp).

    Only partitions with several files are rewritten, so a second run right after is a no-op (no commit).
    Z-ordering bin-packs as it rewrites, so it replaces compaction rather than following it. Ends with a
    checkpoint at the latest version. ``target_size`` is the wanted file size in bytes (delta-rs' default
    otherwise). Returns version and file counts before/after, files added/removed and partitions rewritten.
    """
    if target_size is not None and target_size <= 0:
        raise ConfigError(f"target_size: {target_size} must be a positive number of bytes, e.g. 268435456")
    dt = _require(store)
    before_version = dt.version()
    before = _partitions(dt)
    crowded = sorted(p for p, n in before.items() if n > 1)
    metrics: dict[str, Any] = {}
    if crowded:
        where = [(PARTITION, "in", crowded)]
        if zorder:
            metrics = dt.optimize.z_order(
                list(ZORDER_COLUMNS), partition_filters=where, target_size=target_size
            )
        else:
            metrics = dt.optimize.compact(partition_filters=where, target_size=target_size)
        dt.update_incremental()
    dt.create_checkpoint()  # watermark reads start from the newest checkpoint
    after = _partitions(dt)
    result = {
        "dataset": store.root,
        "version_before": before_version,
        "version_after": dt.version(),
        "files_before": sum(before.values()),
        "files_after": sum(after.values()),
        "files_added": int(metrics.get("numFilesAdded", 0)),
        "files_removed": int(metrics.get("numFilesRemoved", 0)),
        "partitions": len(crowded),
        "zorder": zorder,
    }
    log.info("dataset %s optimized: %s", store.root, result)
    return result


# -------------------------------------------------------------------------------------------------- vacuum


@_store_errors
def vacuum(
    store: TelemetryStore,
    *,
    retention_hours: int = DEFAULT_RETENTION_HOURS,
    dry_run: bool = False,
    full: bool = True,
    keep_versions: Iterable[int] = (),
    force: bool = False,
) -> list[str]:
    """Delete data files older than ``retention_hours`` that the latest version does not use; their paths.

    ``full`` also finds files that no version ever referenced (a crashed write's staged files); without it
    only files removed by a commit (``optimize``) are candidates. Versions older than the retention become
    unreadable unless listed in ``keep_versions``. ``dry_run`` lists without deleting.
    A retention below 7 days needs ``force``: files that a running writer has staged but not yet committed
    look exactly like a crash's orphans, so only force it when no writer is running.
    """
    if retention_hours < 0:
        raise ConfigError(f"retention_hours: {retention_hours} is negative; give hours ≥ 0 (default 168)")
    if retention_hours < DEFAULT_RETENTION_HOURS and not force:
        raise ConfigError(
            f"retention_hours: {retention_hours} is below the {DEFAULT_RETENTION_HOURS} h (7-day) default; files "
            "an ingest running now has staged but not committed look like orphans and would be deleted, "
            "breaking its commit. Pass force (--force) only when no writer is running"
        )
    keep = sorted({int(v) for v in keep_versions})
    dt = _require(store)
    missing = [v for v in keep if not 0 <= v <= dt.version()]
    if missing:
        raise ConfigError(
            f"keep_versions: {missing} are not versions of the dataset at {store.root} (0…{dt.version()})"
        )
    deleted = dt.vacuum(
        retention_hours=retention_hours,
        dry_run=dry_run,
        enforce_retention_duration=not force,
        full=full,
        keep_versions=keep or None,
    )
    log.info(
        "dataset %s: vacuum %s %d file(s)", store.root, "would delete" if dry_run else "deleted", len(deleted)
    )
    return sorted(deleted)


# ---------------------------------------------------------------------------------------------------- info


class OperationInfo(BaseModel):
    """One commit of the table's history."""

    version: int
    timestamp: datetime | None
    operation: str


class DatasetInfo(BaseModel):
    """What ``depin dataset info`` shows: size and extent from the log, watermarks, recent commits."""

    uri: str
    version: int
    versions: int  # commits in the history still held by the log
    rows: int
    vehicles: int
    first: datetime | None
    last: datetime | None
    files: int
    partitions: int
    bytes: int
    columns: list[str]
    interval: str | None
    watermarks: int  # vehicles with a watermark (including those whose windows were empty)
    watermark_min: datetime | None
    watermark_max: datetime | None
    operations: list[OperationInfo] = Field(default_factory=list)  # newest first


@_store_errors
def info(store: TelemetryStore) -> DatasetInfo:
    """Summary of the dataset (rows, extent, files and bytes from the log; vehicles by a token_id scan)."""
    dt = _require(store)
    summary = store.summary()
    marks = store.watermarks()
    history = dt.history()
    ops = [
        OperationInfo(
            version=int(h["version"]),
            timestamp=datetime.fromtimestamp(h["timestamp"] / 1000, UTC) if h.get("timestamp") else None,
            operation=str(h.get("operation", "")),
        )
        for h in history[:_HISTORY_SHOWN]
    ]
    assert summary.version is not None
    return DatasetInfo(
        uri=store.root,
        version=summary.version,
        versions=len(history),
        rows=summary.rows,
        vehicles=summary.vehicles,
        first=summary.first,
        last=summary.last,
        files=summary.files,
        partitions=summary.partitions,
        bytes=summary.bytes,
        columns=summary.columns,
        interval=summary.interval,
        watermarks=len(marks),
        watermark_min=min(marks.values(), default=None),
        watermark_max=max(marks.values(), default=None),
        operations=ops,
    )


# ------------------------------------------------------------------------------------------------- migrate


class MigrateReport(BaseModel):
    """What :func:`migrate` did."""

    source: str
    target: str
    days: int  # days in the old dataset
    days_copied: int  # by this run
    days_present: int  # found already copied (a rerun after a crash)
    rows: int  # rows in the old dataset
    rows_copied: int  # by this run
    watermarks: int
    watermarks_set: int  # by this run
    version: int | None  # the new table's version afterwards
    interval: str | None
    columns: list[str]


class _OldState(BaseModel):
    """The parts of the earlier layout's ``_depin/state.json`` that migration needs."""

    format_version: int = _OLD_FORMAT_VERSION
    schema_id: str = SCHEMA_ID
    interval: str | None = None
    arrow_schema: str = ""  # base64 Arrow IPC schema with field metadata
    watermarks: dict[int, datetime] = Field(default_factory=dict)


def _old_state(root: Path) -> _OldState:
    path = root / OLD_STATE
    if not path.is_file():
        if _delta.open_table(TableLocation.of(root)) is not None:
            raise ConfigError(f"{root} is already a Delta table; there is nothing to migrate")
        raise ConfigError(
            f"{root} is not a dataset of the earlier layout ({OLD_STATE} is missing); give the directory that "
            "holds date=YYYY-MM-DD/ and _depin/"
        )
    try:
        state = _OldState.model_validate_json(path.read_bytes())
    except ValueError as exc:
        raise ConfigError(f"{path} is not a valid dataset state file ({exc.__class__.__name__})") from None
    if state.format_version != _OLD_FORMAT_VERSION:
        raise ConfigError(
            f"{path}: dataset format {state.format_version} is not the earlier layout ({_OLD_FORMAT_VERSION}) "
            "that this version migrates"
        )
    return state


def _old_days(root: Path) -> list[tuple[str, Path]]:
    """(YYYY-MM-DD, file) of each day of the old dataset, oldest first."""
    out = []
    for d in root.glob(f"{PARTITION}=*"):
        name = d.name.removeprefix(f"{PARTITION}=")
        try:
            date.fromisoformat(name)
        except ValueError:
            continue
        if (d / OLD_PART_FILE).is_file():
            out.append((name, d / OLD_PART_FILE))
    return sorted(out)


def _old_schema(state: _OldState) -> pa.Schema | None:
    if not state.arrow_schema:
        return None
    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(state.arrow_schema)))
    meta = {"depin.schema": state.schema_id}
    if state.interval:
        meta["depin.interval"] = state.interval
    return schema.with_metadata(meta)


def _copied_days(store: TelemetryStore, days: dict[str, int], source: Path) -> set[str]:
    """Days already in ``store`` (a rerun); ConfigError when it holds rows that did not come from ``source``.

    One day is one commit, so a day is either wholly there (its row count matches) or not at all.
    """
    present: Counter[str] = Counter()
    for f in store.version_files():
        present[f.path.split("/", 1)[0].removeprefix(f"{PARTITION}=")] += f.rows
    foreign = {d: n for d, n in present.items() if n and days.get(d) != n}
    if foreign:
        day, n = sorted(foreign.items())[0]
        raise ConfigError(
            f"dataset {store.root} already holds rows that are not from {source} (e.g. {n} rows on {day}, "
            f"{days.get(day, 0)} in the old dataset); migrate into a new, empty location"
        )
    return {d for d, n in present.items() if n}


def migrate(
    old_dir: str | Path, new_uri: str | Path, *, storage_options: dict[str, str] | None = None
) -> MigrateReport:
    """Copy a dataset of the earlier layout at ``old_dir`` into the Delta table at ``new_uri``.

    Day by day (one day in memory, one commit per day), keeping the schema with its field metadata, the
    interval and, last, the per-vehicle watermarks of ``state.json``. A rerun after a crash copies only the
    days missing; a rerun after success changes nothing. The old dataset is only read.
    """
    old = Path(old_dir).expanduser().resolve()
    state = _old_state(old)
    target = TableLocation.of(new_uri, storage_options)
    if target.is_local and (target.path == old or old in target.path.parents):
        raise ConfigError(
            f"new dataset {target.uri} is the old dataset {old} or inside it; give another location"
        )
    with _storage(target):
        return _copy(old, state, TelemetryStore(target))


def _copy(old: Path, state: _OldState, store: TelemetryStore) -> MigrateReport:
    target = store.location
    schema = _old_schema(state)
    days = _old_days(old)
    if days and schema is None:
        raise ConfigError(
            f"{old / OLD_STATE} has no arrow_schema but the dataset has day files; it is damaged"
        )
    counts = {d: pq.ParquetFile(f).metadata.num_rows for d, f in days}
    held = store.watermarks()
    for tid, mark in held.items():
        if state.watermarks.get(tid) != mark:
            raise ConfigError(
                f"dataset {target.uri} already holds a watermark for vehicle {tid} ({mark.isoformat()}) that is not "
                f"from {old}; migrate into a new, empty location"
            )
    done = _copied_days(store, counts, old) if store.exists() else set()
    copied = rows_copied = 0
    for day, path in days:
        if day in done or not counts[day]:
            continue
        table = conform_table(pq.ParquetFile(path).read(), schema)
        result = store.append(table)
        if result.rows_added != table.num_rows:  # pragma: no cover - the target held no watermarks
            raise ConfigError(f"migrating {day}: {result.rows_added} of {table.num_rows} rows were appended")
        copied += 1
        rows_copied += result.rows_added
        log.info("migrated %s: %d rows", day, result.rows_added)
    if not store.exists():  # an old dataset without rows
        store.ensure(interval=state.interval)
    todo = {t: m for t, m in state.watermarks.items() if held.get(t) != m}
    if todo:
        store.set_watermarks(todo)
    return MigrateReport(
        source=str(old),
        target=target.uri,
        days=len(days),
        days_copied=copied,
        days_present=len(done),
        rows=sum(counts.values()),
        rows_copied=rows_copied,
        watermarks=len(state.watermarks),
        watermarks_set=len(todo),
        version=store.version(),
        interval=store.interval,
        columns=(store.schema() or pa.schema([])).names,
    )
