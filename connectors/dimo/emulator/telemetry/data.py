"""Per-vehicle facts the Telemetry endpoint needs, computed once per vehicle (the fleet is immutable).

``VehicleData`` wraps a vehicle's series frame (layout in ``fleet.py``) with its timestamps as an int64
numpy array (for binary-searching windows), the latest value, count and first/last time of every signal,
and the vehicle's events sorted by time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import numpy as np
import polars as pl

from connectors.dimo.catalog import current_signals
from connectors.dimo.emulator.fleet import Fleet
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


@dataclass(frozen=True)
class VehicleData:
    token_id: int
    source: str
    frame: pl.DataFrame
    ts_us: np.ndarray
    columns: frozenset[str]
    summaries: dict[str, SignalSummary]  # signals with at least one value, sorted by name
    latest: dict[str, tuple[datetime, Any]]  # signal -> (timestamp, value); coordinates value is a dict
    events: pl.DataFrame
    event_ts_us: np.ndarray

    @property
    def available(self) -> list[str]:
        return list(self.summaries)

    @property
    def last_seen(self) -> datetime | None:
        return max((s.last_seen for s in self.summaries.values()), default=None)

    def window(self, from_us: int, to_us: int) -> tuple[int, int]:
        """Row range ``[lo, hi)`` of the series inside ``[from, to)`` (binary search on sorted ts)."""
        lo, hi = np.searchsorted(self.ts_us, [from_us, to_us], side="left")
        return int(lo), int(max(lo, hi))


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


def build_vehicle_data(fleet: Fleet, token_id: int) -> VehicleData | None:
    """Compute :class:`VehicleData` for ``token_id``; None when the fleet has no such vehicle."""
    vehicle = fleet.vehicles.get(token_id)
    if vehicle is None:
        return None
    frame, ts_us = _ts_us(
        fleet.series.get(token_id, pl.DataFrame({TS: []}, schema={TS: pl.Datetime("us", "UTC")}))
    )
    catalog = current_signals()
    cols = [c for c in frame.columns if c in catalog and catalog[c].gql_type != "Location"]
    has_loc = LAT in frame.columns and LON in frame.columns
    exprs: list[pl.Expr] = []
    for c in cols:
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
    row = frame.select(exprs).row(0, named=True) if exprs and not frame.is_empty() else {}
    summaries: dict[str, SignalSummary] = {}
    latest: dict[str, tuple[datetime, Any]] = {}
    for name in sorted([*cols, *([COORDINATES] if has_loc else [])]):
        if row.get(f"n:{name}"):
            summaries[name] = SignalSummary(int(row[f"n:{name}"]), row[f"f:{name}"], row[f"l:{name}"])
            latest[name] = (row[f"l:{name}"], row[f"v:{name}"])
    events, event_ts = _ts_us(fleet.events.get(token_id, pl.DataFrame()))
    return VehicleData(
        token_id=token_id,
        source=vehicle.source,
        frame=frame,
        ts_us=ts_us,
        columns=frozenset(frame.columns),
        summaries=summaries,
        latest=latest,
        events=events,
        event_ts_us=event_ts,
    )


class VehicleCache:
    """Lazily computed :class:`VehicleData` per token id (thread-safe; the fleet never changes)."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet
        self._data: dict[int, VehicleData | None] = {}
        self._lock = threading.Lock()

    def get(self, token_id: int) -> VehicleData | None:
        try:
            return self._data[token_id]
        except KeyError:
            pass
        with self._lock:
            if token_id not in self._data:
                self._data[token_id] = build_vehicle_data(self._fleet, token_id)
            return self._data[token_id]
