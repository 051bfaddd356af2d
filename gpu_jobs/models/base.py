"""The model-family seam: what one family folder gives the job machinery, the gateway and the flows.

A family is a class (instantiated without arguments) registered by name in :mod:`gpu_jobs.registry`. The worker
calls ``train``/``infer`` (and the verifier ``evaluate``); the gateway asks ``predictor`` for the online model
of an artifact whose ``model.json`` names the family; the flows judge ``quality`` and print ``summary``; the
model report draws ``plots`` (optional: a family without it has a report without plots). A family used only
for jobs (an import path in a spec) may implement just ``name``, ``train`` and ``infer``.
"""

from __future__ import annotations

from collections.abc import Callable
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


@dataclass(frozen=True)
class Derived:
    """Another input form turned into the row model's input columns (``n`` rows), and what to tell the caller:
    ``about[i]`` is added to output row ``i`` under the form's ``row_key`` (e.g. the trip it describes);
    ``notes`` are top-level response fields (e.g. ``{"assumed": {...}}``)."""

    cols: Columns
    about: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)


class InputForm(Protocol):
    """A request form a function accepts besides engineered rows: the body ``{key: value}`` (e.g.
    ``{"telemetry": [...]}``, ``{"plan": {...}}``), derived into the row model's columns by the family."""

    key: str  # the body's one field
    title: str  # one line for the OpenAPI document
    schema: dict[str, Any]  # JSON Schema (2020-12) of ``value``
    example: Any  # a value that works as is (shown in the OpenAPI document)
    row_key: str | None  # the output-row field ``Derived.about`` goes to (None: none)
    row_schema: dict[str, Any] | None  # JSON Schema of that field
    notes_schema: dict[str, dict[str, Any]]  # JSON Schema of each top-level response field it adds

    def derive(self, value: Any) -> Derived:
        """Validate ``value`` (``InvalidInput`` naming e.g. ``telemetry[3].speed`` or ``plan.km``) → columns.
        May be slow (feature code): servers call it off their event loop. Thread-safe."""
        ...


@dataclass(frozen=True)
class Plot:
    """One plot of a model report: ``data()`` computes its JSON-able data (plain lists, what tests check),
    ``draw(data)`` a matplotlib figure of exactly that data (``depin_core.plots.figure``)."""

    name: str  # file stem: plots/<name>.png in the artifact
    title: str  # caption for people
    data: Callable[[], dict[str, Any]]
    draw: Callable[[dict[str, Any]], Any]


class OnlineModel(Protocol):
    """A loaded model as a row-level function (wrapped by ``gpu_jobs.models.online.Predictor``).

    Optionally also ``forms: Sequence[InputForm]``: the other request forms it accepts (raw telemetry, a plan).
    """

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

    def plots(self, model_dir: Path) -> list[Plot]:
        """The model report's plots of the verified artifact at ``model_dir``, drawn from its ``report/``
        files (written by ``train`` through ``TrainOutput.files``). Optional: ``gpu_jobs.plots.render``
        draws none for a family without it."""
        ...
