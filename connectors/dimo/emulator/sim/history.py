"""Simulated history generated lazily, one vehicle-day at a time, with bounded caches.

A simulated fleet keeps only cheap per-vehicle parameters (:class:`VehicleSpec`); a vehicle's rows are
simulated when a request needs them and dropped again when the caches are full, so memory does not grow
with the fleet.

How a history stays the same whoever asks, in whatever order:

- The unit of work is a *chunk*: one local day of one vehicle (its city's midnight to midnight, the first
  clipped to the warm-up start). Chunk ``d`` is simulated from the vehicle's state at the start of that day
  (position, odometer, SoC/fuel, temperatures, range estimate, ignition-off time) with random numbers
  seeded by ``(fleet seed, vehicle index, d)``; the day's trip plan and its weather come from their own
  per-day and per-12-hour seeds, so they never depend on how far a simulation has run.
- The state at the start of day ``d`` is the state chunk ``d − 1`` ended in (state carried forward), so
  the odometer only grows and the SoC, temperatures and 12 V decay continue across midnight. The first
  day starts from the vehicle's initial state (drawn at start-up). A chunk's activities start inside its
  day; a trip or an overnight charge that runs past midnight stays in the chunk that started it, and the
  next day starts when it ends.
- Hence every chunk is a pure function of ``(fleet seed, vehicle, day)``: a cache miss or eviction only
  recomputes the same rows. States are cached (small, bounded count) so a later day rarely re-simulates
  from the first one; chunks are cached bounded by bytes (LRU). A window's rows are the rows of the chunks
  that overlap it, cut to ``[from, to)``, so ``[t0, t2)`` equals ``[t0, t1)`` followed by ``[t1, t2)``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from connectors.dimo.emulator.lru import LruCache
from connectors.dimo.emulator.sim.catalog import VehicleParams
from connectors.dimo.emulator.sim.profiles import SpeedPieces
from connectors.dimo.emulator.sim.render import CARRIED, Fault, VehicleSim, seeded_climate
from connectors.dimo.emulator.sim.routine import (
    DAY_S,
    HOME,
    MAX_OVERFLOW_S,
    day_start,
    local_day,
    plan_day,
    run_day,
)

# Seed stream tags (seeds are (fleet seed, tag, vehicle index, …)).
DAY_TAG, PLAN_TAG, CLIMATE_TAG = 0x54, 0x55, 0x57
DEFAULT_CACHE_BYTES = 96 * 2**20
DEFAULT_MAX_STATES = 65_536
_LOCKS = 64

State = tuple[Any, ...]  # CARRIED values, then the location (HOME, WORK or an errand index)


@dataclass(frozen=True)
class VehicleSpec:
    """What start-up draws for one simulated vehicle; its rows are simulated from this on demand."""

    index: int
    params: VehicleParams
    faults: tuple[Fault, ...]
    source: str
    odometer_km: float
    soc: float
    fuel: float
    stop_s: float  # rows end here: the history's end, or when an idle vehicle's device went offline


@dataclass(frozen=True)
class Chunk:
    """One vehicle-day of rows (fleet.py series layout) and events, already cut to the history window."""

    series: pl.DataFrame
    ts_us: np.ndarray
    events: pl.DataFrame

    @property
    def nbytes(self) -> int:
        # + the Python objects around the buffers, roughly
        return int(self.series.estimated_size() + self.events.estimated_size() + self.ts_us.nbytes) + 512


def _ts_us(frame: pl.DataFrame) -> np.ndarray:
    return frame["ts"].cast(pl.Int64).to_numpy().astype(np.int64, copy=False)


class SimulatedHistory:
    """The rows of every simulated vehicle, simulated per vehicle-day on request (see the module docstring)."""

    def __init__(
        self,
        *,
        seed: int,
        specs: dict[int, VehicleSpec],
        t0: int,
        t_start: float,
        t_end: float,
        pieces: SpeedPieces | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_states: int = DEFAULT_MAX_STATES,
    ) -> None:
        self.seed = seed
        self.specs = specs
        self.t0, self.t_start, self.t_end = t0, t_start, t_end
        self.pieces = pieces
        self.chunks = LruCache[Chunk](cache_bytes, lambda c: c.nbytes)
        self.states = LruCache[State](max_states)
        self.simulated_days = 0  # chunks simulated so far (a cache miss, or a state needed again)
        self._locks = [threading.Lock() for _ in range(_LOCKS)]
        self._empty: dict[str, Chunk] = {}

    def __contains__(self, token_id: object) -> bool:
        return token_id in self.specs

    # ---- days and states ------------------------------------------------------------------------------
    def days(self, token_id: int) -> range:
        """The local days whose chunks may hold rows of ``token_id``."""
        spec = self.specs[token_id]
        stop = min(spec.stop_s, self.t_end)
        first = local_day(spec.params, self.t0)
        if stop <= self.t_start:
            return range(first, first)
        return range(first, local_day(spec.params, math.nextafter(stop, -math.inf)) + 1)

    def _initial(self, spec: VehicleSpec) -> State:
        sim = self._sim(spec, self.t0, None, day=None)
        sim.odometer_km, sim.soc, sim.fuel = spec.odometer_km, spec.soc, spec.fuel
        return (*sim.carried().values(), HOME)

    def _sim(self, spec: VehicleSpec, t: int, state: State | None, *, day: int | None) -> VehicleSim:
        p = spec.params
        horizon = (day_start(p, day + 1) if day is not None else t) + MAX_OVERFLOW_S + DAY_S
        sim = VehicleSim(
            p=p,
            climate=seeded_climate(p, (self.seed, CLIMATE_TAG, spec.index), t, horizon),
            rng=np.random.default_rng([self.seed, DAY_TAG, spec.index, 0 if day is None else day]),
            t=t,
            place=p.home,
            odometer_km=spec.odometer_km,
            faults=list(spec.faults),
            source=spec.source,
            soh_window=(self.t_start, self.t_end),
        )
        if state is not None:
            sim.restore(dict(zip(CARRIED, state, strict=False)))
        return sim

    def _lock(self, token_id: int) -> threading.Lock:
        return self._locks[token_id % _LOCKS]

    def _run(self, token_id: int, day: int) -> tuple[Chunk, State]:
        """Simulate chunk ``day`` (and any days before it whose start state is not cached)."""
        spec = self.specs[token_id]
        first = self.days(token_id).start
        with self._lock(token_id):
            k, state = day, None
            while k > first and (state := self.states.get((token_id, k))) is None:
                k -= 1
            if state is None:
                k, state = first, self._initial(spec)
            while True:
                chunk, state = self._simulate(spec, k, state)
                self.chunks.put((token_id, k), chunk)
                self.states.put((token_id, k + 1), state)
                if k == day:
                    return chunk, state
                k += 1

    def _simulate(self, spec: VehicleSpec, day: int, state: State) -> tuple[Chunk, State]:
        p = spec.params
        plan_key = (self.seed, PLAN_TAG, spec.index)
        sim = self._sim(spec, int(state[0]), state, day=day)
        trips = [tr for tr in plan_day(p, plan_key, day) if tr.depart >= self.t0]
        later = plan_day(p, plan_key, day + 1) + plan_day(p, plan_key, day + 2)
        loc = run_day(
            sim,
            sim.rng,
            trips,
            later,
            loc=state[-1],
            day_end=day_start(p, day + 1),
            t_end=math.ceil(self.t_end),
            pieces=self.pieces,
        )
        self.simulated_days += 1
        nxt = (*sim.carried().values(), loc)
        if not sim.chunks:  # nothing happened this day (an activity of the day before ran through it)
            return self._empty_chunk(spec), nxt
        series, events = sim.frames(self.t_start, min(spec.stop_s, self.t_end))
        return Chunk(series, _ts_us(series), events), nxt

    def _empty_chunk(self, spec: VehicleSpec) -> Chunk:
        """A chunk without rows but with the vehicle's columns (one per powertrain)."""
        kind = spec.params.powertrain
        if kind not in self._empty:
            sim = self._sim(spec, self.t0, self._initial(spec), day=None)
            sim.park(self.t0 + 60)
            series, events = sim.frames(0, 0)
            self._empty[kind] = Chunk(series, _ts_us(series), events)
        return self._empty[kind]

    def state_at(self, token_id: int, day: int) -> State:
        """The vehicle's state at the start of chunk ``day``."""
        first = self.days(token_id).start
        if day <= first:
            return self._initial(self.specs[token_id])
        hit = self.states.get((token_id, day))
        return hit if hit is not None else self._run(token_id, day - 1)[1]

    def chunk(self, token_id: int, day: int) -> Chunk:
        """The rows of ``token_id`` simulated for local ``day`` (cached)."""
        hit = self.chunks.get((token_id, day))
        if hit is not None:
            return hit
        spec = self.specs[token_id]
        if day not in self.days(token_id):
            return self._empty_chunk(spec)
        return self._run(token_id, day)[0]

    # ---- windows ------------------------------------------------------------------------------------
    def _window_chunks(self, token_id: int, from_us: int, to_us: int) -> list[Chunk]:
        days = self.days(token_id)
        spec = self.specs[token_id]
        a = max(from_us / 1e6, self.t_start)
        b = min(to_us / 1e6, spec.stop_s, self.t_end)
        if not days or a >= b:
            return []
        lo = max(days.start, local_day(spec.params, a))
        hi = min(days.stop - 1, local_day(spec.params, math.nextafter(b, -math.inf)))
        # an activity that ran past midnight belongs to the day before: step back while a day starts late
        while lo > days.start and self.state_at(token_id, lo)[0] > a:
            lo -= 1
        return [self.chunk(token_id, d) for d in range(lo, hi + 1)]

    def columns(self, token_id: int) -> list[str]:
        return self._empty_chunk(self.specs[token_id]).series.columns

    def rows(self, token_id: int, from_us: int, to_us: int) -> tuple[pl.DataFrame, np.ndarray]:
        """The series rows with ``from <= ts < to`` (microseconds) and their timestamps."""
        parts = [c for c in self._window_chunks(token_id, from_us, to_us) if c.series.height]
        if not parts:
            empty = self._empty_chunk(self.specs[token_id])
            return empty.series, empty.ts_us
        frame = parts[0].series if len(parts) == 1 else pl.concat([c.series for c in parts])
        ts = parts[0].ts_us if len(parts) == 1 else np.concatenate([c.ts_us for c in parts])
        lo, hi = (int(i) for i in np.searchsorted(ts, [from_us, to_us], side="left"))
        hi = max(lo, hi)
        return frame.slice(lo, hi - lo), ts[lo:hi]

    def events(self, token_id: int, from_us: int, to_us: int) -> pl.DataFrame:
        """The events with ``from <= ts < to`` (microseconds), by time."""
        parts = [c.events for c in self._window_chunks(token_id, from_us, to_us) if c.events.height]
        if not parts:
            return self._empty_chunk(self.specs[token_id]).events
        ev = pl.concat(parts)
        us = pl.col("ts").cast(pl.Int64)
        return ev.filter((us >= from_us) & (us < to_us))

    def iter_chunks(self, token_id: int) -> Iterator[Chunk]:
        """The vehicle's whole history, chunk by chunk in time order (each computed or taken from cache)."""
        for d in self.days(token_id):
            yield self.chunk(token_id, d)


_ALL = (-(2**62), 2**62)


class HistoryView(Mapping[int, pl.DataFrame]):
    """``Fleet.series`` / ``Fleet.events`` of a simulated fleet: a vehicle's whole frame, built on access."""

    def __init__(self, history: SimulatedHistory, what: str) -> None:
        self.history, self.what = history, what

    def __getitem__(self, token_id: int) -> pl.DataFrame:
        if token_id not in self.history.specs:
            raise KeyError(token_id)
        if self.what == "events":
            return self.history.events(token_id, *_ALL)
        return self.history.rows(token_id, *_ALL)[0]

    def __iter__(self) -> Iterator[int]:
        return iter(self.history.specs)

    def __len__(self) -> int:
        return len(self.history.specs)
