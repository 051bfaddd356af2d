"""Per-vehicle facts the Telemetry endpoint needs: windows of rows and events, and all-time summaries.

``VehicleData`` reads a vehicle's rows from a ``fleet.History``: the simulated fleet's on-demand history, or
:class:`FrameHistory` over a recorded vehicle's frames (layout in ``fleet.py``). Its all-time summary (count,
first/last time and latest value of every signal, events per name) is computed in one pass over the
history's chunks the first time it is needed; ``VehicleCache`` keeps a bounded number of them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any, TypeVar

import numpy as np
import polars as pl

from connectors.dimo.catalog import current_signals
from connectors.dimo.emulator.fleet import Chunk, Fleet, History
from connectors.dimo.emulator.lru import LruCache
from connectors.dimo.emulator.telemetry.schema import COORDINATES

LAT, LON, HDOP = "latitude", "longitude", "hdop"
TS = "ts"
# Grid step (degrees) for approximate coordinates: about the size of an H3 resolution-6 cell.
APPROX_STEP_DEG = 0.05
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_Coord = TypeVar("_Coord", float, pl.Expr)


@dataclass(frozen=True)
class SignalSummary:
    count: int
    first_seen: datetime
    last_seen: datetime


def snap(value: _Coord) -> _Coord:
    """Snap a coordinate (a float or a polars expression) to the centre of its approximate-location cell."""
    return (np.floor(value / APPROX_STEP_DEG) + 0.5) * APPROX_STEP_DEG


def to_us(dt: datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime (exact, also before 1970)."""
    return (dt - _EPOCH) // _US


def _ts_us(frame: pl.DataFrame, col: str = TS) -> tuple[pl.DataFrame, np.ndarray]:
    if frame.is_empty() or col not in frame.columns:
        return frame, np.empty(0, dtype=np.int64)
    frame = frame.with_columns(pl.col(col).dt.cast_time_unit("us").dt.replace_time_zone("UTC"))
    if not frame[col].is_sorted():
        frame = frame.sort(col)
    return frame, frame[col].cast(pl.Int64).to_numpy()


@dataclass(frozen=True)
class FrameChunk:
    """A whole recorded history as one chunk (see ``fleet.Chunk``)."""

    series: pl.DataFrame
    ts_us: np.ndarray
    events: pl.DataFrame
    event_ts_us: np.ndarray


class FrameHistory:
    """``fleet.History`` over one vehicle's whole frames held in memory (replayed and hand-built fleets)."""

    def __init__(self, series: pl.DataFrame, events: pl.DataFrame) -> None:
        frame, ts = _ts_us(series)
        ev, ev_ts = _ts_us(events)
        self.chunk = FrameChunk(frame, ts, ev, ev_ts)

    def __contains__(self, token_id: object) -> bool:
        return True

    def columns(self, token_id: int) -> list[str]:
        return self.chunk.series.columns

    def rows(self, token_id: int, from_us: int, to_us: int) -> tuple[pl.DataFrame, np.ndarray]:
        c = self.chunk
        lo, hi = (int(i) for i in np.searchsorted(c.ts_us, [from_us, to_us], side="left"))
        hi = max(lo, hi)
        return c.series.slice(lo, hi - lo), c.ts_us[lo:hi]

    def events(self, token_id: int, from_us: int, to_us: int) -> pl.DataFrame:
        c = self.chunk
        lo, hi = (int(i) for i in np.searchsorted(c.event_ts_us, [from_us, to_us], side="left"))
        return c.events.slice(lo, max(0, hi - lo))

    def iter_chunks(self, token_id: int) -> Iterator[FrameChunk]:
        yield self.chunk


@dataclass(frozen=True)
class Summary:
    """All-time facts of one vehicle: per-signal summaries and latest values, and per-event-name counts."""

    signals: dict[str, SignalSummary]  # signals with at least one value, sorted by name
    latest: dict[str, tuple[datetime, Any]]  # signal -> (timestamp, value); coordinates value is a dict
    events: list[dict[str, Any]]  # eventDataSummary rows (name, numberOfEvents, firstSeen, lastSeen)


def _chunk_aggregates(frame: pl.DataFrame, names: list[str], has_loc: bool) -> dict[str, Any]:
    """Count, first and last time and last value of every signal in ``frame`` (one row of ``n:``/``f:``/…)."""
    exprs: list[pl.Expr] = []
    for c in names:
        ok = pl.col(c).is_not_null()
        exprs += [
            ok.sum().alias(f"n:{c}"),
            pl.col(TS).filter(ok).first().alias(f"f:{c}"),
            pl.col(TS).filter(ok).last().alias(f"l:{c}"),
            pl.col(c).filter(ok).last().alias(f"v:{c}"),
        ]
    if has_loc:
        ok = pl.col(LAT).is_not_null() & pl.col(LON).is_not_null()
        hdop = pl.col(HDOP).fill_null(0.0) if HDOP in frame.columns else pl.lit(0.0)
        exprs += [
            ok.sum().alias(f"n:{COORDINATES}"),
            pl.col(TS).filter(ok).first().alias(f"f:{COORDINATES}"),
            pl.col(TS).filter(ok).last().alias(f"l:{COORDINATES}"),
            pl.struct(pl.col(LAT).alias(LAT), pl.col(LON).alias(LON), hdop.alias(HDOP))
            .filter(ok)
            .last()
            .alias(f"v:{COORDINATES}"),
        ]
    return frame.select(exprs).row(0, named=True) if exprs and not frame.is_empty() else {}


def event_summary(events: pl.DataFrame) -> list[dict[str, Any]]:
    """``eventDataSummary`` rows of an events frame, by name."""
    if events.is_empty():
        return []
    rows = (
        events.group_by("name")
        .agg(
            pl.len().alias("numberOfEvents"),
            pl.col(TS).min().alias("firstSeen"),
            pl.col(TS).max().alias("lastSeen"),
        )
        .sort("name")
    )
    return rows.to_dicts()


def summarize(chunks: Iterable[Chunk], columns: list[str]) -> Summary:
    """A vehicle's :class:`Summary` from its history chunks in time order (one pass, one chunk at a time)."""
    catalog = current_signals()
    cols = [c for c in columns if c in catalog and catalog[c].gql_type != "Location"]
    has_loc = LAT in columns and LON in columns
    names = sorted([*cols, *([COORDINATES] if has_loc else [])])
    count = dict.fromkeys(names, 0)
    first: dict[str, datetime] = {}
    latest: dict[str, tuple[datetime, Any]] = {}
    events: list[pl.DataFrame] = []
    for chunk in chunks:
        if chunk.events.height:
            events.append(chunk.events)
        if not chunk.series.height:
            continue
        row = _chunk_aggregates(chunk.series, cols, has_loc)
        for name in names:
            n = row.get(f"n:{name}")
            if n:
                count[name] += int(n)
                first.setdefault(name, row[f"f:{name}"])
                latest[name] = (row[f"l:{name}"], row[f"v:{name}"])
    signals = {n: SignalSummary(count[n], first[n], latest[n][0]) for n in names if count[n]}
    return Summary(
        signals,
        {n: latest[n] for n in signals},
        event_summary(pl.concat(events) if events else pl.DataFrame()),
    )


class VehicleData:
    """What the Telemetry endpoint reads of one vehicle: windows of rows and events, and all-time facts.

    Rows come from the fleet's :class:`~connectors.dimo.emulator.fleet.History` (generated on demand for
    simulated vehicles) or from the vehicle's frames; the all-time :class:`Summary` is computed on first use.
    """

    def __init__(self, token_id: int, source: str, history: History) -> None:
        self.token_id, self.source, self._history = token_id, source, history
        self.columns = frozenset(history.columns(token_id))

    def rows(self, from_us: int, to_us: int) -> tuple[pl.DataFrame, np.ndarray]:
        """Series rows with ``from <= ts < to`` (µs) and their timestamps, by time."""
        return self._history.rows(self.token_id, from_us, to_us)

    def events(self, from_us: int, to_us: int) -> pl.DataFrame:
        """Events with ``from <= ts < to`` (µs), by time."""
        return self._history.events(self.token_id, from_us, to_us)

    @cached_property
    def summary(self) -> Summary:
        return summarize(self._history.iter_chunks(self.token_id), sorted(self.columns))

    @property
    def summaries(self) -> dict[str, SignalSummary]:
        return self.summary.signals

    @property
    def latest(self) -> dict[str, tuple[datetime, Any]]:
        return self.summary.latest

    @property
    def available(self) -> list[str]:
        return list(self.summary.signals)

    @property
    def last_seen(self) -> datetime | None:
        return max((s.last_seen for s in self.summary.signals.values()), default=None)


def build_vehicle_data(fleet: Fleet, token_id: int) -> VehicleData | None:
    """The :class:`VehicleData` of ``token_id``; None when the fleet has no such vehicle."""
    vehicle = fleet.vehicles.get(token_id)
    if vehicle is None:
        return None
    if fleet.history is not None and token_id in fleet.history:
        return VehicleData(token_id, vehicle.source, fleet.history)
    series = fleet.series.get(token_id, pl.DataFrame({TS: []}, schema={TS: pl.Datetime("us", "UTC")}))
    return VehicleData(
        token_id, vehicle.source, FrameHistory(series, fleet.events.get(token_id, pl.DataFrame()))
    )


class VehicleCache:
    """:class:`VehicleData` per token id, the most recently used ``size`` kept (thread-safe)."""

    def __init__(self, fleet: Fleet, size: int = 4096) -> None:
        self._fleet = fleet
        self._data = LruCache[VehicleData | None](size)
        self._lock = threading.Lock()

    def get(self, token_id: int) -> VehicleData | None:
        if token_id not in self._fleet.vehicles:
            return None
        hit = self._data.get(token_id)
        if hit is None:
            with self._lock:
                hit = self._data.get(token_id)
                if hit is None:
                    hit = self._data.put(token_id, build_vehicle_data(self._fleet, token_id))
        return hit
