"""Shared helpers of the GPU-job tests (agent, AgentRunner, providers, dispatch): toy job specs, job ids, a
bounded wait, and two session fixtures (registered in ``tests/conftest.py``): ``toy_dataset`` and
``worker_agent``, one real worker agent process that tests share — each test uses its own job ids, so they stay
independent, and the suite starts one agent instead of one per module."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from depin_core.tls import make_certificate
from gpu_jobs.agent.process import AgentProcess
from gpu_jobs.spec import DatasetRef, JobSpec
from tests.support.toy_family import IMPORT_PATH, write_toy_dataset

REPO = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(REPO)}  # worker processes import the toy family from the repository
TOKEN = "gpu-jobs-test-" + secrets.token_hex(12)  # the worker_agent's token
AGENT_TLS = make_certificate()  # the certificate the test agents serve (HTTPS), pinned by their clients


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory: pytest.TempPathFactory) -> DatasetRef:
    """The toy dataset (read-only for the tests that share it)."""
    return toy_data(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="session")
def worker_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """An honest worker agent on loopback (token ``TOKEN``, two jobs at a time, HTTPS with ``AGENT_TLS``)
    shared by the session."""
    agent = AgentProcess(tmp_path_factory.mktemp("agent"), TOKEN, env=ENV, max_parallel=2, tls=AGENT_TLS)
    with agent as proc:
        yield proc


def toy_data(root: Path, seed: int = 0) -> DatasetRef:
    """The toy dataset as ``root/data/part-0.parquet``. A test that needs bytes the shared ``worker_agent`` has
    never seen (to watch them being uploaded) uses a ``seed`` no other module uses."""
    return DatasetRef.from_path(write_toy_dataset(root / "data" / "part-0.parquet", seed=seed).parent)


def train_spec(
    data: DatasetRef, out: Path, *, family: str = IMPORT_PATH, every: int = 10, keep_last: int = 2, **hp: Any
) -> JobSpec:
    """A toy train job (30 steps unless ``steps=`` says otherwise, seed 5) writing its model to ``out``; a
    checkpoint every ``every`` steps (0: none). Checkpoint policy and outputs are not part of the spec_hash."""
    return JobSpec.model_validate(
        {
            "kind": "train",
            "model": {"family": family, "hyperparameters": {"steps": 30, **hp}},
            "inputs": [data.model_dump()],
            "seed": 5,
            "limits": {"max_wall_s": 120},
            "checkpoint": {"every_steps": every, "keep_last": keep_last},
            "outputs": {"dir": str(out)},
        }
    )


def infer_spec(data: DatasetRef, out: Path, model_dir: Path) -> JobSpec:
    """A toy inference job scoring ``data`` with the model in ``model_dir`` into ``out``."""
    return JobSpec.model_validate(
        {
            "kind": "infer",
            "model": {"family": IMPORT_PATH},
            "inputs": [data.model_dump(), DatasetRef.from_path(model_dir, role="model").model_dump()],
            "outputs": {"dir": str(out)},
        }
    )


def new_job_id(spec: JobSpec) -> str:
    return f"{spec.spec_hash[:12]}-{secrets.token_hex(4)}"


def wait_for(what: str, cond: Callable[[], object], timeout: float = 90.0) -> None:
    """Poll ``cond`` every 0.05 s until it is truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
