"""The agent process's lifecycle: a lost node (SIGKILL) leaves no job workers behind, nor does an agent that dies
alone (its workers stop themselves); a restart reports the interrupted job FAILED(infra) instead of leaving it
RUNNING forever; a graceful stop cancels running jobs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gpu_jobs.agent.process import AgentProcess
from gpu_jobs.spec import DatasetRef
from tests.gpu_jobs.agent.helpers import (
    ENV,
    TOKEN,
    auth,
    new_job_id,
    terminal,
    train_spec,
    upload_inputs,
    wait_job,
)

pytestmark = pytest.mark.e2e


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _wait_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def _start_paused_job(agent: AgentProcess, data: DatasetRef, tmp_path: Path) -> tuple[httpx.Client, str]:
    """Submit a train job that pauses after step 3 (TOY_PAUSE_AT_STEP); return once it got there."""
    client = httpx.Client(base_url=agent.url, verify=agent.verify, headers=auth(), timeout=30)
    spec = train_spec(data, tmp_path / "m", steps=10)
    job_id = new_job_id(spec)
    upload_inputs(client, spec)
    r = client.post("/v1/jobs", json={"job_id": job_id, "attempt": 1, "spec": spec.model_dump(mode="json")})
    assert r.status_code == 201, r.text
    wait_job(client, job_id, lambda d: d["status"]["step"] >= 3)
    return client, job_id


def test_a_lost_agent_leaves_no_workers_and_a_restart_reports_the_interrupted_job(
    data: DatasetRef, tmp_path: Path
) -> None:
    agent = AgentProcess(tmp_path / "agent", TOKEN, env={**ENV, "TOY_PAUSE_AT_STEP": "3"})
    with agent:
        # kill(): the agent and its workers go down together (a lost node)
        client, killed_id = _start_paused_job(agent, data, tmp_path)
        client.close()
        workers = agent.worker_pids()
        assert len(workers) == 1
        agent_pid = agent.pid
        assert agent_pid is not None
        agent.kill()
        assert _wait_gone([agent_pid, *workers]) == []
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{agent.url}/v1/health", headers=auth(), timeout=5, verify=agent.verify)

        agent.start()  # same data directory: the interrupted job is reported, not left RUNNING
        with httpx.Client(base_url=agent.url, verify=agent.verify, headers=auth(), timeout=30) as client:
            doc = wait_job(client, killed_id, terminal, timeout=30)
            assert doc["status"]["state"] == "FAILED", doc
            result = client.get(f"/v1/jobs/{killed_id}/result").json()["result"]
            assert result["failure"] == "infra"
            spec = train_spec(data, tmp_path / "m", steps=10)
            again = {"job_id": killed_id, "attempt": 2, "spec": spec.model_dump(mode="json")}
            r = client.post("/v1/jobs", json=again)
            assert r.status_code == 200 and r.json() == {
                "job_id": killed_id,
                "state": "FAILED",
                "created": False,
            }

        # the agent alone dies: its worker notices it was orphaned and stops itself
        client, _ = _start_paused_job(agent, data, tmp_path)
        client.close()
        workers = agent.worker_pids()
        assert agent.proc is not None and len(workers) == 1
        agent.proc.kill()
        agent.proc.wait()
        assert _wait_gone(workers) == []


def test_stop_cancels_running_jobs(data: DatasetRef, tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "agent", TOKEN, env={**ENV, "TOY_PAUSE_AT_STEP": "3"})
    with agent:
        client, job_id = _start_paused_job(agent, data, tmp_path)
        client.close()
        workers = agent.worker_pids()
        agent.stop()
        assert agent.proc is not None and agent.proc.returncode is not None
        assert _wait_gone(workers) == []
    result = (tmp_path / "agent" / "jobs" / job_id / "result.json").read_text()
    assert '"state": "CANCELLED"' in result


def test_the_agent_refuses_to_start_without_a_strong_token(tmp_path: Path) -> None:
    for token in ("", "short"):
        env = {**os.environ, "DEPIN_AGENT_TOKEN": token}
        cmd = [sys.executable, "-m", "gpu_jobs.agent", "--port", "0", "--data-dir", str(tmp_path / "a")]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and "DEPIN_AGENT_TOKEN" in p.stderr, p.stderr
