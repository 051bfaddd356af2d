"""The simulated fleet's lazily generated history: deterministic whoever asks and however, bounded memory."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import polars as pl
import pytest

from connectors.dimo.emulator.app import create_app
from connectors.dimo.emulator.fleet import Fleet
from connectors.dimo.emulator.lru import LruCache
from connectors.dimo.emulator.sim import render as R
from connectors.dimo.emulator.sim.history import SimulatedHistory
from connectors.dimo.emulator.sim.routine import day_start
from connectors.dimo.emulator.sim.simulator import simulate_fleet
from connectors.dimo.emulator.state import EmulatorState, make_license
from connectors.dimo.emulator.telemetry.data import FrameHistory, VehicleData, build_vehicle_data, to_us
from tests.connectors.dimo.emulator.test_telemetry import post, serve

END = datetime(2026, 3, 10, 17, 45, 30, 250000, tzinfo=UTC)
LICENSE = make_license(5)
ARGS = {"vehicles": 8, "days": 3.0, "seed": 21, "end": END, "idle_fraction": 0.25}


def make(**overrides: object) -> Fleet:
    return simulate_fleet(LICENSE, **{**ARGS, **overrides})  # type: ignore[arg-type]


def history(fleet: Fleet) -> SimulatedHistory:
    assert isinstance(fleet.history, SimulatedHistory)
    return fleet.history


def us(dt: datetime) -> int:
    return to_us(dt)


def windows(fleet: Fleet) -> list[tuple[int, int]]:
    """Whole-history, one-day and odd-sized windows (µs), some crossing local midnights."""
    a, b = us(fleet.start), us(fleet.end)
    out = [(a - 10**9, b + 10**9), (a, a + 86_400_000_000), (b - 7_777_777_777, b)]
    rnd = random.Random(3)
    for _ in range(6):
        x, y = sorted(rnd.randrange(a - 3_600_000_000, b + 3_600_000_000) for _ in range(2))
        out.append((x, y))
    return out


def read_all(
    fleet: Fleet, order: list[tuple[int, tuple[int, int]]]
) -> dict[tuple[int, tuple[int, int]], pl.DataFrame]:
    h = history(fleet)
    return {(t, w): h.rows(t, *w)[0] for t, w in order}


def test_startup_simulates_nothing_but_every_vehicle_is_known() -> None:
    fleet = make(vehicles=50)
    h = history(fleet)
    assert h.simulated_days == 0 and len(h.chunks) == 0 and len(h.states) == 0
    assert len(fleet.vehicles) == 50 and set(fleet.series) == set(fleet.vehicles)
    assert fleet.truth_vehicles.height == 50 and fleet.truth_faults.height > 0
    t = next(iter(fleet.vehicles))
    assert h.rows(t, us(fleet.start), us(fleet.start) + 3_600_000_000)[0].height > 0
    assert 0 < h.simulated_days <= 2  # the first day only (and the warm-up day before it)


def test_split_windows_equal_the_whole_window() -> None:
    fleet = make()
    h = history(fleet)
    a, b = us(fleet.start) - 5, us(fleet.end) + 5
    for t in fleet.vehicles:
        whole, ts = h.rows(t, a, b)
        p = h.specs[t].params
        # cut at local midnights (chunk boundaries), in the middle of days and at odd microseconds
        midnights = [day_start(p, d) * 1_000_000 for d in h.days(t)]
        cuts = sorted({a, b, *[m for m in midnights if a < m < b], a + 12_345_678_901, b - 98_765_432_101})
        parts = [h.rows(t, x, y)[0] for x, y in itertools.pairwise(cuts)]
        assert pl.concat(parts).equals(whole)
        evs = [h.events(t, x, y) for x, y in itertools.pairwise(cuts)]
        assert pl.concat(evs).equals(h.events(t, a, b))
        assert np.array_equal(ts, whole["ts"].cast(pl.Int64).to_numpy())


def test_rows_do_not_depend_on_request_order_or_on_other_vehicles() -> None:
    one, two = make(), make()
    keys = [(t, w) for t in one.vehicles for w in windows(one)]
    forward = read_all(one, keys)
    backward = read_all(two, keys[::-1])
    for k in keys:
        assert forward[k].equals(backward[k]), k
    # a fresh fleet asked about one vehicle's last window only (no earlier day requested first)
    t, w = keys[-1]
    assert read_all(make(), [(t, w)])[(t, w)].equals(forward[(t, w)])


def test_rows_do_not_depend_on_cache_evictions() -> None:
    cached = make()
    starved = make(cache_bytes=0, max_states=0)  # nothing is ever kept: every request re-simulates
    small = make(cache_bytes=300_000, max_states=3)
    keys = [(t, w) for t in cached.vehicles for w in windows(cached)]
    random.Random(1).shuffle(keys)
    want = read_all(cached, keys)
    for fleet in (starved, small):
        got = read_all(fleet, keys)
        assert all(got[k].equals(want[k]) for k in keys)
    assert len(history(starved).chunks) == 0 and history(starved).chunks.peak == 0
    assert history(small).chunks.evictions > 0


def test_memory_is_bounded_by_the_cache_limits() -> None:
    limit = 400_000
    fleet = make(vehicles=20, cache_bytes=limit, max_states=10)
    h = history(fleet)
    for t in fleet.vehicles:
        assert fleet.series[t].height >= 0
        assert h.chunks.total <= limit and len(h.states) <= 10
    assert 0 < h.chunks.peak <= limit and h.chunks.evictions > 0 and h.states.evictions > 0


def test_lru_cache_never_holds_more_than_its_limit() -> None:
    cache = LruCache[bytes](100, len)
    rnd = random.Random(0)
    for _ in range(2000):
        key = rnd.randrange(40)
        if rnd.random() < 0.5:
            got = cache.get(key)
            assert got is None or len(got) == key % 17 * 5
        else:
            cache.put(key, b"x" * (key % 17 * 5))
        assert cache.total == sum(len(cache.get(k) or b"") for k in range(40) if k in cache) <= 100
    assert cache.peak <= 100 and cache.evictions > 0
    assert cache.put(99, b"y" * 101) == b"y" * 101 and 99 not in cache  # too big alone: served, not kept


def test_physics_continues_across_day_boundaries() -> None:
    fleet = make(idle_fraction=0.0, days=4.0)
    h = history(fleet)
    for t in fleet.vehicles:
        s = fleet.series[t]
        ts = s["ts"].dt.epoch("s").to_numpy()
        odo = s[R.ODOMETER].to_numpy()
        assert np.all(np.diff(ts) > 0) and np.all(np.diff(ts) <= 60) and np.all(np.diff(odo) >= 0)
        boundaries = [day_start(h.specs[t].params, d) for d in h.days(t)[1:]]
        at = np.searchsorted(ts, boundaries)
        at = at[(at > 0) & (at < len(ts))]
        parked = (s[R.SPEED].to_numpy()[at - 1] == 0) & (s[R.SPEED].to_numpy()[at] == 0)
        v12 = s[R.V12].to_numpy()
        assert np.all(np.abs(v12[at] - v12[at - 1])[parked] < 0.12)  # no reset of the 12 V decay at midnight
        if R.SOC in s.columns:
            soc = s[R.SOC].to_numpy()
            assert np.all(np.abs(np.diff(soc)) < 2.0)  # continuous everywhere (10 s steps at most 150 kW)
            assert np.all(np.abs(soc[at] - soc[at - 1]) < 2.0)


def test_summaries_equal_those_of_the_whole_frames() -> None:
    fleet = make(cache_bytes=200_000)
    for t, vehicle in fleet.vehicles.items():
        lazy = build_vehicle_data(fleet, t)
        assert lazy is not None
        eager = VehicleData(t, vehicle.source, FrameHistory(fleet.series[t], fleet.events[t]))
        assert lazy.summaries == eager.summaries and lazy.latest == eager.latest
        assert lazy.summary.events == eager.summary.events and lazy.columns == eager.columns


def test_signals_over_split_windows_equal_one_request() -> None:
    fleet = make(vehicles=3, idle_fraction=0.0)
    st = EmulatorState(fleet=fleet, public_url="http://127.0.0.1")
    t = max(fleet.vehicles)
    t0 = fleet.start.replace(second=0, microsecond=0) + timedelta(minutes=1)
    t1, t2 = t0 + timedelta(hours=29, minutes=7), t0 + timedelta(days=2)

    def q(a: datetime, b: datetime) -> str:
        f, to = a.strftime("%Y-%m-%dT%H:%M:%SZ"), b.strftime("%Y-%m-%dT%H:%M:%SZ")
        return (
            f'{{ signals(tokenId: {t}, interval: "1m", from: "{f}", to: "{to}") {{ timestamp '
            "speed(agg: AVG) powertrainTransmissionTravelledDistance(agg: MAX) "
            "currentLocationCoordinates(agg: LAST) { latitude longitude } } }"
        )

    with serve(create_app(st)) as url, httpx.Client(base_url=url, timeout=60) as c:
        whole = post(c, st, q(t0, t2), token_id=t).json()["data"]["signals"]
        parts = [post(c, st, q(a, b), token_id=t).json()["data"]["signals"] for a, b in ((t0, t1), (t1, t2))]
    assert len(whole) == 2 * 24 * 60 and parts[0] + parts[1] == whole


@pytest.mark.parametrize("seed", [0, 21])
def test_same_arguments_same_history_other_seed_differs(seed: int) -> None:
    a, b, other = (make(seed=s, idle_fraction=0.0) for s in (seed, seed, seed + 1))
    t = next(iter(a.vehicles))
    assert a.series[t].height > 0 and a.series[t].equals(b.series[t])
    assert not any(a.series[t].equals(other.series[u]) for u in other.vehicles)
