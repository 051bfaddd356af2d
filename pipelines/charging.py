"""The ``plan-charging`` flow: telemetry → each EV's need (the range function, through the gateway) →
a charging plan (:func:`gpu_jobs.charging.plan`) → Parquet, a table artifact, a plot; then the planner itself
published as the function ``charging-plan`` (a fleet snapshot in, its plan out). The steps are plain functions
in :mod:`pipelines._charging` (``depin plan`` runs the same ones)::

    from pipelines.charging import plan_charging, PlanChargingFlowParams
    run = plan_charging(PlanChargingFlowParams(plan={"site": "site.json", "solvers": ["dynex", "exact"]}))
    print(run.plan.solver, run.plan.cost, run.plan.baseline_cost, run.function_url)
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from depin_core import plots as P
from gpu_jobs.models.charging.planner import FUNCTION_CHAIN, Solver
from pipelines import _charging as C
from pipelines.flows import publish_function
from pipelines.params import DEFAULT_MODELS, PublishParams

FUNCTION = "charging-plan"


class PlanChargingFlowParams(BaseModel):
    """The plan to make, and the planner to publish as a function."""

    model_config = ConfigDict(extra="forbid")

    plan: C.PlanChargingParams = Field(default_factory=C.PlanChargingParams)
    publish: PublishParams | None = Field(
        default_factory=lambda: PublishParams(name=FUNCTION),
        description="where to publish the planner (name charging-plan); null: do not publish",
    )
    function_solvers: list[Solver] = Field(
        default_factory=lambda: list(FUNCTION_CHAIN),
        min_length=1,
        description="solver chain of the published function (dynex there needs DYNEX_SDK_KEY on the gateway)",
    )
    function_time_limit_s: float = Field(
        10.0, gt=0, le=600, description="per solver attempt, in the function"
    )
    models: Path = Field(DEFAULT_MODELS, description="where the planner artifact is written")


class PlanChargingFlowResult(BaseModel):
    """The plan, and the published planner function."""

    plan: C.PlanChargingResult
    function_name: str | None = None
    function_version: str | None = None
    function_url: str | None = None
    manifest_url: str | None = None


def plan_markdown(result: C.PlanChargingResult, png: bytes) -> str:
    """The run's report: what was planned, the solver chain, cost against charging on arrival, the plot."""
    lines = [
        f"# Charging plan: {result.vehicles} EVs, {result.solver}",
        "",
        f"- horizon: {result.slots} slots of {result.slot_minutes} min from {result.site_start}",
        f"- energy planned {P.quantity(result.energy_kwh, 'kWh')} of {P.quantity(result.need_kwh, 'kWh')} "
        f"needed; cost {P.sig(result.cost)} (charging on arrival: {P.sig(result.baseline_cost)}, "
        f"saving {P.sig(result.saving)})",
        f"- feasible: {result.feasible}; unmet: {len(result.unmet)}; skipped (no SoC/battery): {result.skipped}",
        f"- consumption: {result.consumption}",
        "- solver chain: " + "; ".join(C.attempt_text(a) for a in result.attempts),
        f"- plan: `{result.plan_path}`",
        "",
        P.markdown_image(png, "chargers in use per slot against the tariff"),
    ]
    return "\n".join(lines)


@flow(
    name="plan-charging",
    description="Plan the fleet's charging from telemetry at least cost; publish the planner as charging-plan.",
    persist_result=True,
    result_serializer="json",
)
def plan_charging(params: PlanChargingFlowParams = PlanChargingFlowParams()) -> PlanChargingFlowResult:
    """Plan (``pipelines._charging.run_plan``), record the plan as table and markdown artifacts, publish
    the planner (``publish_function``: bundle, smoke call, alias)."""
    from gpu_jobs.models.charging.planner import PlannerConfig, write_planner

    log = get_run_logger()
    result, _, _ = C.run_plan(params.plan)
    for a in result.attempts:
        log.info("solver %s: %s %s", a.get("solver"), a.get("outcome"), a.get("reason") or "")
    create_table_artifact(
        table=result.per_vehicle,
        key="charging-plan-vehicles",
        description=f"{result.vehicles} EVs planned by {result.solver}, {result.skipped} skipped; "
        f"plan {result.plan_path}",
    )
    png = Path(result.plot_path).read_bytes()
    create_markdown_artifact(markdown=plan_markdown(result, png), key="charging-plan", description="the plan")
    out = PlanChargingFlowResult(plan=result)
    if params.publish is None:
        return out
    config = PlannerConfig(
        solvers=params.function_solvers, time_limit_s=params.function_time_limit_s, seed=params.plan.seed
    )
    model_dir = write_planner(params.models, config)
    publish = params.publish.model_copy(
        update={"model_dir": model_dir, "name": params.publish.name or FUNCTION}
    )
    published = publish_function(publish)
    return out.model_copy(
        update={
            "function_name": published.name,
            "function_version": published.version,
            "function_url": published.function_url,
            "manifest_url": published.manifest_url,
        }
    )


PlanChargingParams = C.PlanChargingParams
PlanChargingResult = C.PlanChargingResult

__all__ = [
    "FUNCTION",
    "PlanChargingFlowParams",
    "PlanChargingFlowResult",
    "PlanChargingParams",
    "PlanChargingResult",
    "plan_charging",
]
