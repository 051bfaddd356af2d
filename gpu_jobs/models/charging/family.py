"""The charging family as the registry loads it (``gpu_jobs.models.charging:ChargingFamily``).

A planner, not a trained model: it is published and served like the other families (a signed bundle, the
gateway's row-level function), but there is nothing to train or batch-score, so those entry points refuse
with what to do instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

from gpu_jobs.context import InferOutput, JobContext, TrainOutput
from gpu_jobs.errors import FailureKind, JobError
from gpu_jobs.models.base import Plot, Quality
from gpu_jobs.models.charging.online import ChargingOnline
from gpu_jobs.models.charging.planner import NAME


def _no_job(what: str) -> NoReturn:
    raise JobError(
        f"the charging planner has nothing to {what}: it is configured, not trained; plan with "
        "`depin plan --dataset … --site site.json`, publish it with the plan-charging flow",
        FailureKind.USER,
    )


class ChargingFamily:
    """``"charging"``: fleet snapshot → least-cost charging plan (solver chain of ``gpu_jobs.charging``)."""

    name = NAME
    description = "fleet charging plan: which vehicle charges in which slot, at least cost"
    columns: tuple[str, ...] = ()  # reads no telemetry (the flow turns telemetry into snapshots)
    uses_ground_truth = False
    headline = "cost"

    def train(self, ctx: JobContext) -> TrainOutput:
        _no_job("train")

    def infer(self, ctx: JobContext, model_dir: Path) -> InferOutput:
        _no_job("score")

    def evaluate(self, model_dir: Path, inputs: list[Path], *, seed: int | None = None) -> dict[str, Any]:
        _no_job("evaluate")

    def predictor(self, config: dict[str, Any], state: dict[str, Any], device: Any) -> ChargingOnline:
        """The online model (:class:`online.ChargingOnline`); ``state`` is empty (no weights)."""
        return ChargingOnline(config)

    def quality(self, metrics: dict[str, Any]) -> Quality:
        """No held-out bar: every answer is checked (feasibility, cost recomputed) when it is made."""
        return Quality(accepted=True, baseline={}, reasons=["a planner: each plan is checked as it is made"])

    def summary(self, metrics: dict[str, Any]) -> str:
        return (
            "A charging planner: no held-out metrics; each plan carries its own feasibility check and cost."
        )

    def plots(self, model_dir: Path) -> list[Plot]:
        return []
