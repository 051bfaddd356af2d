"""Fleet charging end to end, real processes on loopback: the DIMO emulator → ingest → the range function
published and served by a gateway process → the ``plan-charging`` flow, its solver chain starting on Dynex
(the fake Dynex gRPC service, driven by the official SDK) → the plan checked → the planner, published by the
flow as ``charging-plan``, invoked through the same gateway. Then the fallback: Dynex fails, the chain answers
with the exact solver and says why.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from eth_account.signers.local import LocalAccount

from connectors.dimo.emulator.server import EmulatorProcess
from tests.support.emulator_ingest import run
from tests.support.fakes.dynex import FakeDynex
from tests.support.prefect_harness import artifacts, prefect_session, table

pytestmark = pytest.mark.e2e

SIGNALS = [
    "speed",
    "powertrainTransmissionTravelledDistance",
    "exteriorAirTemperature",
    "powertrainType",
    "powertrainTractionBatteryStateOfChargeCurrent",
    "powertrainTractionBatteryGrossCapacity",
    "powertrainTractionBatteryStateOfHealth",
]
# one charger fewer than EVs and a grid cap below two chargers: the plan must queue the vehicles
SITE = {"chargers": 3, "charger_kw": 11.0, "grid_cap_kw": 20.0, "slot_minutes": 30, "slots": 48,
        "timezone": "Europe/Berlin", "plug_in": "18:00", "departure": "07:00"}  # fmt: skip


@pytest.fixture(scope="module")
def prefect_backend() -> Iterator[None]:
    with prefect_session():
        yield


@pytest.fixture(scope="module")
def telemetry(
    emulator: EmulatorProcess, window: tuple[datetime, datetime], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A day of the session emulator's fleet (4 EVs, 2 combustion cars) at 1-minute buckets."""
    out = tmp_path_factory.mktemp("charging-data") / "telemetry"
    until = window[1]
    asyncio.run(run(emulator, out, until - timedelta(hours=24), until, signals=SIGNALS))
    return out


@pytest.fixture
def dynex_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDynex]:
    """The fake Dynex service, and the environment the official SDK reads (the key never leaves it)."""
    with FakeDynex(seed=3) as fake:
        for var, value in {
            "DYNEX_SDK_KEY": fake.key,
            "DYNEX_GRPC_ENDPOINT": fake.endpoint,
            "DYNEX_COMPUTE_BACKEND": "cpu",
            "DYNEX_NUM_READS": "16",
            "DYNEX_ANNEALING_TIME": "100",
            "DYNEX_MAX_WALL_S": "60",
        }.items():
            monkeypatch.setenv(var, value)
        yield fake


def _invoke_when_served(
    url: str, ref: str, body: dict[str, object], within_s: float = 60.0
) -> httpx.Response:
    """Invoke ``ref`` once the gateway (polling its registry) routes it: bounded retries while it answers 404."""
    deadline = time.monotonic() + within_s
    while True:
        r = httpx.post(f"{url}/v1/functions/{ref}/invoke", json=body, timeout=120)
        if r.status_code != 404 or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


def test_plan_charging_on_dynex_then_the_planner_through_the_gateway(
    prefect_backend: None,
    telemetry: Path,
    range_artifact: Path,
    publisher: LocalAccount,
    dynex_env: FakeDynex,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gpu_jobs.charging import Plan, check
    from pipelines._charging import PlanChargingParams, fleet_states, load_site, snapshot, trip_plan
    from pipelines.charging import PlanChargingFlowParams, plan_charging
    from pipelines.params import PublishParams
    from serving.server import GatewayProcess
    from serving.settings import GatewaySettings
    from serving.targets import LocalTarget, publish_function

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEPIN_PUBLISHER_KEY", publisher.key.hex())  # the flow signs with the trusted key
    registry = tmp_path / "registry"
    publish_function(LocalTarget(registry, publisher), range_artifact, "range", "prod")
    site_path = tmp_path / "site.json"
    site_path.write_text(json.dumps(SITE))

    settings = GatewaySettings(
        registry_dir=registry, trusted_publishers=[publisher.address], poll_interval_s=0.1
    )
    with GatewayProcess(settings) as gw:
        params = PlanChargingFlowParams(
            plan=PlanChargingParams(
                dataset=str(telemetry),
                site=site_path,
                solvers=["dynex", "exact"],
                gateway_url=gw.base_url,
                out=tmp_path / "plans",
            ),
            publish=PublishParams(name="charging-plan", registry=registry, gateway_url=gw.base_url),
            models=tmp_path / "models",
        )
        run_ = plan_charging(params)
        result = run_.plan

        # the plan came from Dynex (the fake really received the QUBO), and passes the local check
        assert result.solver == "dynex" and result.attempts[0]["outcome"] == "ok", result.attempts
        assert (
            dynex_env.rpc_names()[:2] == ["CreateJob", "SubscribeJob"] and dynex_env.last_job().num_vars > 0
        )
        assert result.feasible and (result.vehicles, result.skipped) == (4, 2)
        rows = pq.read_table(result.plan_path).to_pylist()
        per_slot: dict[int, list[dict[str, object]]] = {}
        for r in rows:
            per_slot.setdefault(int(r["slot"]), []).append(r)  # type: ignore[arg-type]
        assert max(len(v) for v in per_slot.values()) <= 3
        assert max(sum(float(r["kw"]) for r in v) for v in per_slot.values()) <= 20.0 + 1e-9  # type: ignore[arg-type]
        energy = {
            str(v["vehicle"]): float(v["planned_kwh"]) for v in result.per_vehicle if "planned_kwh" in v
        }
        need = {str(v["vehicle"]): float(v["need_kwh"]) for v in result.per_vehicle if "need_kwh" in v}
        unmet = {u["vehicle"] for u in result.unmet}
        assert all(energy[v] >= need[v] - 1e-6 for v in need if v not in unmet)

        # each EV's consumption is what the range function answers for its next day
        assert result.consumption == f"range@prod at {gw.base_url}"
        fleet = fleet_states(telemetry)
        with httpx.Client(base_url=gw.base_url, timeout=30) as http:
            for v in fleet.vehicles:
                answer = http.post("/v1/functions/range@prod/invoke", json={"plan": trip_plan(v)}).json()
                row = next(r for r in result.per_vehicle if r["vehicle"] == str(v.token_id))
                v.kwh_per_100km = answer["outputs"][0]["kwh_per_100km"]
                assert row["kwh_per_100km"] == round(v.kwh_per_100km, 2)

        # the flow's artifacts: the per-vehicle table and the report with the plot
        vehicles = table(artifacts("charging-plan-vehicles")[0])
        assert {r["vehicle"] for r in vehicles} == {r["vehicle"] for r in result.per_vehicle}
        report = artifacts("charging-plan")[0].data
        assert "dynex ok" in report and "data:image/png;base64," in report

        # the planner as a function, through the gateway, on the same snapshot: the exact solver's plan is
        # feasible and no dearer than Dynex's
        assert run_.function_name == "charging-plan" and run_.function_version
        snap = snapshot(fleet, load_site(site_path))  # the flow's snapshot: same telemetry, same answers
        assert {ev.vehicle: round(ev.need_kwh, 2) for ev in snap.problem().vehicles} == need
        r = _invoke_when_served(gw.base_url, "charging-plan@prod", {"inputs": [snap.model_dump(mode="json")]})
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        served = Plan.model_validate({k: v for k, v in out.items() if k != "charging"})
        assert served.solver == "exact" and served.feasible and check(snap.problem(), served) == []
        assert served.cost <= result.cost + 1e-6
        assert len(out["charging"]) == sum(len(s) for s in served.schedule.values())
        assert r.json()["version"] == run_.function_version


@pytest.mark.parametrize("failure", ["error"])
def test_when_dynex_fails_the_chain_answers_with_the_next_solver(
    prefect_backend: None,
    telemetry: Path,
    dynex_env: FakeDynex,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    from pipelines._charging import PlanChargingParams
    from pipelines.charging import PlanChargingFlowParams, plan_charging

    monkeypatch.chdir(tmp_path)
    dynex_env.failure = failure  # type: ignore[assignment]
    site_path = tmp_path / "site.json"
    site_path.write_text(json.dumps(SITE))
    params = PlanChargingFlowParams(
        plan=PlanChargingParams(
            dataset=str(telemetry),
            site=site_path,
            solvers=["dynex", "exact"],
            kwh_per_100km=18.0,
            out=tmp_path,
        ),
        publish=None,
    )
    result = plan_charging(params).plan
    assert [a["solver"] for a in result.attempts] == ["dynex", "exact"]
    assert result.attempts[0]["outcome"] == "failed" and result.attempts[0]["reason"]
    assert dynex_env.key not in json.dumps(result.attempts)  # the key never reaches a message
    assert result.solver == "exact" and result.feasible
    assert "dynex failed" in artifacts("charging-plan")[0].data
