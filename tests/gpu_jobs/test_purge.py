"""``DELETE /v1/jobs/{id}/data`` through ``AgentRunner.purge`` on a real agent: a finished job's inputs,
checkpoints, outputs and log go (a blob another job still uses stays until that job goes too), its job tokens
are revoked, a second call removes nothing, a running job is refused (409), and a wrong token is refused."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from gpu_jobs.agent.process import AgentProcess
from gpu_jobs.errors import AgentAuthError, AgentRefused
from gpu_jobs.remote import AgentRunner
from gpu_jobs.spec import DatasetRef, JobState
from tests.support.gpu_jobs import ENV, TOKEN, toy_data, train_spec


@pytest.fixture()
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    with AgentProcess(tmp_path / "agent", TOKEN, env=ENV) as proc:
        yield proc


def _runner(agent: AgentProcess, root: Path, token: str = TOKEN) -> AgentRunner:
    return AgentRunner(agent.url, SecretStr(token), workdir_root=root, tls_cert=agent.tls_cert)


def _job_files(data_dir: Path, job_id: str | None = None) -> list[str]:
    roots = [data_dir / d for d in ("blobs", "jobs", "staging", "out", "manifests")]
    files = sorted(
        str(p.relative_to(data_dir)) for r in roots if r.is_dir() for p in r.rglob("*") if p.is_file()
    )
    return [f for f in files if job_id is None or job_id in f]


def test_a_finished_jobs_data_is_removed_and_a_shared_blob_only_with_its_last_job(
    tmp_path: Path, agent: AgentProcess
) -> None:
    data: DatasetRef = toy_data(tmp_path, seed=1313)
    blob = f"blobs/{data.files[0].sha256}"
    with _runner(agent, tmp_path / "w") as runner:
        a = runner.submit(train_spec(data, tmp_path / "a", every=5, steps=10))
        b = runner.submit(train_spec(data, tmp_path / "b", every=5, steps=12))
        for job in (a, b):
            assert runner.result(job, timeout=300).state == JobState.SUCCEEDED
        assert _job_files(agent.data_dir, a) and (agent.data_dir / blob).is_file()
        minted = httpx.post(
            f"{agent.url}/v1/tokens", json={"job_id": a}, headers={"Authorization": f"Bearer {TOKEN}"},
            verify=agent.verify,
        ).json()  # fmt: skip
        job_auth = {"Authorization": f"Bearer {minted['token']}"}
        assert httpx.get(f"{agent.url}/v1/jobs/{a}", headers=job_auth, verify=agent.verify).status_code == 200

        removed = runner.purge(a)
        assert f"jobs/{a}" in removed and f"out/{a}" in removed and blob not in removed
        assert _job_files(agent.data_dir, a) == [] and (agent.data_dir / blob).is_file()
        assert runner.purge(a) == []  # idempotent
        refused = httpx.get(f"{agent.url}/v1/jobs/{a}", headers=job_auth, verify=agent.verify)
        assert refused.status_code == 401 and "revoked" in refused.text  # the job's token went with its data

        assert blob in runner.purge(b)
        assert _job_files(agent.data_dir) == []
        assert (tmp_path / "a" / "manifest.json").is_file()  # what was fetched stays here

    with (
        _runner(agent, tmp_path / "x", token="not-the-token-0123456789") as wrong,
        pytest.raises(AgentAuthError),
    ):
        wrong.purge(a)


def test_a_running_job_is_not_purged(tmp_path: Path, agent: AgentProcess) -> None:
    data = toy_data(tmp_path, seed=1314)
    with _runner(agent, tmp_path / "w") as runner:
        job = runner.submit(train_spec(data, tmp_path / "m", every=0, steps=100_000, sleep_s=0.05))
        deadline = time.monotonic() + 300
        while runner.status(job).state != JobState.RUNNING:
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.1)
        with pytest.raises(AgentRefused) as refused:
            runner.purge(job)
        assert refused.value.status == 409 and "cancel it first" in str(refused.value)
        runner.cancel(job)
        assert runner.result(job, timeout=300).state.terminal
        assert runner.purge(job) and _job_files(agent.data_dir) == []
