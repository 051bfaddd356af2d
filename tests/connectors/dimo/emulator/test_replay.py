"""Replay files (long rows → fleet) and the CMAP real-trace import."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from connectors.dimo.emulator.fleet import Fleet, bundled_cmap_dir
from connectors.dimo.emulator.replay import (
    add_cmap_vehicles,
    cmap_replay_rows,
    fleet_to_long,
    load_cmap_trace,
    replay_fleet,
    write_replay_file,
)
from connectors.dimo.emulator.sim import render as R
from connectors.dimo.emulator.sim.catalog import FULL_GRANT
from connectors.dimo.emulator.sim.simulator import simulate_fleet
from connectors.dimo.emulator.state import make_license
from depin_core.errors import ConfigError

CMAP_DIR = bundled_cmap_dir()
END = datetime(2026, 5, 4, 7, 15, 0, tzinfo=UTC)
LICENSE = make_license(3)


@pytest.fixture(scope="module")
def small_fleet() -> Fleet:
    return simulate_fleet(LICENSE, vehicles=3, days=2, seed=4, end=END)


@pytest.fixture(scope="module")
def cmap_fleet(small_fleet: Fleet) -> Fleet:
    return add_cmap_vehicles(small_fleet, CMAP_DIR, seed=4)


def raw_cmap(name: str) -> pl.DataFrame:
    return pl.read_csv(CMAP_DIR / name)


# ---- CMAP ---------------------------------------------------------------------------------------------
def test_load_cmap_trace_honours_the_file_quirks() -> None:
    path = CMAP_DIR / "4115985_1_2007-04-23.csv"
    assert b"\r\n" in path.read_bytes()[:200]  # the quirk this test is about
    tr = load_cmap_trace(path)
    raw = raw_cmap(path.name)
    assert tr.schema == {"ts": pl.Datetime("us", "UTC"), "speed_kmh": pl.Float64}
    assert tr.height == raw.height == 636
    # local Chicago time (CDT, UTC-5) converted to UTC
    assert tr["ts"][0] == datetime(2007, 4, 23, 11, 47, 51, tzinfo=UTC)
    assert np.allclose(tr["speed_kmh"].to_numpy(), raw["speed_mph"].to_numpy() * 1.609344)
    assert 42 * 1.609 < tr["speed_kmh"].max() < 44 * 1.61
    gaps = (tr["ts"].diff().dt.total_seconds() > 1).sum()
    assert gaps == (raw["timestep"] > 1).sum() == 9


def test_load_cmap_trace_rejects_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "x.csv"
    bad.write_text("timestamp,speed\r\n2007-04-23 06:47:51,1\r\n")
    with pytest.raises(ConfigError, match=r"\['timestep', 'speed_mph'\]"):
        load_cmap_trace(bad)
    with pytest.raises(ConfigError, match=r"no \.csv files"):
        add_cmap_vehicles(
            simulate_fleet(LICENSE, vehicles=0, days=1, seed=0, end=END), tmp_path / "nope", seed=0
        )


def test_cmap_vehicles_are_added(small_fleet: Fleet, cmap_fleet: Fleet) -> None:
    new = [t for t in cmap_fleet.vehicles if t not in small_fleet.vehicles]
    assert len(new) == 3 and min(new) > max(small_fleet.vehicles)
    assert len(small_fleet.vehicles) == 3  # the input fleet is left alone
    origins = cmap_fleet.truth_vehicles.filter(pl.col("token_id").is_in(new))["origin"].to_list()
    assert sorted(origins) == sorted(f"cmap:{p.stem}" for p in CMAP_DIR.glob("*.csv"))
    for t in new:
        v = cmap_fleet.vehicles[t]
        assert v.powertrain == "ELECTRIC" and v.grants[0].permissions == FULL_GRANT
        assert v.grants[0].grantee == LICENSE.client_id
        assert cmap_fleet.events[t].schema == R.EVENT_SCHEMA
    assert cmap_fleet.start == small_fleet.start and cmap_fleet.end == small_fleet.end


def test_cmap_rows_are_the_recorded_seconds_shifted_into_the_window(cmap_fleet: Fleet) -> None:
    by_origin = dict(
        zip(cmap_fleet.truth_vehicles["origin"], cmap_fleet.truth_vehicles["token_id"], strict=True)
    )
    for path in sorted(CMAP_DIR.glob("*.csv")):
        tr = load_cmap_trace(path)
        s = cmap_fleet.series[by_origin[f"cmap:{path.stem}"]]
        # the whole recording moved by whole days (time of day kept) into the window's last 24 h
        first_moving = s.filter(pl.col("speed") > 0)["ts"][0] - tr.filter(pl.col("speed_kmh") > 0)["ts"][0]
        days = first_moving.total_seconds() / 86400.0
        assert days == int(days)
        shifted = tr.with_columns(pl.col("ts") + timedelta(days=days))
        assert shifted["ts"].max() < cmap_fleet.end and shifted["ts"].max() >= cmap_fleet.end - timedelta(
            days=1
        )
        matched = shifted.join(s.select("ts", "speed"), on="ts", how="inner")
        assert matched.height == tr.height  # every recorded (non-gap) second is a sample
        assert np.allclose(matched["speed"].to_numpy(), matched["speed_kmh"].to_numpy())
        # between and around the trips the car is parked and sampled every minute
        rest = s.join(shifted.select("ts"), on="ts", how="anti")
        assert (rest["speed"] == 0).all() and rest.height > 1000
        ts = s["ts"].dt.epoch("us").to_numpy() / 1e6
        v, odo = s["speed"].to_numpy(), s[R.ODOMETER].to_numpy()
        assert np.all(np.diff(ts) > 0) and np.all(np.diff(odo) >= 0)
        recorded_km = np.sum(tr["speed_kmh"].to_numpy()) / 3600.0
        assert odo[-1] - odo[0] == pytest.approx(recorded_km, rel=0.05, abs=0.01)
        soc, power = s[R.SOC].to_numpy(), s[R.BATTERY_POWER].to_numpy()
        assert soc.min() >= 0 and soc.max() <= 100
        moving = v > 0
        assert power[moving].min() > -80_000 and power[moving].mean() > 500  # driving discharges the pack


def test_cmap_recording_is_clipped_to_a_short_window() -> None:
    end = datetime(2026, 5, 4, 20, 0, tzinfo=UTC)
    short = add_cmap_vehicles(
        simulate_fleet(LICENSE, vehicles=0, days=0.5, seed=0, end=end), CMAP_DIR, seed=0
    )
    for s in short.series.values():
        assert s["ts"].min() >= short.start and s["ts"].max() < short.end


def test_cmap_replay_rows_serve_through_replay(tmp_path: Path) -> None:
    rows = cmap_replay_rows(CMAP_DIR, end=END, seed=9)
    assert rows.columns == ["token_id", "signal", "ts", "value", "value_str"]
    assert rows["token_id"].n_unique() == 3
    path = tmp_path / "cmap.parquet"
    rows.write_parquet(path)
    fleet = replay_fleet(LICENSE, path)
    assert len(fleet.vehicles) == 3
    assert {v.powertrain for v in fleet.vehicles.values()} == {"ELECTRIC"}
    top = max(load_cmap_trace(p)["speed_kmh"].max() for p in CMAP_DIR.glob("*.csv"))
    assert max(s["speed"].max() for s in fleet.series.values()) == pytest.approx(top)
    assert fleet.end <= END + timedelta(seconds=1)


# ---- replay files -------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_replay_round_trip(small_fleet: Fleet, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"fleet{suffix}"
    write_replay_file(small_fleet, path)
    back = replay_fleet(LICENSE, path)
    assert set(back.series) == set(small_fleet.series)
    for t, s in small_fleet.series.items():
        assert back.series[t].equals(s)
        assert back.vehicles[t].powertrain == small_fleet.vehicles[t].powertrain
        assert back.vehicles[t].make == "Replay"
        assert back.vehicles[t].privileges_for(LICENSE.client_id, back.end) >= set(FULL_GRANT)
    assert back.start == min(s["ts"].min() for s in small_fleet.series.values())
    assert back.end > max(s["ts"].max() for s in small_fleet.series.values())
    assert fleet_to_long(back).equals(fleet_to_long(small_fleet))


def write_rows(tmp_path: Path, rows: dict[str, list[object]], name: str = "r.parquet") -> Path:
    path = tmp_path / name
    df = pl.DataFrame(rows)
    df.write_parquet(path) if name.endswith(".parquet") else df.write_csv(path)
    return path


def test_replay_location_powertrain_and_time_forms(tmp_path: Path) -> None:
    naive = [datetime(2026, 1, 1, 0, 0, s) for s in (0, 10)]
    path = write_rows(
        tmp_path,
        {
            "token_id": [5, 5, 5, 6],
            "signal": [
                "speed",
                "currentLocationCoordinates",
                "powertrainTractionBatteryStateOfChargeCurrent",
                "speed",
            ],
            "ts": [naive[0], naive[0], naive[1], naive[1]],
            "value": [12.0, None, 80.0, 3.0],
            "value_str": [None, "41.88,-87.63", None, None],
        },
    )
    f = replay_fleet(LICENSE, path)
    assert f.vehicles[5].powertrain == "ELECTRIC" and f.vehicles[6].powertrain == "COMBUSTION"
    s5 = f.series[5]
    assert s5.columns == [
        "ts",
        "powertrainTractionBatteryStateOfChargeCurrent",
        "speed",
        "latitude",
        "longitude",
    ]
    assert s5["ts"][0] == datetime(2026, 1, 1, tzinfo=UTC)  # naive means UTC
    assert s5.row(0) == (datetime(2026, 1, 1, tzinfo=UTC), None, 12.0, 41.88, -87.63)
    assert f.series[6].columns == ["ts", "speed"]
    assert f.events[5].is_empty() and f.truth_vehicles.is_empty()

    csv = write_rows(
        tmp_path,
        {
            "token_id": [7, 7],
            "signal": ["powertrainType", "speed"],
            "ts": ["2026-01-01T00:00:00Z", "2026-01-01T00:00:10+00:00"],
            "value": [None, 50.0],
            "value_str": ["COMBUSTION", None],
        },
        "r.csv",
    )
    g = replay_fleet(LICENSE, csv)
    assert g.vehicles[7].powertrain == "COMBUSTION"
    assert g.series[7].schema["powertrainType"] == pl.Utf8
    assert g.series[7]["speed"].to_list() == [None, 50.0]


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (
            {"token_id": [1], "signal": ["speed"], "ts": [datetime(2026, 1, 1)]},
            r"lacks column\(s\) \['value'\]",
        ),
        (
            {
                "token_id": [1, 1],
                "signal": ["speed", "Speed"],
                "ts": [datetime(2026, 1, 1)] * 2,
                "value": [1.0, 2.0],
            },
            r"unknown signal name\(s\) \['Speed'\]",
        ),
        (
            {"token_id": [1], "signal": ["powertrainType"], "ts": [datetime(2026, 1, 1)], "value": [1.0]},
            "lack a value",
        ),
        (
            {"token_id": [1], "signal": ["speed"], "ts": [datetime(2026, 1, 1)], "value": [None]},
            "lack a value",
        ),
        (
            {
                "token_id": [1],
                "signal": ["currentLocationCoordinates"],
                "ts": [datetime(2026, 1, 1)],
                "value": [None],
                "value_str": ["north"],
            },
            "lat,lon",
        ),
        ({"token_id": [1], "signal": ["speed"], "ts": [1], "value": [1.0]}, "column 'ts' has type"),
        (
            {"token_id": ["a"], "signal": ["speed"], "ts": [datetime(2026, 1, 1)], "value": [1.0]},
            "wrong type",
        ),
    ],
)
def test_replay_validation(tmp_path: Path, rows: dict[str, list[object]], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        replay_fleet(LICENSE, write_rows(tmp_path, rows))


def test_replay_file_errors(tmp_path: Path, small_fleet: Fleet) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        replay_fleet(LICENSE, tmp_path / "missing.parquet")
    other = tmp_path / "data.json"
    other.write_text("{}")
    with pytest.raises(ConfigError, match=r"use \.parquet or \.csv"):
        replay_fleet(LICENSE, other)
    with pytest.raises(ConfigError, match=r"use a \.parquet or \.csv"):
        write_replay_file(small_fleet, tmp_path / "out.txt")
    empty = write_rows(tmp_path, {"token_id": [], "signal": [], "ts": [], "value": []})
    with pytest.raises(ConfigError, match="no rows"):
        replay_fleet(LICENSE, empty)


def test_replay_window_comes_from_the_data(tmp_path: Path) -> None:
    t = datetime(2026, 2, 2, 12, tzinfo=UTC)
    path = write_rows(
        tmp_path,
        {
            "token_id": [1, 2],
            "signal": ["speed", "speed"],
            "ts": [t, t + timedelta(hours=5)],
            "value": [1.0, 2.0],
        },
    )
    f = replay_fleet(LICENSE, path)
    assert f.start == t and f.end == t + timedelta(hours=5, seconds=1)
    assert math.isclose(f.series[2]["speed"][0], 2.0)


def test_replay_duplicate_rows_keep_the_last(tmp_path: Path) -> None:
    t = datetime(2026, 2, 2, 12, tzinfo=UTC)
    path = write_rows(
        tmp_path,
        {
            "token_id": [1, 1, 1],
            "signal": ["speed"] * 3,
            "ts": [t, t, t + timedelta(seconds=1)],
            "value": [1.0, 2.0, 3.0],
        },
    )
    assert replay_fleet(LICENSE, path).series[1]["speed"].to_list() == [2.0, 3.0]
