"""Shared helpers of the provider tests: a JobSpec with given resources, a token, a bootstrap."""

from __future__ import annotations

from pydantic import SecretStr

from gpu_jobs.providers import Bootstrap
from gpu_jobs.spec import JobKind, JobSpec, Limits, ModelSpec, Outputs, Resources
from tests.support.gpu_jobs import TOKEN  # the session worker_agent's token

JOB_ID = "0123456789ab-89abcdef"


def make_spec(gpu_count: int = 1, min_vram_gb: float = 0.0, max_wall_s: float = 3600.0) -> JobSpec:
    return JobSpec(
        kind=JobKind.TRAIN,
        model=ModelSpec(family="range"),
        resources=Resources(gpu_count=gpu_count, min_vram_gb=min_vram_gb),
        limits=Limits(max_wall_s=max_wall_s),
        outputs=Outputs(dir="/tmp/out"),
    )


def make_bootstrap() -> Bootstrap:
    return Bootstrap(token=SecretStr(TOKEN))
