"""Fixtures for the worker-agent tests: the session's agent process on loopback and raw httpx clients."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from gpu_jobs.agent.process import AgentProcess
from gpu_jobs.spec import DatasetRef
from tests.gpu_jobs.agent.helpers import auth
from tests.support.gpu_jobs import toy_data


@pytest.fixture()
def agent(worker_agent: AgentProcess) -> AgentProcess:
    return worker_agent


@pytest.fixture()
def client(agent: AgentProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=agent.url, verify=agent.verify, headers=auth(), timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DatasetRef:
    """Toy data of its own (seed 1): test_api's first job finds its blob missing on the shared agent."""
    return toy_data(tmp_path_factory.mktemp("toy"), seed=1)
