"""The anomaly family as the registry loads it (``gpu_jobs.models.anomaly:AnomalyFamily``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gpu_jobs.context import InferOutput, JobContext, TrainOutput
from gpu_jobs.models import features as F
from gpu_jobs.models.anomaly.infer import infer as infer_job
from gpu_jobs.models.anomaly.model import NAME
from gpu_jobs.models.anomaly.online import AnomalyOnline
from gpu_jobs.models.anomaly.plots import plots as report_plots
from gpu_jobs.models.anomaly.quality import quality as quality_bar
from gpu_jobs.models.anomaly.quality import summary as summary_text
from gpu_jobs.models.anomaly.train import evaluate as evaluate_artifact
from gpu_jobs.models.anomaly.train import train as train_job
from gpu_jobs.models.base import Plot, Quality


class AnomalyFamily:
    """``"anomaly"``: flags anomalous telemetry windows per vehicle type."""

    name = NAME
    description = "anomalous telemetry windows (tyres, 12 V, battery/coolant heat) per vehicle type"
    # the telemetry columns it reads (gpu_jobs.minimise sends a remote node nothing else; no location)
    columns = (*F.KEYS, *F.SIGNALS)
    uses_ground_truth = True  # recall / false-positive rate against the injected faults
    headline = "recall"

    def train(self, ctx: JobContext) -> TrainOutput:
        """Train per vehicle type on the seeded training vehicles; thresholds; held-out metrics (:mod:`anomaly.train`)."""
        return train_job(ctx)

    def infer(self, ctx: JobContext, model_dir: Path) -> InferOutput:
        """Score every window of the input telemetry → ``<outputs.dir>/predictions.parquet``."""
        return infer_job(ctx, model_dir)

    def evaluate(self, model_dir: Path, inputs: list[Path], *, seed: int | None = None) -> dict[str, Any]:
        """Recompute the held-out metrics from the artifact and its inputs (:func:`anomaly.train.evaluate`)."""
        return evaluate_artifact(model_dir, inputs, seed=seed)

    def predictor(
        self, config: dict[str, Any], state: dict[str, torch.Tensor], device: torch.device
    ) -> AnomalyOnline:
        """The online model (:class:`online.AnomalyOnline`)."""
        return AnomalyOnline(state, config, device)

    def quality(self, metrics: dict[str, Any]) -> Quality:
        """Recall and false-positive rate within the bars (:mod:`anomaly.quality`)."""
        return quality_bar(metrics)

    def summary(self, metrics: dict[str, Any]) -> str:
        """The held-out recall and false-positive rate against the bars (markdown)."""
        return summary_text(metrics)

    def plots(self, model_dir: Path) -> list[Plot]:
        """Loss per epoch, score timelines, precision/recall vs threshold (:mod:`anomaly.plots`)."""
        return report_plots(model_dir)
