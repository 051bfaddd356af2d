"""The seam between the job machinery (spec, runner, worker process, checkpoints, artifacts) and the
model families (features, training loops, scoring).

The worker process builds a :class:`JobContext` and calls the family registered for ``spec.model.family``
(the protocol: ``gpu_jobs.models.base.ModelFamily``): ``family.train(ctx) -> TrainOutput`` or
``family.infer(ctx, model_dir) -> InferOutput``. Families never touch files
other than through the context, never pick a device themselves, and never serialize with pickle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from gpu_jobs.spec import JobSpec


class Checkpointer(Protocol):
    """Saves and restores training state (tensors → safetensors, the rest → JSON; no pickle)."""

    def due(self, step: int) -> bool:
        """True when the checkpoint policy says to save after ``step`` (every N steps)."""
        ...

    def save(self, step: int, state: Mapping[str, Any]) -> None:
        """Persist ``state``: nested dicts/lists of tensors, numbers, strings, bools, None (e.g. model and
        optimizer ``state_dict()``, RNG states as uint8 tensors, the data cursor). Atomic."""
        ...

    def restore(self) -> dict[str, Any] | None:
        """The last saved state (tensors on CPU), or None when the job starts fresh."""
        ...


@dataclass
class JobContext:
    """What a model family gets from the worker."""

    spec: JobSpec
    workdir: Path
    device: torch.device
    checkpointer: Checkpointer
    log: Callable[[str], None]
    # report(step, total_steps, **metrics): progress lines (epoch, loss) streamed to the caller
    report: Callable[..., None]
    autocast: Callable[[], AbstractContextManager[Any]]  # bf16 autocast on capable CUDA, else a no-op
    inputs: list[Path] = field(default_factory=list)  # verified dataset files (Parquet), in spec order

    def cancelled(self) -> bool:  # the runner cancels by terminating the process; kept for loops that poll
        return False


@dataclass
class TrainOutput:
    """A trained model, ready for the artifact writer (``gpu_jobs.artifacts``)."""

    state_dict: dict[str, torch.Tensor]  # → weights.safetensors
    # → model.json: family, hyperparameters, feature names + units, normalization
    model_config: dict[str, Any]
    metrics: dict[str, Any]  # → metrics.json (held-out evaluation, baselines)
    # → report files of the artifact (relative path under report/ → bytes): what the model report's plots
    # are drawn from (held-out predictions, per-epoch losses); a ``token_id`` column in a Parquet file there
    # is mapped back to the real ids when the job ran on pseudonyms
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class InferOutput:
    """Batch scoring result: where the predictions went and how many rows."""

    output: Path
    rows: int
    metrics: dict[str, Any] = field(default_factory=dict)
