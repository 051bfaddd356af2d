"""The ``charging`` family: the planner as a bundle (configuration, no weights; same config, same version),
its online model (a fleet snapshot in, a checked plan out; bad input named by field) and a gateway serving it
with working OpenAPI examples."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount

from gpu_jobs.artifacts import load_artifact
from gpu_jobs.charging import check
from gpu_jobs.errors import InvalidInput, JobError
from gpu_jobs.models.charging import FleetSnapshot, PlannerConfig, write_planner
from gpu_jobs.registry import load_family
from tests.support.serving import MakeBundle


@pytest.fixture(scope="module")
def planner_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_planner(tmp_path_factory.mktemp("planner"), PlannerConfig(solvers=["exact", "greedy"]))


def test_the_planner_artifact_is_its_configuration_and_is_reused(planner_dir: Path) -> None:
    art = load_artifact(planner_dir)
    assert art.state_dict == {} and art.metrics == {}
    assert art.model_config["family"] == "charging"
    assert art.model_config["planner"]["solvers"] == ["exact", "greedy"]
    assert art.model_config["planner"]["code_version"]
    manifest = (planner_dir / "manifest.json").read_bytes()
    again = write_planner(planner_dir.parent, PlannerConfig(solvers=["exact", "greedy"]))
    assert again == planner_dir and (again / "manifest.json").read_bytes() == manifest  # not rewritten
    other = write_planner(planner_dir.parent, PlannerConfig(solvers=["anneal"]))
    assert other != planner_dir and load_artifact(other).model_config["planner"]["solvers"] == ["anneal"]


def test_same_planner_same_function_version(planner_dir: Path, make_bundle: MakeBundle) -> None:
    a, b = make_bundle(planner_dir, "charging-plan"), make_bundle(planner_dir, "charging-plan")
    assert a.version == b.version and a.manifest.family == "charging"
    assert a.manifest.lineage.metrics == {} and a.manifest.lineage.datasets == []
    config = json.loads((a.path / "model" / "model.json").read_text())
    assert config["planner"] == PlannerConfig(solvers=["exact", "greedy"]).model_dump(mode="json")


def test_the_online_model_answers_a_checked_plan(planner_dir: Path, make_bundle: MakeBundle) -> None:
    from serving.bundle import predictor

    pred = predictor(make_bundle(planner_dir, "charging-plan"))
    assert pred.dedicated_thread  # a gateway solves its plans in a thread of their own
    example = pred.example
    out = pred.invoke({"inputs": example + example})["outputs"]
    assert len(out) == 2  # two independent snapshots, the same answer
    assert [(o["schedule"], o["cost"], o["charging"]) for o in out] == [
        (out[0]["schedule"], out[0]["cost"], out[0]["charging"])
    ] * 2
    problem = FleetSnapshot.model_validate(example[0]).problem()
    from gpu_jobs.charging import Plan

    plan = Plan.model_validate({k: v for k, v in out[0].items() if k != "charging"})
    assert plan.solver == "exact" and plan.feasible and check(problem, plan) == [] and plan.unmet == []
    assert sorted((c["vehicle"], c["slot"]) for c in out[0]["charging"]) == sorted(
        (v, s) for v, slots in plan.schedule.items() for s in slots
    )
    # 1 charger of 11 kW, 1-hour slots: vehicle 1 needs 2 slots (18 kWh), vehicle 2 2 slots at 7.4 kW (9 kWh)
    assert {c["vehicle"]: c["kw"] for c in out[0]["charging"]} == {"1": 11.0, "2": 7.4}
    assert plan.energy_kwh == {"1": 22.0, "2": 14.8}


def _bad(example: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(example)
    node = doc
    for p in path[:-1]:
        node = node[p]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "field", "text"),
    [
        (["site", "chargers"], KeyError, "inputs[0].site.chargers", "Field required"),
        (["fleet", 1, "arrive"], "2026-11-24T19:00:00", "inputs[0].fleet[1].arrive", "timezone"),
        (["fleet", 0, "soc_pct"], 130, "inputs[0].fleet[0].soc_pct", "less than or equal to 100"),
        (["fleet", 1, "depart"], "2026-11-24T17:00:00Z", "inputs[0].fleet[1]", "must be before depart"),
        (["fleet", 0, "arrive"], "2026-11-25T05:30:00Z", "inputs[0].fleet[0]", "covers no whole slot"),
        (["fleet"], [], "inputs[0].fleet", "at least 1 item"),
    ],
)
def test_bad_snapshots_are_named_by_field(
    planner_dir: Path, path: list[Any], value: Any, field: str, text: str
) -> None:
    from gpu_jobs.models.charging import ChargingOnline

    online = ChargingOnline(load_artifact(planner_dir).model_config)
    with pytest.raises(InvalidInput) as err:
        online.columns([_bad(online.example[0], path, value)])
    assert err.value.field == field and text in str(err.value)


def test_too_many_vehicles_for_the_planner_are_refused(planner_dir: Path) -> None:
    from gpu_jobs.models.charging import ChargingOnline

    config = load_artifact(planner_dir).model_config
    online = ChargingOnline({**config, "planner": {**config["planner"], "max_vehicles": 1}})
    with pytest.raises(InvalidInput, match=r"inputs\[0\].fleet: 2 vehicles, over this planner's 1"):
        online.columns(online.example)


def test_the_planner_has_nothing_to_train() -> None:
    family = load_family("charging")
    with pytest.raises(JobError, match="configured, not trained") as err:
        family.train(None)  # type: ignore[arg-type]
    assert err.value.kind == "user"
    assert family.quality({}).accepted


async def test_a_gateway_serves_it_with_working_openapi_examples(
    planner_dir: Path, make_bundle: MakeBundle, publisher: LocalAccount, tmp_path: Path
) -> None:
    from tests.support.gateway import check_openapi_examples, registry, serving, settings_for

    bundle = make_bundle(planner_dir, "charging-plan")
    registry(tmp_path / "reg", publisher, bundle)
    async with serving(settings_for(tmp_path / "reg", publisher)) as (_, client):
        await check_openapi_examples(client, {"charging-plan": {"inputs"}})
        r = await client.post("/v1/functions/charging-plan/invoke", json={"inputs": [{"site": {}}]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "inputs[0].site.chargers"
