"""Incremental ingestion: DIMO telemetry (any :class:`TelemetrySource`) into a :class:`TelemetryStore`.

Re-running over an overlapping window never duplicates or drops rows: each vehicle resumes from its
watermark, and each flush appends its rows and the watermarks of the vehicles it completes in one table
commit (so a crash before a commit loses nothing that a rerun does not redo, and one after it redoes nothing).

Memory is bounded by the flush size, not the fleet: rows are buffered until ``commit_rows`` rows or
``commit_bytes`` bytes, then appended (a write costs O(new rows)); at most ``max_concurrency`` vehicles are
being fetched at any time (the client's setting).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from connectors.dimo.client import TelemetrySource, VehicleInfo
from connectors.dimo.go_duration import format_go_duration
from connectors.dimo.schema import conform_table, signals_of_columns, telemetry_schema
from connectors.dimo.store import TelemetryStore
from depin_core.errors import ConfigError

log = logging.getLogger("depin.ingest")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def align_down(t: datetime, interval: timedelta) -> datetime:
    """Floor ``t`` to the epoch-aligned grid of ``interval`` (so reruns ask for the same buckets)."""
    step = int(interval.total_seconds() * 1_000_000)
    us = int((t - _EPOCH).total_seconds() * 1_000_000)
    return _EPOCH + timedelta(microseconds=us - us % step)


@dataclass
class IngestProgress:
    vehicles_done: int
    vehicles_total: int
    rows: int
    token_id: int | None = None


@dataclass
class IngestReport:
    """What one ``ingest`` run did. ``to_json()`` is the ``depin ingest --json`` line (stable field names)."""

    vehicles: int
    rows: int
    requests: int
    retries: int
    seconds: float
    dataset: str
    since: str
    until: str
    interval: str
    skipped: list[dict[str, Any]] = field(default_factory=list)
    up_to_date: int = 0
    dataset_rows: int = 0
    dataset_version: int | None = None  # the table version after this run (time travel: DatasetRef, lineage)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


async def ingest(
    source: TelemetrySource,
    store: TelemetryStore,
    *,
    since: datetime,
    until: datetime,
    interval: timedelta,
    signals: Sequence[str] | None = None,
    token_ids: Sequence[int] | None = None,
    vehicles: Sequence[VehicleInfo] | None = None,
    commit_rows: int = 250_000,
    commit_bytes: int = 64 << 20,
    on_progress: Callable[[IngestProgress], None] | None = None,
) -> IngestReport:
    """Fetch ``[since, until)`` at ``interval`` for every vehicle shared with the license and store it.

    ``source`` is a :class:`connectors.dimo.client.TelemetrySource` (``DimoClient``). Bounds are floored to
    the interval grid; each vehicle starts at ``max(since, its watermark)``. ``vehicles`` (already discovered,
    e.g. once for many batches) skips the discovery; else every shared vehicle, or those of ``token_ids``.
    """
    started = time.perf_counter()
    interval_text = format_go_duration(interval)
    if commit_rows < 1 or commit_bytes < 1:
        raise ConfigError("commit_rows/commit_bytes: must be positive (rows and bytes buffered per commit)")
    store.ensure(interval=interval_text)
    lo, hi = align_down(since, interval), align_down(until, interval)
    if hi <= lo:
        raise ConfigError(
            f"since/until: the window [{since.isoformat()}, {until.isoformat()}) holds no whole {interval_text} "
            "bucket; widen it"
        )
    if vehicles is None:
        vehicles = await source.discover_vehicles()
    if token_ids is not None:
        wanted = set(token_ids)
        missing = wanted - {v.token_id for v in vehicles}
        if missing:
            raise ConfigError(
                f"vehicles: {sorted(missing)} are not shared with this license; check the token ids"
            )
        vehicles = [v for v in vehicles if v.token_id in wanted]

    marks = store.watermarks(v.token_id for v in vehicles)
    starts = {v.token_id: max(lo, marks.get(v.token_id, lo)) for v in vehicles}
    todo = [v for v in vehicles if starts[v.token_id] < hi]
    report = IngestReport(
        vehicles=0,
        rows=0,
        requests=0,
        retries=0,
        seconds=0.0,
        dataset=str(store.root),
        since=lo.isoformat(),
        until=hi.isoformat(),
        interval=interval_text,
        up_to_date=len(vehicles) - len(todo),
    )
    if report.up_to_date:
        log.info("%d vehicle(s) already ingested up to %s", report.up_to_date, hi.isoformat())

    pending: list[pa.Table] = []
    pending_ids: list[int] = []
    pending_rows = pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_ids, pending_rows, pending_bytes
        if not pending_ids:
            return
        tables = [t for t in pending if t.num_rows]
        names = signals_of_columns(c for t in tables for c in t.column_names)
        schema = telemetry_schema(names, interval=interval_text)
        rows = (
            pa.concat_tables([conform_table(t, schema) for t in tables]) if tables else schema.empty_table()
        )
        store.append(rows, watermarks={tid: hi for tid in pending_ids})
        pending, pending_ids, pending_rows, pending_bytes = [], [], 0, 0

    done = 0
    async for history in source.fetch_fleet(todo, since=starts, until=hi, interval=interval, signals=signals):
        done += 1
        if history.skipped_reason:
            report.skipped.append({"token_id": history.vehicle.token_id, "reason": history.skipped_reason})
        else:
            report.vehicles += 1
            report.rows += history.table.num_rows
            pending.append(history.table)
            pending_ids.append(history.vehicle.token_id)
            pending_rows += history.table.num_rows
            pending_bytes += history.table.nbytes
            if pending_rows >= commit_rows or pending_bytes >= commit_bytes:
                flush()
        if on_progress:
            on_progress(IngestProgress(done, len(todo), report.rows, history.vehicle.token_id))
    flush()

    stats = getattr(source, "stats", None)
    report.requests = int(getattr(stats, "requests", 0))
    report.retries = int(getattr(stats, "retries", 0))
    report.seconds = round(time.perf_counter() - started, 3)
    summary = store.summary(count_vehicles=False)
    report.dataset_rows, report.dataset_version = summary.rows, summary.version
    return report
