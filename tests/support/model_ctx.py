"""A tiny in-process ``JobContext`` for running a model family's train/infer directly (tests and benches)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpu_jobs.context import JobContext


class MemoryCheckpointer:
    """Dict-backed checkpointer that round-trips through the real file format when available."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.saved: dict[int, dict[str, Any]] = {}

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any) -> None:
        from gpu_jobs.checkpoint import flatten_state

        structure, tensors = flatten_state(state)  # the same encoding the worker's checkpointer uses
        self.saved[step] = {"structure": structure, "tensors": {k: v.clone() for k, v in tensors.items()}}

    def restore(self) -> dict[str, Any] | None:
        from gpu_jobs.checkpoint import unflatten_state

        if not self.saved:
            return None
        last = self.saved[max(self.saved)]
        return unflatten_state(last["structure"], last["tensors"])


@dataclass
class Model:
    family: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outputs:
    dir: str


@dataclass
class Spec:
    model: Model
    outputs: Outputs
    seed: int = 0


def make_ctx(
    tmp: Path,
    inputs: list[Path],
    family: str,
    hp: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    every: int = 0,
    checkpointer: Any = None,
    report: Any = None,
) -> JobContext:
    """A CPU ``JobContext`` over ``inputs`` for ``family``, checkpointing in memory, logging nowhere."""
    return JobContext(
        spec=Spec(Model(family, hp or {}), Outputs(str(tmp / "out")), seed),
        workdir=tmp,
        device=torch.device("cpu"),
        checkpointer=checkpointer or MemoryCheckpointer(every),
        log=lambda msg: None,
        report=report or (lambda *a, **k: None),
        autocast=contextlib.nullcontext,
        inputs=inputs,
    )
