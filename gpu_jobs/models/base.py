"""The model-family seam: what one family folder gives the job machinery, the gateway and the flows.

A family is a class (instantiated without arguments) registered by name in :mod:`gpu_jobs.registry`. The worker
calls ``train``/``infer`` (and the verifier ``evaluate``); the gateway asks ``predictor`` for the online model
of an artifact whose ``model.json`` names the family; the flows judge ``quality`` and print ``summary``. A
family used only for jobs (an import path in a spec) may implement just ``name``, ``train`` and ``infer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from gpu_jobs.context import InferOutput, JobContext, TrainOutput

Columns = dict[str, np.ndarray]  # field name → one 1-D array (a batch of rows, column-wise)


@dataclass(frozen=True)
class Quality:
    """A family's verdict on held-out metrics: accepted or not, the baseline numbers, the reasons."""

    accepted: bool
    baseline: dict[str, Any]
    reasons: list[str] = field(default_factory=list)


class OnlineModel(Protocol):
    """A loaded model as a row-level function (wrapped by ``gpu_jobs.models.online.Predictor``)."""

    input_schema: dict[str, Any]  # JSON Schema (2020-12) of one input row
    output_schema: dict[str, Any]  # JSON Schema of one output row
    example: list[dict[str, Any]]  # rows that validate (the bundle's example, the gateway's smoke call)

    def columns(self, rows: Any) -> Columns:
        """Validate JSON-decoded rows → columns; ``InvalidInput`` naming ``inputs[i].field``."""
        ...

    def predict(self, cols: Columns) -> Columns:
        """Vectorised inference over columns (n rows in → n rows out), no state change (thread-safe)."""
        ...


class ModelFamily(Protocol):
    """One model family: training and batch jobs, online serving, its quality bar and report."""

    name: str  # the registry name, written into model.json as "family"
    description: str  # one line for people (CLI help, docs)
    columns: tuple[str, ...]  # telemetry columns it reads (gpu_jobs.minimise sends an untrusted node no more)
    uses_ground_truth: bool  # whether it reads ground truth (faults.parquet); if not, that stays here
    headline: str  # the held-out metric a run report leads with (a key of its metrics)

    def train(self, ctx: JobContext) -> TrainOutput:
        """Train on ``ctx.inputs`` → weights, ``model.json`` config (``family`` = :attr:`name`), metrics."""
        ...

    def infer(self, ctx: JobContext, model_dir: Path) -> InferOutput:
        """Score ``ctx.inputs`` with the artifact at ``model_dir`` → ``<outputs.dir>/predictions.parquet``."""
        ...

    def evaluate(self, model_dir: Path, inputs: list[Path], *, seed: int | None = None) -> dict[str, Any]:
        """Recompute the training job's held-out metrics from its artifact and inputs (verification)."""
        ...

    def predictor(
        self, config: dict[str, Any], state: dict[str, torch.Tensor], device: torch.device
    ) -> OnlineModel:
        """The online model of an artifact (``model.json`` config, weights) on ``device``."""
        ...

    def quality(self, metrics: dict[str, Any]) -> Quality:
        """Does the model beat its naive baseline? (the bar a flow checks before publishing)"""
        ...

    def summary(self, metrics: dict[str, Any]) -> str:
        """One markdown paragraph on the held-out metrics against the baseline (the model report)."""
        ...
