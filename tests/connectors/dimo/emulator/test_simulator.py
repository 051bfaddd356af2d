"""The fleet simulator: determinism, physics, sampling, faults, events and learnable ground truth."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
from eth_utils import to_checksum_address

from connectors.dimo.catalog import signal_catalog
from connectors.dimo.emulator.fleet import SOURCES, Fleet, bundled_cmap_dir
from connectors.dimo.emulator.sim import render as R
from connectors.dimo.emulator.sim.catalog import FULL_GRANT, NAME_COUNT, TIRE_SIGNALS, draw_params, mnemonic
from connectors.dimo.emulator.sim.simulator import initial_sim, simulate_fleet
from connectors.dimo.emulator.state import make_license
from depin_core.errors import ConfigError

END = datetime(2026, 4, 15, 9, 30, 12, 345678, tzinfo=UTC)
LICENSE = make_license(7)
CMAP_DIR = bundled_cmap_dir()


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return simulate_fleet(LICENSE, vehicles=12, days=4, seed=11, end=END, restricted_fraction=0.25)


@pytest.fixture(scope="module")
def big_fleet() -> Fleet:
    """Enough vehicles that every fault kind and plenty of EVs occur."""
    return simulate_fleet(LICENSE, vehicles=40, days=5, seed=3, end=datetime(2026, 1, 20, tzinfo=UTC))


def epoch_s(s: pl.DataFrame) -> np.ndarray:
    return s["ts"].dt.epoch("us").to_numpy() / 1e6


def evs(f: Fleet) -> list[int]:
    return [t for t, v in f.vehicles.items() if v.powertrain == "ELECTRIC"]


def ignition_runs(s: pl.DataFrame) -> list[tuple[int, int]]:
    """Row ranges [a, b) of consecutive ignition-on samples (trips)."""
    on = np.concatenate(([0], (s[R.IGNITION].to_numpy() > 0).view(np.int8), [0]))
    edges = np.diff(on)
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def test_same_seed_same_fleet_other_seed_differs(fleet: Fleet) -> None:
    again = simulate_fleet(LICENSE, vehicles=12, days=4, seed=11, end=END, restricted_fraction=0.25)
    assert again.vehicles == fleet.vehicles
    for t, s in fleet.series.items():
        assert again.series[t].equals(s)
        assert again.events[t].equals(fleet.events[t])
    assert again.truth_vehicles.equals(fleet.truth_vehicles)
    assert again.truth_faults.equals(fleet.truth_faults)
    other = simulate_fleet(LICENSE, vehicles=12, days=4, seed=12, end=END)
    assert list(other.vehicles) != list(fleet.vehicles)
    first = next(iter(other.series.values()))
    assert not any(first.equals(s) for s in fleet.series.values())


def test_vehicle_metadata(fleet: Fleet) -> None:
    ids = list(fleet.vehicles)
    assert len(ids) == len(set(ids)) == 12 and min(ids) > 10_000
    assert {v.powertrain for v in fleet.vehicles.values()} == {"ELECTRIC", "COMBUSTION"}
    assert len({v.name for v in fleet.vehicles.values()}) == 12
    for v in fleet.vehicles.values():
        assert to_checksum_address(v.owner) == v.owner
        assert len(v.name.split()) == 3
        assert v.minted_at < fleet.start
        assert v.source in SOURCES.values()
        assert (v.source == SOURCES["tesla"]) == (v.make == "Tesla")
        assert v.definition_id == f"{v.make}_{v.model}_{v.year}".lower().replace(" ", "-")
        assert 2014 <= v.year <= END.year
    assert fleet.start == END - timedelta(days=4) and fleet.end == END


def test_ev_share_is_about_sixty_percent(big_fleet: Fleet) -> None:
    share = len(evs(big_fleet)) / len(big_fleet.vehicles)
    assert 0.4 <= share <= 0.8


def test_grants_and_restricted_share(fleet: Fleet) -> None:
    perms = []
    for v in fleet.vehicles.values():
        assert all(g.grantee == LICENSE.client_id and g.expires_at > fleet.end for g in v.grants)
        perms.append(v.grants[0].permissions if v.grants else None)
    assert perms.count(None) == 1 and perms.count((1,)) == 2  # 25 % of 12 = 3: one without, two non-location
    assert perms.count(FULL_GRANT) == 9
    v = next(v for v in fleet.vehicles.values() if v.grants and v.grants[0].permissions == (1,))
    assert v.privileges_for(LICENSE.client_id.lower(), fleet.end) == {1}


def test_series_layout_and_types(fleet: Fleet) -> None:
    catalog = signal_catalog()
    for t, s in fleet.series.items():
        assert s.columns[0] == "ts" and s.schema["ts"] == pl.Datetime("us", "UTC")
        assert s.columns[-2:] == ["latitude", "longitude"]
        for c in s.columns[1:-2]:
            assert c in catalog, c
            assert s.schema[c] == (pl.Utf8 if catalog[c].gql_type == "String" else pl.Float64)
        assert s.null_count().sum_horizontal()[0] == 0
        ev = fleet.vehicles[t].powertrain == "ELECTRIC"
        assert set(s[R.POWERTRAIN_TYPE].unique()) == {fleet.vehicles[t].powertrain}
        assert (R.SOC in s.columns) == ev and (R.FUEL in s.columns) != ev


def test_every_minute_has_a_sample_and_sampling_rates(fleet: Fleet) -> None:
    start = fleet.start.timestamp()
    n_buckets = math.ceil((fleet.end.timestamp() - start) / 60)
    for s in fleet.series.values():
        ts = epoch_s(s)
        assert np.all(np.diff(ts) > 0) and ts[0] >= start and ts[-1] < fleet.end.timestamp()
        assert len(np.unique(((ts - start) // 60).astype(int))) == n_buckets
        dt = np.diff(ts)
        moving = s["speed"].to_numpy()[:-1] > 0
        assert np.all(dt[moving] <= 10)  # 10 s while driving
        assert np.median(dt[~moving]) == 60  # a minute while parked


def test_odometer_is_the_integral_of_speed(fleet: Fleet) -> None:
    for s in fleet.series.values():
        ts, v, odo = epoch_s(s), s["speed"].to_numpy(), s[R.ODOMETER].to_numpy()
        assert np.all(np.diff(odo) >= 0) and np.all(v >= 0) and v.max() < 170
        integral = np.sum(0.5 * (v[1:] + v[:-1]) * np.diff(ts)) / 3600.0
        assert integral == pytest.approx(odo[-1] - odo[0], rel=0.01)
        assert odo[-1] - odo[0] > 5.0  # everyone drove somewhere in four days


def test_soc_bounds_and_energy_balance(big_fleet: Fleet) -> None:
    truth = big_fleet.truth_vehicles
    checked = 0
    for t in evs(big_fleet):
        s = big_fleet.series[t]
        ts, soc, power = epoch_s(s), s[R.SOC].to_numpy(), s[R.BATTERY_POWER].to_numpy()
        assert soc.min() >= 0.0 and soc.max() <= 100.0
        gross = truth.filter(pl.col("token_id") == t)["battery_gross_kwh"][0]
        usable = gross * s[R.SOH].to_numpy() / 100.0
        for a, b in ignition_runs(s):
            if b >= len(s):
                continue
            kwh = np.sum(power[a:b] * np.diff(ts[a : b + 1])) / 3.6e6  # power is the mean to the next sample
            trapezoid = np.sum(0.5 * (power[a : b + 1][1:] + power[a:b]) * np.diff(ts[a : b + 1])) / 3.6e6
            drop = (soc[a] - soc[b]) / 100.0 * usable[a]
            if drop > 0.5:
                assert kwh == pytest.approx(drop, rel=0.01)
                assert trapezoid == pytest.approx(drop, rel=0.1)
                checked += 1
    assert checked > 20


def test_charging_raises_soc(big_fleet: Fleet) -> None:
    kinds = set()
    for t in evs(big_fleet):
        s = big_fleet.series[t]
        charging = s[R.IS_CHARGING].to_numpy() > 0
        if not charging.any():
            continue
        soc, kw = s[R.SOC].to_numpy(), s[R.CHARGING_POWER].to_numpy()
        idx = np.flatnonzero(charging[:-1])
        assert np.all(soc[idx + 1] > soc[idx])
        assert np.all(s[R.BATTERY_POWER].to_numpy()[charging] < 0)
        assert np.all(s[R.IGNITION].to_numpy()[charging] == 0)
        assert kw[charging].max() <= 150.0 + 1e-6 and kw[~charging].max() == 0.0
        kinds |= {"AC" if k < 12 else "DC" for k in kw[charging]}
    assert "AC" in kinds  # overnight home charging; DC fast charging is checked below


def test_dc_fast_charging_tapers_above_80_percent() -> None:
    rng = np.random.default_rng(1)
    p = draw_params(rng, 1, "ELECTRIC", END)
    t0 = int(END.timestamp()) // 60 * 60
    sim = initial_sim(p, rng, t0=t0, t_start=t0, t_end=t0 + 86400, faults=[], source="", end_year=END.year)
    sim.soc = 25.0
    sim.charge(dc=True, target_soc=95.0, charger_kw=150.0)
    s, _ = sim.frames(t0, t0 + 86400)
    soc, kw = s[R.SOC].to_numpy(), s[R.CHARGING_POWER].to_numpy()
    assert np.all(np.diff(soc) > 0) and soc[-1] == pytest.approx(95.0, abs=0.5)
    flat, taper = kw[soc < 79.0], kw[soc > 81.0]
    assert np.allclose(flat, min(150.0, p.dc_max_kw))
    assert np.all(np.diff(taper) < 0) and taper[-1] < 0.4 * flat[0]
    assert s[R.BATTERY_TEMP][-1] > s[R.BATTERY_TEMP][0] + 3.0
    ts = epoch_s(s)
    usable = p.battery_gross_kwh * s[R.SOH][0] / 100.0
    added = -np.sum(s[R.BATTERY_POWER].to_numpy()[:-1] * np.diff(ts)) / 3.6e6
    assert added == pytest.approx((soc[-1] - soc[0]) / 100.0 * usable, rel=0.01)


def test_signal_ranges_are_plausible(big_fleet: Fleet) -> None:
    for t, s in big_fleet.series.items():
        ign = s[R.IGNITION].to_numpy() > 0
        v12 = s[R.V12].to_numpy()
        assert v12.min() > 8.5 and v12.max() < 15.0
        assert np.all(v12[ign & (s["speed"].to_numpy() > 0)] > 13.5)
        assert s[R.AIR].min() > -40 and s[R.AIR].max() < 50
        if big_fleet.vehicles[t].powertrain == "ELECTRIC":
            assert s[R.BATTERY_TEMP].min() > -40 and s[R.BATTERY_TEMP].max() < 80
            assert s[R.BATTERY_RANGE].min() >= 0 and s[R.BATTERY_RANGE].max() < 800
            soh = s[R.SOH].to_numpy()
            assert soh.min() >= 70 and soh[-1] < soh[0]
        else:
            fuel, rpm = s[R.FUEL].to_numpy(), s[R.RPM].to_numpy()
            assert fuel.min() >= 0.0 and fuel.max() <= 100.0
            assert np.all(rpm[~ign] == 0) and np.all((rpm[ign] >= 700) & (rpm[ign] < 4500))
            assert s[R.COOLANT].max() < 100
            load = s[R.ENGINE_LOAD].to_numpy()[ign]
            assert load.min() >= 8 and load.max() <= 100


def test_tire_pressure_follows_temperature(fleet: Fleet) -> None:
    for t, s in fleet.series.items():
        if t in set(fleet.truth_faults["token_id"]):
            continue
        air = s[R.AIR].to_numpy()
        for name in TIRE_SIGNALS:
            cold_corrected = s[name].to_numpy() - 0.9 * (air - 20.0)
            assert 225 < np.median(cold_corrected) < 255


def test_faults_are_recorded_and_visible(big_fleet: Fleet) -> None:
    faults = big_fleet.truth_faults
    assert faults.schema == {
        "token_id": pl.Int64,
        "fault": pl.Utf8,
        "signal": pl.Utf8,
        "start": pl.Datetime("us", "UTC"),
        "end": pl.Datetime("us", "UTC"),
        "detail": pl.Utf8,
    }
    assert 0.2 <= faults["token_id"].n_unique() / len(big_fleet.vehicles) <= 0.3
    assert set(faults["fault"]) == {"tire_leak", "weak_12v", "battery_overheat"}
    for f in faults.iter_rows(named=True):
        s = big_fleet.series[f["token_id"]]
        assert f["start"] >= big_fleet.start and f["end"] <= big_fleet.end and f["signal"] in s.columns
        inside = s.filter((pl.col("ts") >= f["start"]) & (pl.col("ts") < f["end"]))
        outside = s.filter((pl.col("ts") < f["start"]) | (pl.col("ts") >= f["end"] + timedelta(hours=3)))
        detail = json.loads(f["detail"])
        if f["fault"] == "tire_leak":
            others = [c for c in TIRE_SIGNALS if c != f["signal"]]
            gap = (inside[f["signal"]] - inside.select(pl.mean_horizontal(others)).to_series()).to_numpy()
            days = (f["end"] - f["start"]).total_seconds() / 86400
            assert gap[-30:].mean() < -0.6 * detail["kpa_per_day"] * days + 5.0
            assert gap[-30:].mean() < -2.0
            if outside.height:
                out_gap = outside[f["signal"]] - outside.select(pl.mean_horizontal(others)).to_series()
                assert out_gap.abs().max() < 8.0
        elif f["fault"] == "weak_12v":
            parked_in = inside.filter(pl.col(R.IGNITION) == 0)[R.V12]
            assert parked_in.min() < 11.9
            assert outside.filter(pl.col(R.IGNITION) == 0)[R.V12].min() > 12.3
        elif inside[R.IGNITION].sum() >= 30:  # visible once the pack was driven for 5 minutes
            excess_in = (inside[R.BATTERY_TEMP] - inside[R.AIR]).max()
            excess_out = (outside[R.BATTERY_TEMP] - outside[R.AIR]).max()
            assert excess_in > excess_out + 8.0


def test_harsh_events(big_fleet: Fleet) -> None:
    names = set()
    total = 0
    for t, e in big_fleet.events.items():
        assert e.schema == R.EVENT_SCHEMA
        if e.is_empty():
            continue
        total += e.height
        names |= set(e["name"])
        assert (e["source"] == big_fleet.vehicles[t].source).all()
        assert e["ts"].min() >= big_fleet.start and e["ts"].max() < big_fleet.end
        assert (e["duration_ns"] > 0).all() and e["ts"].is_sorted()
        meta = [json.loads(m) for m in e["metadata"]]
        assert all(m["peak_ms2"] >= 3.0 for m in meta)
        # the car was driving then: the last sample at or before the event has ignition on
        s = big_fleet.series[t].select("ts", R.IGNITION)
        joined = e.select("ts").join_asof(s, on="ts", strategy="backward", tolerance=timedelta(seconds=10))
        assert (joined[R.IGNITION] == 1).all()
    assert total > 0
    assert names <= {"behavior.harshBraking", "behavior.extremeBraking", "behavior.harshAcceleration"}
    assert "behavior.harshBraking" in names


def test_ground_truth_table(big_fleet: Fleet) -> None:
    tv = big_fleet.truth_vehicles
    assert tv["token_id"].to_list() == list(big_fleet.vehicles)
    ev = tv.filter(pl.col("powertrain") == "ELECTRIC")
    ice = tv.filter(pl.col("powertrain") == "COMBUSTION")
    for c in ("battery_gross_kwh", "consumption_base_kwh_per_100km", "aux_kw", "soh_start", "soh_end"):
        assert ev[c].is_nan().sum() == 0 and ice[c].is_nan().all(), c
    for c in ("fuel_base_l_per_100km", "tank_l", "idle_l_per_h"):
        assert ice[c].is_nan().sum() == 0 and ev[c].is_nan().all(), c
    assert (ev["soh_end"] < ev["soh_start"]).all()
    spread = ev["consumption_base_kwh_per_100km"].max() / ev["consumption_base_kwh_per_100km"].min()
    assert 1.1 < spread < 2.0
    for r in tv.iter_rows(named=True):
        v = big_fleet.vehicles[r["token_id"]]
        assert (r["make"], r["model"], r["year"], r["powertrain"]) == (v.make, v.model, v.year, v.powertrain)


def test_consumption_ranking_is_learnable(big_fleet: Fleet) -> None:
    """Per-trip kWh/km fitted on speed², cold and time/km with one intercept per EV ranks EVs like the truth."""
    ids = evs(big_fleet)
    rows, y, who = [], [], []
    for j, t in enumerate(ids):
        s = big_fleet.series[t]
        ts, v = epoch_s(s), s["speed"].to_numpy()
        air, power = s[R.AIR].to_numpy(), s[R.BATTERY_POWER].to_numpy() / 1000.0
        for a, b in ignition_runs(s):
            if b >= len(s):
                continue
            dt = np.diff(ts[a : b + 1])
            km = np.sum(v[a:b] * dt) / 3600.0
            if km < 1.0:
                continue
            v2 = np.sum(v[a:b] ** 3 * dt) / 3600.0 / km
            cold = np.mean(np.maximum(0.0, 15.0 - air[a:b]))
            rows.append([v2 / 1e4 - 0.25, cold, dt.sum() / 36.0 / km])
            y.append(np.sum(power[a:b] * dt) / 36.0 / km)
            who.append(j)
    dummies = np.zeros((len(y), len(ids)))
    dummies[np.arange(len(y)), who] = 1.0
    coef, *_ = np.linalg.lstsq(np.hstack([dummies, np.array(rows)]), np.array(y), rcond=None)
    fitted = coef[: len(ids)] + 2.0 * coef[-1]  # kWh/100 km at 50 km/h, 20 °C
    tv = big_fleet.truth_vehicles.filter(pl.col("token_id").is_in(ids))
    truth = dict(zip(tv["token_id"], tv["consumption_base_kwh_per_100km"] + 2.0 * tv["aux_kw"], strict=True))
    true = np.array([truth[t] for t in ids])
    spearman = np.corrcoef(fitted.argsort().argsort(), true.argsort().argsort())[0, 1]
    assert spearman > 0.7
    assert 5.0 < coef[-3] < 12.0  # aero: the truth's coefficients are 5–9 kWh/100 km per (100 km/h)²


def test_recorded_speed_traces_replace_synthetic_profiles() -> None:
    from connectors.dimo.emulator.replay import load_cmap_speed_traces

    traces = load_cmap_speed_traces(CMAP_DIR)
    f = simulate_fleet(LICENSE, vehicles=3, days=2, seed=5, end=END, speed_traces=traces)
    top = max(t.max() for t in traces)
    for s in f.series.values():
        assert 0 < s["speed"].max() <= top + 1e-9
        ts, v, odo = epoch_s(s), s["speed"].to_numpy(), s[R.ODOMETER].to_numpy()
        assert np.sum(0.5 * (v[1:] + v[:-1]) * np.diff(ts)) / 3600.0 == pytest.approx(
            odo[-1] - odo[0], rel=0.02
        )


def test_edge_cases() -> None:
    empty = simulate_fleet(LICENSE, vehicles=0, days=1, seed=0, end=END)
    assert empty.vehicles == {} and empty.truth_vehicles.height == 0 and empty.truth_faults.height == 0
    short = simulate_fleet(LICENSE, vehicles=2, days=0.25, seed=0, end=END)
    for s in short.series.values():
        assert s["ts"].min() >= short.start
    with pytest.raises(ConfigError, match="days"):
        simulate_fleet(LICENSE, vehicles=2, days=0, seed=0, end=END)
    with pytest.raises(ConfigError, match="restricted_fraction"):
        simulate_fleet(LICENSE, vehicles=2, days=1, seed=0, end=END, restricted_fraction=1.5)
    for days in (math.nan, math.inf):
        with pytest.raises(ConfigError, match="days"):
            simulate_fleet(LICENSE, vehicles=2, days=days, seed=0, end=END)


def test_more_vehicles_than_names_is_refused_not_a_hang() -> None:
    with pytest.raises(ConfigError, match=f"vehicles <= {NAME_COUNT}"):
        simulate_fleet(LICENSE, vehicles=NAME_COUNT + 1, days=1, seed=0, end=END)
    taken = {f"name {i}" for i in range(NAME_COUNT - 1)}
    rng = np.random.default_rng(0)
    assert mnemonic(rng, taken) in taken and len(taken) == NAME_COUNT
    with pytest.raises(ConfigError, match=f"at most {NAME_COUNT} vehicles"):
        mnemonic(rng, taken)  # used to draw forever
