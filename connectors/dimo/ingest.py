"""Incremental ingestion: DIMO telemetry (any :class:`TelemetrySource`) into a :class:`TelemetryStore`.

Re-running over an overlapping window never duplicates or drops rows: each vehicle resumes from its
watermark, the store deduplicates on ``(token_id, timestamp)``, and watermarks move only after the rows
they cover are durably written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from connectors.dimo.client import TelemetrySource
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
    commit_rows: int = 250_000,
    on_progress: Callable[[IngestProgress], None] | None = None,
) -> IngestReport:
    """Fetch ``[since, until)`` at ``interval`` for every vehicle shared with the license and store it.

    ``source`` is a :class:`connectors.dimo.client.TelemetrySource` (``DimoClient``). Bounds are floored to
    the interval grid; each vehicle starts at ``max(since, its watermark)``.
    """
    started = time.perf_counter()
    interval_text = format_go_duration(interval)
    if store.interval and store.interval != interval_text:
        raise ConfigError(
            f"interval: the dataset at {store.root} holds {store.interval} buckets, not {interval_text}; "
            "use the same --interval or another --out directory"
        )
    lo, hi = align_down(since, interval), align_down(until, interval)
    if hi <= lo:
        raise ConfigError(
            f"since/until: the window [{since.isoformat()}, {until.isoformat()}) holds no whole {interval_text} "
            "bucket; widen it"
        )
    vehicles = await source.discover_vehicles()
    if token_ids is not None:
        wanted = set(token_ids)
        missing = wanted - {v.token_id for v in vehicles}
        if missing:
            raise ConfigError(
                f"vehicles: {sorted(missing)} are not shared with this license; check the token ids"
            )
        vehicles = [v for v in vehicles if v.token_id in wanted]

    marks = store.watermarks()
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
    pending_rows = 0

    def flush() -> None:
        nonlocal pending, pending_ids, pending_rows
        if not pending_ids:
            return
        tables = [t for t in pending if t.num_rows]
        if tables:
            names = signals_of_columns(c for t in tables for c in t.column_names)
            schema = telemetry_schema(names, interval=interval_text)
            store.write(
                pa.concat_tables([conform_table(t, schema) for t in tables]),
                watermarks={tid: hi for tid in pending_ids},
            )
        else:
            store.set_watermarks({tid: hi for tid in pending_ids})
        pending, pending_ids, pending_rows = [], [], 0

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
            if pending_rows >= commit_rows:
                flush()
        if on_progress:
            on_progress(IngestProgress(done, len(todo), report.rows, history.vehicle.token_id))
    flush()

    stats = getattr(source, "stats", None)
    report.requests = int(getattr(stats, "requests", 0))
    report.retries = int(getattr(stats, "retries", 0))
    report.seconds = round(time.perf_counter() - started, 3)
    report.dataset_rows = store.summary().rows
    return report
