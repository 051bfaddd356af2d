"""Torch training and inference jobs on vehicle telemetry, run through a chain of runners with fallback,
resume from checkpoints and verification of untrusted results.

Runners: ``LocalRunner`` (this machine: CUDA when available, else CPU), ``AgentRunner`` (a worker agent on a
GPU node, over pinned HTTPS), and machines rented from GPU providers (Vast.ai, io.net) or registered by hand
(GPUnet, any host) through ``make_provider``. Start with ``train`` / ``score`` (:mod:`gpu_jobs.api`)::

    from pathlib import Path
    from gpu_jobs import train
    doc = train(dataset=Path("data/telemetry"), model="range", out=Path("models/range"), runners=["vast", "local"])
    print(doc["metrics"]["mae"], doc["runner"], doc["attempts"])

Names are imported on first use, so ``import gpu_jobs`` stays cheap (no torch, no HTTP client).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from depin_core.lazy import lazy_exports

_WHERE = {
    "train": "gpu_jobs.api",
    "score": "gpu_jobs.api",
    "run_spec": "gpu_jobs.api",
    "model_family": "gpu_jobs.api",
    "attempts_json": "gpu_jobs.api",
    "run_chain": "gpu_jobs.chain",
    "ChainResult": "gpu_jobs.chain",
    "ChainAttempt": "gpu_jobs.chain",
    "RunnerFactory": "gpu_jobs.chain",
    "DefaultRunnerFactory": "gpu_jobs.chain",
    "JobSpec": "gpu_jobs.spec",
    "JobResult": "gpu_jobs.spec",
    "JobState": "gpu_jobs.spec",
    "JobKind": "gpu_jobs.spec",
    "FailureKind": "gpu_jobs.spec",
    "DatasetRef": "gpu_jobs.spec",
    "ModelSpec": "gpu_jobs.spec",
    "JobRunner": "gpu_jobs.runner",
    "JobStatus": "gpu_jobs.runner",
    "LocalRunner": "gpu_jobs.local",
    "AgentRunner": "gpu_jobs.remote",
    "Provider": "gpu_jobs.providers",
    "make_provider": "gpu_jobs.providers",
    "FAMILIES": "gpu_jobs.registry",
    "load_family": "gpu_jobs.registry",
    "family_names": "gpu_jobs.registry",
    "register_family": "gpu_jobs.registry",
    "ModelFamily": "gpu_jobs.models.base",
}

__all__ = [
    "FAMILIES",
    "AgentRunner",
    "ChainAttempt",
    "ChainResult",
    "DatasetRef",
    "DefaultRunnerFactory",
    "FailureKind",
    "JobKind",
    "JobResult",
    "JobRunner",
    "JobSpec",
    "JobState",
    "JobStatus",
    "LocalRunner",
    "ModelFamily",
    "ModelSpec",
    "Provider",
    "RunnerFactory",
    "attempts_json",
    "family_names",
    "load_family",
    "make_provider",
    "model_family",
    "register_family",
    "run_chain",
    "run_spec",
    "score",
    "train",
]

if TYPE_CHECKING:
    from gpu_jobs.api import attempts_json, model_family, run_spec, score, train
    from gpu_jobs.chain import ChainAttempt, ChainResult, DefaultRunnerFactory, RunnerFactory, run_chain
    from gpu_jobs.local import LocalRunner
    from gpu_jobs.models.base import ModelFamily
    from gpu_jobs.providers import Provider, make_provider
    from gpu_jobs.registry import FAMILIES, family_names, load_family, register_family
    from gpu_jobs.remote import AgentRunner
    from gpu_jobs.runner import JobRunner, JobStatus
    from gpu_jobs.spec import DatasetRef, FailureKind, JobKind, JobResult, JobSpec, JobState, ModelSpec

__getattr__, __dir__ = lazy_exports(globals(), _WHERE)
