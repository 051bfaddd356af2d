"""The range family as the registry loads it (``gpu_jobs.models.range:RangeFamily``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gpu_jobs.context import InferOutput, JobContext, TrainOutput
from gpu_jobs.models import features as F
from gpu_jobs.models.base import Plot, Quality
from gpu_jobs.models.range.infer import infer as infer_job
from gpu_jobs.models.range.model import NAME
from gpu_jobs.models.range.online import RangeOnline
from gpu_jobs.models.range.plots import plots as report_plots
from gpu_jobs.models.range.quality import quality as quality_bar
from gpu_jobs.models.range.quality import summary as summary_text
from gpu_jobs.models.range.train import evaluate as evaluate_artifact
from gpu_jobs.models.range.train import train as train_job


class RangeFamily:
    """``"range"``: EV consumption (kWh/100 km) and remaining range."""

    name = NAME
    description = "EV energy use (kWh/100 km) per trip and remaining range"
    # the telemetry columns it reads (gpu_jobs.minimise sends a remote node nothing else; no location)
    columns = (*F.KEYS, *F.SIGNALS)
    uses_ground_truth = False  # evaluated on measured consumption: a fault list given with it stays here
    headline = "mae"

    def train(self, ctx: JobContext) -> TrainOutput:
        """Train on the seeded training vehicles; held-out metrics (:mod:`range.train`)."""
        return train_job(ctx)

    def infer(self, ctx: JobContext, model_dir: Path) -> InferOutput:
        """Score every trip of the input telemetry → ``<outputs.dir>/predictions.parquet``."""
        return infer_job(ctx, model_dir)

    def evaluate(self, model_dir: Path, inputs: list[Path], *, seed: int | None = None) -> dict[str, Any]:
        """Recompute the held-out metrics from the artifact and its inputs (:func:`range.train.evaluate`)."""
        return evaluate_artifact(model_dir, inputs, seed=seed)

    def predictor(
        self, config: dict[str, Any], state: dict[str, torch.Tensor], device: torch.device
    ) -> RangeOnline:
        """The online model (:class:`online.RangeOnline`)."""
        return RangeOnline(state, config, device)

    def quality(self, metrics: dict[str, Any]) -> Quality:
        """Held-out mae below the fleet-mean baseline (:mod:`range.quality`)."""
        return quality_bar(metrics)

    def summary(self, metrics: dict[str, Any]) -> str:
        """The held-out MAE against its baselines (markdown)."""
        return summary_text(metrics)

    def plots(self, model_dir: Path) -> list[Plot]:
        """Loss per epoch, predicted vs actual, residuals per vehicle (:mod:`range.plots`)."""
        return report_plots(model_dir)
