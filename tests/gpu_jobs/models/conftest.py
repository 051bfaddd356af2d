"""Shared fixtures: one REAL fleet dataset per session (emulator → client → ingest → store), a tiny JobContext."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from gpu_jobs.context import JobContext
from tests.gpu_jobs.models.fleet_data import FleetData, build_fleet_data

# The evaluation size (≥ 30 vehicles, ≥ 7 days, 20 s buckets): ~8 s to build. A second seed checks
# that the quality bars are not a property of one lucky fleet.
FLEET = {"vehicles": 30, "days": 7.0, "seed": 7}
FLEET_B = {**FLEET, "seed": 11}


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> FleetData:
    return build_fleet_data(tmp_path_factory.mktemp("fleet"), **FLEET)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def fleet_b(tmp_path_factory: pytest.TempPathFactory) -> FleetData:
    return build_fleet_data(tmp_path_factory.mktemp("fleet_b"), **FLEET_B)  # type: ignore[arg-type]


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


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
