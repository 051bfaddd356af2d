"""The runner chain with real worker agents on loopback: a node lost mid-training (agent and workers SIGKILLed)
→ the next runner resumes from its checkpoint; a tampered artifact and a lying model → FAILED(verify), the node
blocked, success elsewhere; an unreachable first runner → fallback; a real range model trained and scored
through an agent passes local hold-out and sample re-scoring verification."""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from depin_core.net import free_port
from gpu_jobs.agent.process import AgentProcess
from gpu_jobs.artifacts import load_artifact
from gpu_jobs.chain import DefaultRunnerFactory, run_chain
from gpu_jobs.runner import JobStatus
from gpu_jobs.spec import DatasetRef, FailureKind, JobSpec, JobState
from pipelines._jobs_cmd import run_score, run_train
from tests.gpu_jobs.models.fleet_data import FleetData
from tests.gpu_jobs.test_chain import EVAL_TOY, LIE_ENV, EvalToy
from tests.gpu_jobs.toy_family import write_toy_dataset
from tests.serving.fixtures import RANGE_HP

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(REPO)}
TOKEN = "dispatch-test-" + secrets.token_hex(12)


@pytest.fixture()
def agents(tmp_path: Path) -> Iterator[dict[str, AgentProcess]]:
    """Three agents: ``slow`` pauses after its step-10 checkpoint (to be killed there), ``liar`` ships perturbed
    weights with honest metrics, ``good`` is honest. Started on demand by ``start``."""
    procs = {
        "slow": AgentProcess(tmp_path / "agent-slow", TOKEN, env={**ENV, "TOY_PAUSE_AT_STEP": "10"}),
        "liar": AgentProcess(tmp_path / "agent-liar", TOKEN, env={**ENV, LIE_ENV: "1"}),
        "good": AgentProcess(tmp_path / "agent-good", TOKEN, env=ENV),
    }
    try:
        yield procs
    finally:
        for p in procs.values():
            p.close()


def factory(tmp: Path) -> DefaultRunnerFactory:
    return DefaultRunnerFactory(
        tmp / "jobs",
        env={"DEPIN_AGENT_TOKEN": TOKEN},
        nodes_file=tmp / "workers.json",
        local_env=ENV,
        heartbeat_timeout_s=3.0,
        connect_timeout_s=2.0,
    )


@pytest.fixture()
def data(tmp_path: Path) -> DatasetRef:
    return DatasetRef.from_path(write_toy_dataset(tmp_path / "data" / "part-0.parquet").parent)


def toy_spec(tmp: Path, data: DatasetRef, **hp: object) -> JobSpec:
    return JobSpec.model_validate(
        {
            "kind": "train",
            "model": {"family": EVAL_TOY, "hyperparameters": {"steps": 30, **hp}},
            "inputs": [data.model_dump()],
            "seed": 5,
            "checkpoint": {"every_steps": 5},
            "limits": {"max_wall_s": 120},
            "outputs": {"dir": str(tmp / "model")},
        }
    )


def test_a_node_lost_mid_training_resumes_from_its_checkpoint_on_the_next_agent(
    tmp_path: Path, data: DatasetRef, agents: dict[str, AgentProcess]
) -> None:
    slow, good = agents["slow"].start(), agents["good"].start()
    killed: list[int] = []

    def on_status(entry: str, st: JobStatus) -> None:
        # the slow node saved (and we mirrored) step 10, then pauses: lose the node there
        if entry == f"agent:{slow.url}" and (st.checkpoint_step or 0) >= 10 and not killed:
            killed.append(st.checkpoint_step or 0)
            slow.kill()

    lines: list[str] = []
    out = run_chain(
        toy_spec(tmp_path, data), [f"agent:{slow.url}", f"agent:{good.url}"], factory=factory(tmp_path),
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


def test_a_tampered_artifact_fails_verification_then_the_job_succeeds_elsewhere(
    tmp_path: Path, data: DatasetRef, agents: dict[str, AgentProcess]
) -> None:
    good = agents["good"].start()
    evil = AgentProcess(tmp_path / "agent-evil", TOKEN, env=ENV).start()
    try:

        def on_status(entry: str, st: JobStatus) -> None:
            # once the job finished on the evil node, its owner swaps the weights on disk before we download
            if entry == f"agent:{evil.url}" and st.state == JobState.SUCCEEDED:
                weights = evil.data_dir / "out" / st.job_id / "weights.safetensors"
                blob = bytearray(weights.read_bytes())
                blob[-1] ^= 0xFF
                weights.write_bytes(bytes(blob))

        out = run_chain(
            toy_spec(tmp_path, data), [f"agent:{evil.url}", f"agent:{evil.url}/", f"agent:{good.url}"],
            factory=factory(tmp_path), jobs_dir=tmp_path / "jobs", on_status=on_status,
        )  # fmt: skip
    finally:
        evil.close()
    assert out.succeeded and out.runner == f"agent:{good.url}", out.result.error
    tampered, skipped, done = out.attempts
    assert (tampered.state, tampered.failure, tampered.verified) == (
        JobState.FAILED,
        FailureKind.VERIFY,
        False,
    )
    assert "sha256" in (tampered.reason or "")
    assert skipped.failure == FailureKind.INFRA and "blocked" in (
        skipped.reason or ""
    )  # same node, not retried
    assert done.verified is True
    load_artifact(tmp_path / "model")  # the good node's artifact, every file verified


def test_a_lying_model_fails_holdout_verification_then_local_succeeds(
    tmp_path: Path, data: DatasetRef, agents: dict[str, AgentProcess]
) -> None:
    liar = agents["liar"].start()
    out = run_chain(toy_spec(tmp_path, data), [f"agent:{liar.url}", "local"], factory=factory(tmp_path),
                    jobs_dir=tmp_path / "jobs")  # fmt: skip
    assert out.succeeded and out.runner == "local", out.result.error
    lie, done = out.attempts
    assert (lie.failure, lie.verified) == (FailureKind.VERIFY, False)
    assert "local hold-out evaluation disagrees" in (lie.reason or "")
    assert done.verified is None  # local is trusted
    model = tmp_path / "model"
    honest = EvalToy().evaluate(model, [Path(data.path) / "part-0.parquet"])
    assert honest["mse"] == pytest.approx(load_artifact(model).metrics["mse"], rel=1e-6)
    assert not list(tmp_path.glob(".model.*.verify"))  # the lying artifact never reached the destination


def test_an_unreachable_first_runner_falls_back(tmp_path: Path, data: DatasetRef) -> None:
    closed = f"agent:http://127.0.0.1:{free_port()}"
    out = run_chain(toy_spec(tmp_path, data), [closed, "local"], factory=factory(tmp_path),
                    jobs_dir=tmp_path / "jobs", max_total_s=300)  # fmt: skip
    assert out.succeeded and out.runner == "local"
    first = out.attempts[0]
    assert first.failure == FailureKind.INFRA and "cannot reach the agent" in (first.reason or "")
    assert first.seconds < 20  # bounded by the connect timeout (2 s) and the health retry budget


def test_a_real_range_model_trained_and_scored_through_an_agent_is_verified_locally(
    tmp_path: Path, serving_fleet: FleetData, agents: dict[str, AgentProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    good = agents["good"].start()
    monkeypatch.setenv("DEPIN_AGENT_TOKEN", TOKEN)
    model = tmp_path / "range-model"
    doc = run_train(
        dataset=serving_fleet.telemetry, model="range", out=model, runners=[f"agent:{good.url}"],
        params=RANGE_HP, seed=1, jobs_dir=tmp_path / "jobs", show_progress=False,
    )  # fmt: skip
    assert doc["state"] == "SUCCEEDED" and doc["runner"] == f"agent:{good.url}"
    (attempt,) = doc["attempts"]
    assert attempt["verified"] is True and attempt["verification"].startswith("hold-out evaluation")
    assert "mae=" in attempt["verification"] and attempt["node"]
    assert load_artifact(model).metrics["mae"] == doc["metrics"]["mae"]

    scores = tmp_path / "scores.parquet"
    scored = run_score(
        model_dir=model, dataset=serving_fleet.telemetry, out=scores, runners=[f"agent:{good.url}"],
        jobs_dir=tmp_path / "jobs", show_progress=False,
    )  # fmt: skip
    (attempt,) = scored["attempts"]
    assert attempt["verified"] is True and attempt["verification"].startswith("re-scored")
    assert scores.is_file() and scored["rows"] and not list(tmp_path.glob(".scores.parquet*"))
    shutil.rmtree(tmp_path / "jobs", ignore_errors=True)


def test_a_rented_vast_instance_runs_the_job_and_is_destroyed_no_capacity_falls_back(
    tmp_path: Path, data: DatasetRef
) -> None:
    from tests.fakes.vast import FakeVast

    with FakeVast(tmp_path / "vast", agent_factory=lambda d, token: AgentProcess(d, token, env=ENV)) as fake:
        f = DefaultRunnerFactory(
            tmp_path / "jobs",
            env={"DEPIN_VAST_API_KEY": fake.api_key, "DEPIN_VAST_URL": fake.base_url},
            local_env=ENV,
            provision_timeout_s=120,
            provider_poll_s=0.1,
        )
        out = run_chain(toy_spec(tmp_path, data), ["vast", "local"], factory=f, jobs_dir=tmp_path / "jobs")
        assert out.succeeded and out.runner == "vast", out.result.error
        (rented,) = out.attempts
        assert rented.verified is True and rented.node and rented.cost_usd is not None and rented.cost_usd > 0
        assert fake.launches == 1 and len(fake.destroyed) == 1  # released after the job

        fake.no_capacity = True
        out = run_chain(toy_spec(tmp_path, data), ["vast", "local"], factory=f, jobs_dir=tmp_path / "jobs")
        assert out.succeeded and out.runner == "local"
        assert out.attempts[0].failure == FailureKind.INFRA and "no offer" in (out.attempts[0].reason or "")
        assert fake.launches == 1 and len(fake.destroyed) == 1
