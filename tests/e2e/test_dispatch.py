"""The runner chain with real worker agents on loopback: a node lost mid-training (agent and workers SIGKILLed)
→ the next runner resumes from its checkpoint; a tampered artifact and a lying model → FAILED(verify), each node
blocked, success elsewhere; a rented Vast.ai instance runs the job and is destroyed; an unreachable first runner
and a provider without capacity → fallback; a real range model trained and scored through an agent passes local
hold-out and sample re-scoring verification."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from depin_core.net import free_port
from gpu_jobs import api
from gpu_jobs.agent.process import AgentProcess
from gpu_jobs.artifacts import load_artifact
from gpu_jobs.chain import DefaultRunnerFactory, Entry, Lease, run_chain
from gpu_jobs.runner import JobStatus
from gpu_jobs.spec import DatasetRef, FailureKind, JobSpec, JobState
from tests.support.fleet_data import FleetData
from tests.support.gpu_jobs import AGENT_TLS, ENV, TOKEN, train_spec
from tests.support.serving import RANGE_HP
from tests.support.toy_family import EVAL_IMPORT_PATH, LIE_ENV, EvalToy

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, AgentProcess]]:
    """Agents with a flaw, started side by side: ``slow`` pauses after its step-10 checkpoint (to be killed
    there), ``evil`` is honest but its owner tampers with its outputs, ``liar`` ships perturbed weights with
    honest metrics."""
    root = tmp_path_factory.mktemp("nodes")
    env = {"slow": {"TOY_PAUSE_AT_STEP": "10"}, "evil": {}, "liar": {LIE_ENV: "1"}}
    procs = {
        name: AgentProcess(root / name, TOKEN, env={**ENV, **extra}, tls=AGENT_TLS)
        for name, extra in env.items()
    }  # HTTPS with one certificate, pinned by its fingerprint (DEPIN_AGENT_TLS_FINGERPRINT)
    try:
        with ThreadPoolExecutor(len(procs)) as pool:
            list(pool.map(AgentProcess.start, procs.values()))
        yield procs
    finally:
        for proc in procs.values():
            proc.close()


@pytest.fixture()
def good(worker_agent: AgentProcess) -> AgentProcess:
    """An honest agent: the session's (each chain uses its own job id)."""
    return worker_agent


@pytest.fixture()
def data(toy_dataset: DatasetRef) -> DatasetRef:
    return toy_dataset


class Factory(DefaultRunnerFactory):
    """Timeouts so generous that a loaded test machine never passes for a lost node; ``runners`` keeps each
    agent runner by chain entry, so a test that kills a node can shorten that runner's heartbeat timeout."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(
            tmp / "jobs",
            env={"DEPIN_AGENT_TOKEN": TOKEN, "DEPIN_AGENT_TLS_FINGERPRINT": AGENT_TLS.fingerprint},
            nodes_file=tmp / "workers.json",
            local_env=ENV,
            heartbeat_timeout_s=300.0,
            connect_timeout_s=60.0,
        )
        self.runners: dict[str, object] = {}

    @contextlib.contextmanager
    def lease(self, entry: Entry, **kw: object) -> Iterator[Lease]:
        with super().lease(entry, **kw) as lease:  # type: ignore[arg-type]
            self.runners[entry.text] = lease.runner
            yield lease


def factory(tmp: Path) -> Factory:
    return Factory(tmp)


def toy_spec(tmp: Path, data: DatasetRef) -> JobSpec:
    """The toy job with ``evaluate`` (hold-out verification of untrusted results), a checkpoint every 5 steps."""
    return train_spec(data, tmp / "model", family=EVAL_IMPORT_PATH, every=5)


def test_a_node_lost_mid_training_resumes_from_its_checkpoint_on_the_next_agent(
    tmp_path: Path, data: DatasetRef, good: AgentProcess, nodes: dict[str, AgentProcess]
) -> None:
    slow = nodes["slow"]
    killed: list[int] = []
    f = factory(tmp_path)

    def mirrored(entry: str, job_id: str, step: int) -> bool:
        """Whether the runner's local mirror holds the checkpoint of ``step`` (the marker is written last)."""
        d = f.runners[entry].checkpoint_dir(job_id)  # type: ignore[attr-defined]
        return d is not None and (d / f"ckpt-{step:09d}.json").is_file()

    def on_status(entry: str, st: JobStatus) -> None:
        # the slow node saved step 10 and pauses there; once our mirror holds it (the mirror runs beside the
        # status polls, so wait for it, not for the node's word), lose the node. Only now, with the node surely
        # gone, does its runner's heartbeat timeout shrink: the loss is noticed at once, while a slow but live
        # node (a loaded machine) was never taken for a lost one before.
        if (
            entry == f"agent:{slow.url}"
            and (st.checkpoint_step or 0) >= 10
            and not killed
            and mirrored(entry, st.job_id, 10)
        ):
            killed.append(st.checkpoint_step or 0)
            slow.kill()
            f.runners[entry].heartbeat_timeout_s = 0.5  # type: ignore[attr-defined]

    lines: list[str] = []
    out = run_chain(
        toy_spec(tmp_path, data), [f"agent:{slow.url}", f"agent:{good.url}"], factory=f,
        jobs_dir=tmp_path / "jobs", on_status=on_status, on_log=lines.append,
    )  # fmt: skip
    assert killed == [10] and out.succeeded, out.result.error
    lost, done = out.attempts
    assert (lost.state, lost.failure) == (JobState.FAILED, FailureKind.INFRA)
    assert "heartbeat lost" in (lost.reason or "") or "did not answer" in (lost.reason or "")
    assert (done.state, done.resumed_from_step, done.verified) == (JobState.SUCCEEDED, 10, True)
    assert "resumed from step 10" in "\n".join(lines)
    assert lost.job_id == done.job_id and lost.node and done.node
    art = load_artifact(tmp_path / "model")
    assert art.metrics == out.result.metrics and art.metrics["steps"] == 30


def test_tampered_and_lying_results_fail_verification_then_the_job_succeeds_elsewhere(
    tmp_path: Path, data: DatasetRef, good: AgentProcess, nodes: dict[str, AgentProcess]
) -> None:
    """One chain: a node whose owner swaps the weights after the job (artifact hashes), the same node again
    (blocked, not retried), a node whose model lies with honest metrics (local hold-out evaluation), an honest
    node (verified)."""
    evil, liar = nodes["evil"], nodes["liar"]

    def on_status(entry: str, st: JobStatus) -> None:
        # once the job finished on the evil node, its owner swaps the weights on disk before we download
        if entry == f"agent:{evil.url}" and st.state == JobState.SUCCEEDED:
            weights = evil.data_dir / "out" / st.job_id / "weights.safetensors"
            blob = bytearray(weights.read_bytes())
            blob[-1] ^= 0xFF
            weights.write_bytes(bytes(blob))

    chain = [f"agent:{evil.url}", f"agent:{evil.url}/", f"agent:{liar.url}", f"agent:{good.url}"]
    out = run_chain(
        toy_spec(tmp_path, data), chain, factory=factory(tmp_path), jobs_dir=tmp_path / "jobs",
        on_status=on_status,
    )  # fmt: skip
    assert out.succeeded and out.runner == f"agent:{good.url}", out.result.error
    tampered, skipped, lie, done = out.attempts
    assert (tampered.state, tampered.failure, tampered.verified) == (
        JobState.FAILED,
        FailureKind.VERIFY,
        False,
    )
    assert "sha256" in (tampered.reason or "")
    assert skipped.failure == FailureKind.INFRA and "blocked" in (
        skipped.reason or ""
    )  # same node, not retried
    assert (lie.state, lie.failure, lie.verified) == (JobState.FAILED, FailureKind.VERIFY, False)
    assert "local hold-out evaluation disagrees" in (lie.reason or "") and "mse" in (lie.reason or "")
    assert done.verified is True and (done.verification or "").startswith(
        "hold-out evaluation: 1 metrics match"
    )
    # the good node's artifact, every file verified; its model really has the metrics it reports
    model = tmp_path / "model"
    honest = EvalToy().evaluate(model, [Path(data.path) / "part-0.parquet"])
    assert honest["mse"] == pytest.approx(load_artifact(model).metrics["mse"], rel=1e-6)
    assert not list(tmp_path.glob(".model.*"))  # neither untrusted artifact reached the destination


def test_a_real_range_model_trained_and_scored_through_an_agent_is_verified_locally(
    tmp_path: Path, serving_fleet: FleetData, good: AgentProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEPIN_AGENT_TOKEN", TOKEN)
    monkeypatch.setenv("DEPIN_AGENT_TLS_FINGERPRINT", str(good.fingerprint))  # pins the agent's certificate
    model = tmp_path / "range-model"
    doc = api.train(
        dataset=serving_fleet.telemetry, model="range", out=model, runners=[f"agent:{good.url}"],
        params=RANGE_HP, seed=1, jobs_dir=tmp_path / "jobs",
    )  # fmt: skip
    assert doc["state"] == "SUCCEEDED" and doc["runner"] == f"agent:{good.url}"
    (attempt,) = doc["attempts"]
    assert attempt["verified"] is True and attempt["verification"].startswith("hold-out evaluation")
    assert "mae=" in attempt["verification"] and attempt["node"]
    assert load_artifact(model).metrics["mae"] == doc["metrics"]["mae"]

    scores = tmp_path / "scores.parquet"
    scored = api.score(
        model_dir=model, dataset=serving_fleet.telemetry, out=scores, runners=[f"agent:{good.url}"],
        jobs_dir=tmp_path / "jobs",
    )  # fmt: skip
    (attempt,) = scored["attempts"]
    assert attempt["verified"] is True and attempt["verification"].startswith("re-scored")
    assert scores.is_file() and scored["rows"] and not list(tmp_path.glob(".scores.parquet*"))
    shutil.rmtree(tmp_path / "jobs", ignore_errors=True)


def test_rented_vast_and_ionet_machines_run_the_job_and_are_destroyed_unreachable_and_full_runners_fall_back(
    tmp_path: Path, data: DatasetRef
) -> None:
    """Vast.ai: quote → launch → agent ready → job → destroy. Then an agent nobody listens for and a Vast.ai
    without capacity fall back (bounded time) to io.net: quote → deploy → agent ready → job → terminate."""
    from tests.support.fakes.ionet import FakeIonet
    from tests.support.fakes.vast import FakeVast

    def machine(d: Path, token: str) -> AgentProcess:
        return AgentProcess(d, token, env=ENV)

    with (
        FakeVast(tmp_path / "vast", agent_factory=machine) as vast,
        FakeIonet(tmp_path / "ionet", agent_factory=machine) as ionet,
    ):
        f = DefaultRunnerFactory(
            tmp_path / "jobs",
            env={
                "DEPIN_VAST_API_KEY": vast.api_key, "DEPIN_VAST_URL": vast.base_url,
                "DEPIN_IONET_API_KEY": ionet.api_key, "DEPIN_IONET_URL": ionet.base_url,
                "DEPIN_AGENT_TOKEN": TOKEN,
            },
            local_env=ENV, provision_timeout_s=120, provider_poll_s=0.1, connect_timeout_s=2.0,
        )  # fmt: skip
        out = run_chain(toy_spec(tmp_path, data), ["vast", "local"], factory=f, jobs_dir=tmp_path / "jobs")
        assert out.succeeded and out.runner == "vast", out.result.error
        (rented,) = out.attempts
        assert rented.verified is True and rented.node and rented.cost_usd is not None and rented.cost_usd > 0
        assert vast.launches == 1 and len(vast.destroyed) == 1  # released after the job

        vast.no_capacity = True
        closed = f"agent:http://127.0.0.1:{free_port()}"
        out = run_chain(toy_spec(tmp_path / "2", data), [closed, "vast", "ionet", "local"], factory=f,
                        jobs_dir=tmp_path / "jobs", max_total_s=300)  # fmt: skip
        assert out.succeeded and out.runner == "ionet", out.result.error
        unreachable, full, deployed = out.attempts
        assert unreachable.failure == FailureKind.INFRA and "cannot reach the agent" in (
            unreachable.reason or ""
        )
        # (how long the fallback takes is bench/dispatch.py's business, not a test's: no timing assertion)
        assert full.failure == FailureKind.INFRA and "no offer" in (full.reason or "")
        assert deployed.verified is True and deployed.cost_usd is not None and deployed.cost_usd > 0
        assert vast.launches == 1 and len(vast.destroyed) == 1
        assert ionet.launches == 1 and [d["status"] for d in ionet.deployments.values()] == ["destroyed"]
        assert load_artifact(tmp_path / "2" / "model").metrics == out.result.metrics
