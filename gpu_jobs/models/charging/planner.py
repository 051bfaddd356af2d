"""The planner as a model artifact: no weights, only its configuration (solver chain, limits) and version.

A published ``charging-plan`` function is a bundle like any other (``serving.bundle``): ``model.json`` says
family ``charging`` and holds :class:`PlannerConfig`; ``weights.safetensors`` is an empty state dict (there is
nothing trained); ``metrics.json`` is empty (a planner has no held-out metrics: each answer carries its own
cost and feasibility check). The artifact directory is named by the config's hash and reused while it
verifies, so publishing the same planner again gives the same function version.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

NAME = "charging"
Solver = Literal["exact", "anneal", "dynex", "greedy"]
SOLVERS: tuple[str, ...] = ("exact", "anneal", "dynex", "greedy")
FUNCTION_CHAIN: tuple[Solver, ...] = ("exact", "greedy")  # a served planner: optimal, else the baseline


def code_version() -> str:
    """The depin-pipeline version the planner runs (``0+unknown`` outside an installed package)."""
    try:
        return version("depin-pipeline")
    except PackageNotFoundError:  # pragma: no cover - the package is installed in every environment we run
        return "0+unknown"


class PlannerConfig(BaseModel):
    """What a served planner does with each fleet snapshot (``model.json``'s ``planner``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    solvers: list[Solver] = Field(
        default_factory=lambda: list(FUNCTION_CHAIN),
        min_length=1,
        description="solver chain, tried in order (gpu_jobs.charging.plan)",
    )
    time_limit_s: float = Field(10.0, gt=0, le=600, description="limit of one solver attempt")
    seed: int = Field(0, description="seed of the stochastic solvers (anneal, dynex)")
    max_vehicles: int = Field(500, ge=1, le=100_000, description="vehicles per snapshot (larger: refused)")
    code_version: str = Field(default_factory=code_version, description="depin-pipeline version")


def model_config(config: PlannerConfig) -> dict[str, object]:
    """``model.json`` of a planner artifact."""
    return {"family": NAME, "planner": config.model_dump(mode="json")}


def config_hash(config: PlannerConfig) -> str:
    """sha256[:12] of the canonical JSON of ``model.json`` (names the artifact directory)."""
    body = json.dumps(model_config(config), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(body).hexdigest()[:12]


def write_planner(models_dir: Path | str, config: PlannerConfig) -> Path:
    """The planner artifact of ``config`` under ``models_dir`` (``charging-planner-<hash>``): reused when it
    exists and verifies, else written (an unverifiable one is replaced)."""
    from gpu_jobs.artifacts import MODEL, load_artifact, write_artifact  # torch (safetensors)
    from gpu_jobs.errors import ArtifactIntegrityError

    out = Path(models_dir) / f"charging-planner-{config_hash(config)}"
    if (out / MODEL).is_file():
        try:
            if load_artifact(out).model_config == model_config(config):
                return out
        except ArtifactIntegrityError:
            pass  # rewritten below
    write_artifact(out, state_dict={}, model_config=model_config(config), metrics={})
    return out
