"""Fixtures for the worker-agent tests: a real agent process on loopback and raw httpx clients."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from gpu_jobs.agent.process import AgentProcess
from gpu_jobs.spec import DatasetRef
from tests.gpu_jobs.agent.helpers import ENV, TOKEN, auth
from tests.gpu_jobs.toy_family import write_toy_dataset


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    proc = AgentProcess(tmp_path_factory.mktemp("agent"), TOKEN, env=ENV, max_parallel=2)
    proc.start()
    try:
        yield proc
    finally:
        proc.close()


@pytest.fixture()
def client(agent: AgentProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=agent.url, headers=auth(), timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DatasetRef:
    root = tmp_path_factory.mktemp("data")
    return DatasetRef.from_path(write_toy_dataset(root / "toy" / "part-0.parquet").parent)
