"""Fleet charging from telemetry (``pipelines._charging``, ``depin plan``, the ``plan-charging`` flow): site
files whose errors name the field, the windows, each EV's need from its own telemetry, the plan written as
Parquet and a plot of exactly its data, the flow's artifacts and the published planner.

The telemetry is the serving fleet (tests/support/serving: 4 EVs, 6 combustion cars, 2 days); the range
function is replaced by a fixed consumption here (``kwh_per_100km``); tests/e2e/test_charging.py calls the
real one through a gateway.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from depin_core import plots as P
from depin_core.errors import ConfigError
from gpu_jobs.charging import check
from gpu_jobs.models import features as F
from pipelines._charging import (
    PlanChargingParams,
    Windows,
    fleet_states,
    load_site,
    parse_site,
    run_plan,
    trip_plan,
)
from pipelines.cli import app
from tests.support.fleet_data import FleetData

SITE = {"chargers": 2, "charger_kw": 11.0, "grid_cap_kw": 16.0, "start": "2026-11-24T12:00:00Z"}


def write_site(path: Path, **kw: Any) -> Path:
    path.write_text(json.dumps({**SITE, **kw}))
    return path


# --------------------------------------------------------------------------------------------- site.json


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"charger_kw": 11}, "field chargers: Field required"),
        ({**SITE, "chargers": 0}, "field chargers: Input should be greater than 0"),
        ({**SITE, "timezone": "Mars/Olympus"}, "field timezone: Value error, 'Mars/Olympus' is not an IANA"),
        ({**SITE, "plug_in": "25:00"}, "field plug_in:"),
        ({**SITE, "vehicles": {"7": {"max_kw": -1}}}, "field vehicles.7.max_kw:"),
        ({**SITE, "start": "2026-11-24T12:00:00"}, "field start: Value error, start must be timezone-aware"),
        ({**SITE, "slots": 4, "tariff": [0.2, 0.3]}, "tariff has 2 prices but slots=4"),
        ({**SITE, "chargrs": 2}, "field chargrs: Extra inputs are not permitted"),
    ],
)
def test_site_file_errors_name_the_field(tmp_path: Path, doc: dict[str, Any], field: str) -> None:
    path = tmp_path / "site.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as err:
        load_site(path)
    assert str(err.value).startswith(f"{path}: ") and field in str(err.value)


def test_a_missing_or_broken_site_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--site .*nope.json: no such file; write a site.json"):
        load_site(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="cannot read it as JSON"):
        load_site(tmp_path / "bad.json")


def test_without_start_the_horizon_starts_at_the_latest_telemetry_on_the_slot_grid() -> None:
    site = parse_site({"chargers": 1, "charger_kw": 7.4, "slot_minutes": 30, "timezone": "Europe/Berlin"})
    assert not site.start_given
    start = site.site_for(datetime(2026, 11, 24, 22, 47, tzinfo=UTC)).start
    assert start == datetime(2026, 11, 24, 23, 0, tzinfo=UTC) and str(start.tzinfo) == "Europe/Berlin"
    given = parse_site(SITE)
    assert given.start_given and given.site_for(datetime(2030, 1, 1, tzinfo=UTC)).start == given.site.start


def test_windows_in_site_time_with_per_vehicle_overrides() -> None:
    w = Windows(timezone="Europe/Berlin", vehicles={"7": {"plug_in": "20:30", "departure": "06:00"}})
    noon = datetime(2026, 11, 24, 11, 0, tzinfo=UTC)  # 12:00 in Berlin
    arrive, depart = w.window("1", noon)
    assert (arrive.isoformat(), depart.isoformat()) == (
        "2026-11-24T18:00:00+01:00",
        "2026-11-25T07:00:00+01:00",
    )
    arrive, depart = w.window("7", noon)
    assert (arrive.isoformat(), depart.isoformat()) == (
        "2026-11-24T20:30:00+01:00",
        "2026-11-25T06:00:00+01:00",
    )
    night = datetime(2026, 11, 24, 23, 0, tzinfo=UTC)  # inside the window: plugged in already
    arrive, depart = w.window("1", night)
    assert (arrive, depart.isoformat()) == (night, "2026-11-25T07:00:00+01:00")
    at_departure = datetime(2026, 11, 25, 6, 0, tzinfo=UTC)  # 07:00 in Berlin: the next evening
    arrive, depart = w.window("1", at_departure)
    assert (arrive.isoformat(), depart.isoformat()) == (
        "2026-11-25T18:00:00+01:00",
        "2026-11-26T07:00:00+01:00",
    )
    with pytest.raises(ConfigError, match="vehicle 1: plug_in equals departure"):
        Windows(plug_in=time(7), departure=time(7)).window("1", noon)


# --------------------------------------------------------------------------------------------- fleet


def test_each_ev_state_comes_from_its_own_telemetry(serving_fleet: FleetData) -> None:
    fleet = fleet_states(serving_fleet.telemetry)
    df = pl.read_delta(str(serving_fleet.telemetry))
    evs = df.filter(pl.col(F.SOC).is_not_null())["token_id"].unique().sort().to_list()
    assert [v.token_id for v in fleet.vehicles] == evs and len(evs) == 4
    assert len(fleet.skipped) == df["token_id"].n_unique() - 4 == 6
    assert all("no state of charge" in s["reason"] for s in fleet.skipped)
    span = (df["timestamp"].max() - df["timestamp"].min()).total_seconds() / 86400  # type: ignore[operator]
    assert fleet.span_days == pytest.approx(max(span, 1.0))
    for v in fleet.vehicles:
        own = df.filter(pl.col("token_id") == v.token_id).sort("timestamp")
        soc = own.filter(pl.col(F.SOC).is_not_null())
        assert v.soc_pct == pytest.approx(soc[F.SOC][-1]) and v.soc_at == soc["timestamp"][-1]
        assert v.gross_kwh == own[F.GROSS].drop_nulls()[-1]
        assert v.usable_kwh == pytest.approx(v.gross_kwh * own[F.SOH].drop_nulls()[-1] / 100, abs=1e-3)
        km = own[F.ODOMETER].max() - own[F.ODOMETER].min()  # type: ignore[operator]
        assert v.km_per_day == pytest.approx(km / fleet.span_days, abs=1e-3) and v.km_per_day > 0
        body = trip_plan(v)
        assert body["km"] == v.km_per_day and body["soc"] == v.soc_pct and 0 < body["mean_speed"] < 130


@pytest.mark.parametrize(("kwh_per_100km", "capped"), [(18.0, False), (190.0, True)])
def test_run_plan_writes_the_plan_and_its_plot(
    serving_fleet: FleetData, tmp_path: Path, kwh_per_100km: float, capped: bool
) -> None:
    """Need = min(km × kWh/100 km / 100, (100 − SoC)% × usable kWh): a plausible consumption is not capped,
    an absurd one is capped by the battery's room."""
    from gpu_jobs.models.charging.plots import plan_data

    params = PlanChargingParams(
        dataset=str(serving_fleet.telemetry),
        site=write_site(tmp_path / "site.json"),
        kwh_per_100km=kwh_per_100km,
        solvers=["exact"],
        out=tmp_path / "plans",
    )
    result, problem, plan = run_plan(params)
    fleet = fleet_states(serving_fleet.telemetry)
    for v, ev in zip(fleet.vehicles, problem.vehicles, strict=True):
        drive = v.km_per_day * kwh_per_100km / 100
        room = (100 - v.soc_pct) / 100 * v.usable_kwh
        assert ev.need_kwh == pytest.approx(min(drive, room), abs=2e-3)
        assert (room < drive) == capped
        assert (ev.arrive_slot, ev.depart_slot) == (24, 76)  # 18:00 → 07:00 UTC from a noon start
    assert result.vehicles == 4 and result.skipped == 6 and len(result.skipped_vehicles) == 6
    assert result.solver == "exact" and result.feasible and check(problem, plan) == []
    assert result.consumption == f"fixed {kwh_per_100km:g} kWh/100 km"
    assert result.cost <= result.baseline_cost + 1e-9 and result.saving == pytest.approx(
        result.baseline_cost - result.cost, abs=1e-6
    )

    table = pq.read_table(result.plan_path)
    assert table.column_names == ["vehicle", "slot", "start", "kw"]
    rows = table.to_pylist()
    assert sorted((r["vehicle"], r["slot"]) for r in rows) == sorted(
        (v, s) for v, slots in plan.schedule.items() for s in slots
    )
    start = problem.site.start
    assert all(r["start"] == start + timedelta(minutes=15 * r["slot"]) and r["kw"] == 11.0 for r in rows)
    energy = sum(r["kw"] * 0.25 for r in rows)
    assert (
        energy == pytest.approx(result.energy_kwh, abs=1e-3) and result.energy_kwh >= result.need_kwh - 1e-6
    )

    png = Path(result.plot_path).read_bytes()
    data = plan_data(problem, plan)
    assert P.png_text(png)[P.DATA_KEY] == P.data_digest(data)  # the PNG shows exactly this data
    assert sum(data["chargers_in_use"]) == len(rows) and max(data["chargers_in_use"]) <= 2
    assert max(data["power_kw"]) <= 16.0 and data["tariff"] == problem.site.prices()
    by_vehicle = {r["vehicle"]: r for r in result.per_vehicle}
    assert {r["status"] for r in result.per_vehicle if r["vehicle"] in by_vehicle} >= {"ok"}
    assert sum(1 for r in result.per_vehicle if r["status"].startswith("skipped: no state of charge")) == 6


def test_a_window_outside_the_horizon_is_a_site_error(serving_fleet: FleetData, tmp_path: Path) -> None:
    first = fleet_states(serving_fleet.telemetry).vehicles[0].token_id
    site = write_site(tmp_path / "site.json", slots=20)  # 12:00 → 17:00: before the 18:00 plug-in
    params = PlanChargingParams(
        dataset=str(serving_fleet.telemetry), site=site, kwh_per_100km=18.0, out=tmp_path
    )
    with pytest.raises(
        ConfigError, match=rf"site.json: fleet row 0 \(token_id={first}\).*covers no whole slot"
    ):
        run_plan(params)


def test_an_override_for_a_vehicle_not_in_the_dataset_is_a_site_error(
    serving_fleet: FleetData, tmp_path: Path
) -> None:
    fleet = fleet_states(serving_fleet.telemetry)
    ev_id, ice = fleet.vehicles[0].token_id, fleet.skipped[0]["token_id"]
    overrides = {str(ev_id): {"max_kw": 7.4}, str(ice): {"plug_in": "20:00"}}  # a known EV and a known non-EV
    params = PlanChargingParams(
        dataset=str(serving_fleet.telemetry), site=write_site(tmp_path / "ok.json", vehicles=overrides),
        kwh_per_100km=18.0, out=tmp_path,
    )  # fmt: skip
    result, problem, _ = run_plan(params)
    assert result.feasible
    assert (
        next(ev.max_kw for ev in problem.vehicles if ev.vehicle == str(ev_id)) == 7.4
    )  # the override applied
    typo = write_site(tmp_path / "typo.json", vehicles={**overrides, "999999": {"max_kw": 7.4}})
    with pytest.raises(
        ConfigError, match=r"site.json: vehicles: 999999 not in the dataset .*fix the token ids"
    ):
        run_plan(params.model_copy(update={"site": typo}))


# --------------------------------------------------------------------------------------------- CLI


def test_depin_plan_prints_one_json_line(serving_fleet: FleetData, tmp_path: Path) -> None:
    site = write_site(tmp_path / "site.json", start=None, timezone="Europe/Berlin")  # from the telemetry
    args = ["plan", "--dataset", str(serving_fleet.telemetry), "--site", str(site), "--solver", "greedy"]
    args += ["--kwh-per-100km", "18", "--out", str(tmp_path / "plans"), "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, (res.output, res.exception)
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["solver"] == "greedy" and doc["cost"] == doc["baseline_cost"] and doc["saving"] == 0
    assert (doc["vehicles"], doc["skipped"]) == (4, 6) and Path(doc["plan_path"]).is_file()
    assert "plan by greedy: 4 EVs" in res.stderr
    start = datetime.fromisoformat(doc["site_start"])
    latest = fleet_states(serving_fleet.telemetry).latest
    assert start.utcoffset() == timedelta(hours=1) and latest <= start < latest + timedelta(minutes=15)
    rows = pq.read_table(doc["plan_path"]).to_pylist()
    assert rows and all(r["start"] == start + timedelta(minutes=15 * r["slot"]) for r in rows)

    bad = CliRunner().invoke(app, [*args[:5], "--solver", "quantum", "--json"])
    assert bad.exit_code != 0 and "--solver 'quantum': choose one of exact, anneal, dynex, greedy" in str(
        bad.exception
    )


# --------------------------------------------------------------------------------------------- the flow


@pytest.mark.usefixtures("prefect_backend")
def test_the_flow_records_the_plan_and_publishes_the_planner(
    serving_fleet: FleetData, tmp_path: Path
) -> None:
    from pipelines.charging import PlanChargingFlowParams, plan_charging
    from pipelines.params import PublishParams
    from serving.registry import Registry
    from tests.support.prefect_harness import artifacts, table

    params = PlanChargingFlowParams(
        plan=PlanChargingParams(
            dataset=str(serving_fleet.telemetry),
            site=write_site(tmp_path / "site.json"),
            solvers=["exact"],
            kwh_per_100km=18.0,
            out=tmp_path / "plans",
        ),
        publish=PublishParams(
            name="charging-plan", registry=tmp_path / "registry", gateway_url="http://127.0.0.1:9"
        ),
        function_solvers=["greedy"],
        models=tmp_path / "models",
    )
    run = plan_charging(params)
    assert run.plan.solver == "exact" and run.plan.feasible and Path(run.plan.plan_path).is_file()
    rows = table(artifacts("charging-plan-vehicles")[0])
    assert [r["vehicle"] for r in rows] == [r["vehicle"] for r in run.plan.per_vehicle] and len(rows) == 10
    report = artifacts("charging-plan")[0].data
    assert (
        "exact ok" in report
        and "data:image/png;base64," in report
        and "skipped (no SoC/battery): 6" in report
    )

    assert run.function_name == "charging-plan" and run.function_version
    assert run.function_url == "http://127.0.0.1:9/v1/functions/charging-plan@prod/invoke"
    registry = Registry(tmp_path / "registry", trusted=None)
    assert registry.resolve("charging-plan", "prod") == run.function_version
    bundle = registry.bundle("charging-plan", run.function_version)
    config = json.loads((bundle.path / "model" / "model.json").read_text())
    assert config["planner"]["solvers"] == ["greedy"] and bundle.manifest.family == "charging"

    again = plan_charging(params)  # the same planner: the same function version
    assert again.function_version == run.function_version
