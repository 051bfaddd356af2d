"""The runner chain: fallback on infrastructure failures with resume from the last checkpoint, stop on user
failures, FAILED(verify) + blocklist for untrusted results that do not verify, bounded time, every attempt
recorded. In-process fake runners for the chain's logic; the same scenarios with real worker agents (a node lost
mid-training, a tampered artifact, a lying model, an unreachable runner, a rented instance) are in
``tests/e2e/test_dispatch.py``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from depin_core.errors import ConfigError, PermanentError, TransientError
from depin_core.tls import make_certificate
from gpu_jobs.artifacts import load_artifact, write_artifact
from gpu_jobs.chain import (
    DefaultRunnerFactory,
    Entry,
    Lease,
    newest_checkpoint,
    parse_entry,
    run_chain,
)
from gpu_jobs.runner import JobStatus
from gpu_jobs.spec import FailureKind, JobResult, JobSpec, JobState
from gpu_jobs.verify import Verification

# --------------------------------------------------------------------------------------------- fakes


@dataclass
class Fake:
    """An in-process runner acting out one scenario: ok | infra | user | unreachable | hang | stall | cancelled."""

    behaviour: str
    root: Path
    name: str = "fake"
    ckpt_step: int | None = None  # leave a checkpoint at this step (infra)
    submitted: list[JobSpec] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    resume_steps: list[int | None] = field(default_factory=list)  # newest checkpoint in resume_from at submit

    def submit(self, spec: JobSpec, *, job_id: str | None = None) -> str:
        if self.behaviour == "unreachable":
            raise TransientError("agent http://10.9.9.9:1 is unreachable (connect timeout)")
        assert job_id is not None
        self.submitted.append(spec)
        resume = spec.checkpoint.resume_from
        self.resume_steps.append(newest_checkpoint(Path(resume)) if resume else None)
        self.job_ids.append(job_id)
        if self.ckpt_step is not None:
            d = self.root / job_id / "checkpoints"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"ckpt-{self.ckpt_step:09d}.safetensors").write_bytes(b"tensors")
            (d / f"ckpt-{self.ckpt_step:09d}.json").write_text("{}")
        return job_id

    def status(self, job_id: str) -> JobStatus:
        if self.behaviour == "stall":
            raise TransientError("connection refused")
        state = (
            JobState.RUNNING if self.behaviour == "hang" and job_id not in self.cancelled else JobState.FAILED
        )
        return JobStatus(job_id=job_id, state=state, step=3)

    def logs(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        return (f"{self.name}: step 3\n", 1) if offset == 0 else ("", offset)

    def result(self, job_id: str, timeout: float | None = None) -> JobResult:
        spec = self.submitted[-1]
        base = JobResult(job_id=job_id, spec_hash=spec.spec_hash, state=JobState.FAILED)
        if self.behaviour == "ok":
            arts = write_artifact(
                spec.outputs.dir,
                state_dict={"w": torch.ones(2)},
                model_config={"family": "toy"},
                metrics={"mse": 0.5, "by": self.name},
                spec=spec,
            )
            return base.model_copy(
                update={"state": JobState.SUCCEEDED, "artifacts": arts, "metrics": {"mse": 0.5}}
            )
        if self.behaviour == "user":
            return base.model_copy(update={"failure": FailureKind.USER, "error": "ValueError: bad column"})
        if self.behaviour == "cancelled":
            return base.model_copy(update={"state": JobState.CANCELLED, "error": "cancelled (SIGTERM)"})
        return base.model_copy(update={"failure": FailureKind.INFRA, "error": "worker killed by SIGKILL"})

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)

    def checkpoint_dir(self, job_id: str) -> Path | None:
        d = self.root / job_id / "checkpoints"
        return d if d.is_dir() else None


class FakeFactory:
    """Chain entries → fakes (or real runners); records leases and releases."""

    def __init__(
        self, runners: dict[str, Any], nodes: dict[str, str] | None = None, usd: float | None = None
    ):
        self.runners = runners
        self.nodes = nodes or {}
        self.usd = usd
        self.released: list[str] = []

    def check(self, entry: Entry) -> None:
        if entry.text not in self.runners:
            raise ConfigError(f"runner {entry.text!r}: unknown in this test")

    @contextlib.contextmanager
    def lease(self, entry: Entry, **kw: Any) -> Iterator[Lease]:
        node = self.nodes.get(entry.text, entry.text)
        try:
            yield Lease(self.runners[entry.text], node=node, usd_per_hour=self.usd, block_key=("fake", node))
        finally:
            self.released.append(entry.text)


def _spec(tmp: Path, family: str = "range", **kw: Any) -> JobSpec:
    return JobSpec.model_validate(
        {"kind": "train", "model": {"family": family}, "outputs": {"dir": str(tmp / "model")}, **kw}
    )


def ok_verifier(spec: JobSpec, result: JobResult) -> Verification:
    return Verification(True, "checked")


# -------------------------------------------------------------------------------------------- entries


def test_entries_parse_and_bad_ones_name_the_fix() -> None:
    assert parse_entry("local") == Entry("local", "local")
    assert parse_entry("agent:http://10.0.0.5:8900/") == Entry(
        "agent:http://10.0.0.5:8900/", "agent", "http://10.0.0.5:8900"
    )
    assert parse_entry("node:lab-a100").arg == "lab-a100"
    assert parse_entry("manual").arg == "manual" and parse_entry("vast").kind == "provider"
    assert not parse_entry("ionet").trusted and parse_entry("local").trusted
    for bad in ("gpu-a", "agent:10.0.0.5:8900", "node:", "runpod"):
        with pytest.raises(ConfigError, match="use local, agent:"):
            parse_entry(bad)
    with pytest.raises(ConfigError, match="empty"):
        run_chain(_spec(Path("/tmp")), [])


def test_default_factory_checks_tokens_and_keys_before_running(tmp_path: Path) -> None:
    f = DefaultRunnerFactory(tmp_path, env={}, nodes_file=tmp_path / "workers.json")
    with pytest.raises(ConfigError, match="DEPIN_AGENT_TOKEN"):
        f.check(parse_entry("agent:http://127.0.0.1:9"))
    with pytest.raises(ConfigError, match="DEPIN_VAST_API_KEY"):
        f.check(parse_entry("vast"))
    with pytest.raises(ConfigError, match="DEPIN_IONET_API_KEY"):
        f.check(parse_entry("ionet"))
    with pytest.raises(ConfigError, match="node 'gpu-1' is not registered"):
        f.check(parse_entry("node:gpu-1"))
    from pydantic import SecretStr

    from gpu_jobs.providers.manual import ManualProvider

    cert = make_certificate()
    ManualProvider(tmp_path / "workers.json").register(
        "gpu-1", "https://10.0.0.7:8900", SecretStr("n" * 32), usd_per_hour=0.5, tls_cert=cert.cert_pem
    )
    f.check(parse_entry("node:gpu-1"))
    f.check(parse_entry("agent:https://10.0.0.7:8900/"))  # registered: token and certificate pinned
    assert f._agent_token(parse_entry("agent:https://10.0.0.7:8900/")).get_secret_value() == "n" * 32
    assert f._agent_pin(parse_entry("agent:https://10.0.0.7:8900")) == (cert.cert_pem, cert.fingerprint)
    f = DefaultRunnerFactory(tmp_path, env={"DEPIN_AGENT_TOKEN": "t" * 32, "DEPIN_VAST_API_KEY": "k"})
    f.check(parse_entry("agent:http://127.0.0.1:9"))
    # before any connection: plain HTTP to a remote host, and an https agent nobody pinned
    with pytest.raises(ConfigError, match="plain HTTP to a remote machine"):
        f.check(parse_entry("agent:http://10.0.0.8:8900"))
    with pytest.raises(ConfigError, match="DEPIN_AGENT_TLS_FINGERPRINT"):
        f.check(parse_entry("agent:https://10.0.0.8:8900"))
    pinned = {"DEPIN_AGENT_TOKEN": "t" * 32, "DEPIN_AGENT_TLS_FINGERPRINT": cert.fingerprint}
    DefaultRunnerFactory(tmp_path, env=pinned).check(parse_entry("agent:https://10.0.0.8:8900"))
    f.check(parse_entry("vast"))
    f.check(parse_entry("local"))


# ------------------------------------------------------------------------------------- chain (fakes)


def test_infra_failure_falls_back_and_resumes_from_the_checkpoint(tmp_path: Path) -> None:
    a = Fake("infra", tmp_path / "a", name="a", ckpt_step=20)
    b = Fake("unreachable", tmp_path / "b", name="b")
    c = Fake("ok", tmp_path / "c", name="c")
    factory = FakeFactory({"node:a": a, "node:b": b, "node:c": c}, usd=3.6)
    lines: list[str] = []
    spec = _spec(tmp_path)
    out = run_chain(
        spec, ["node:a", "node:b", "node:c"], factory=factory, jobs_dir=tmp_path / "jobs",
        verify=ok_verifier, on_log=lines.append, poll_s=0.01,
    )  # fmt: skip
    assert out.succeeded and out.runner == "node:c"
    assert [(x.runner, x.state, x.failure) for x in out.attempts] == [
        ("node:a", JobState.FAILED, FailureKind.INFRA),
        ("node:b", JobState.FAILED, FailureKind.INFRA),
        ("node:c", JobState.SUCCEEDED, None),
    ]
    assert "SIGKILL" in (out.attempts[0].reason or "") and "unreachable" in (out.attempts[1].reason or "")
    assert [x.resumed_from_step for x in out.attempts] == [None, 20, 20]
    assert all(x.job_id == out.job_id for x in out.attempts) and a.job_ids == c.job_ids == [out.job_id]
    assert out.attempts[2].verified is True and out.attempts[2].verification == "checked"
    assert all(x.cost_usd is not None and x.cost_usd >= 0 for x in out.attempts)
    assert factory.released == ["node:a", "node:b", "node:c"]  # every lease released
    # the resumed attempt got the checkpoint as resume_from (a copy the chain keeps), the same spec_hash
    resumed = c.submitted[0]
    assert resumed.spec_hash == spec.spec_hash and resumed.checkpoint.resume_from is not None
    assert a.resume_steps == [None] and c.resume_steps == [20]
    assert not Path(resumed.checkpoint.resume_from).exists()  # the chain's copy is cleaned up afterwards
    # the untrusted output was staged, then moved into place; result paths point there
    model = tmp_path / "model"
    assert load_artifact(model).metrics["by"] == "c"
    assert all(Path(p).parent == model.resolve() for p in out.result.artifacts)
    assert not list(tmp_path.glob(".model.*"))
    assert "a: step 3" in lines and any("node:a failed" in x and "resuming from step 20" in x for x in lines)


def test_a_user_failure_stops_the_chain_after_bounded_retries(tmp_path: Path) -> None:
    a, b = Fake("user", tmp_path / "a"), Fake("ok", tmp_path / "b")
    out = run_chain(_spec(tmp_path), ["node:a", "node:b"], factory=FakeFactory({"node:a": a, "node:b": b}),
                    jobs_dir=tmp_path, verify=ok_verifier, poll_s=0.01)  # fmt: skip
    assert not out.succeeded and out.result.failure == FailureKind.USER and out.runner is None
    assert [x.runner for x in out.attempts] == ["node:a"] and not b.submitted
    out = run_chain(_spec(tmp_path), ["node:a", "node:b"], factory=FakeFactory({"node:a": a, "node:b": b}),
                    jobs_dir=tmp_path, verify=ok_verifier, max_user_retries=2, poll_s=0.01)  # fmt: skip
    assert [x.runner for x in out.attempts] == ["node:a"] * 3 and not b.submitted
    assert len({x.job_id for x in out.attempts}) == 3  # a retry is a new job on that runner


def test_a_result_that_fails_verification_blocks_the_node_and_runs_elsewhere(tmp_path: Path) -> None:
    liar, same_node, honest = (
        Fake("ok", tmp_path / "l", name="liar"),
        Fake("ok", tmp_path / "s"),
        Fake("ok", tmp_path / "h", name="honest"),
    )
    factory = FakeFactory(
        {"node:liar": liar, "agent:http://liar:1": same_node, "local": honest},
        nodes={"node:liar": "host-7", "agent:http://liar:1": "host-7", "local": "me"},
    )
    seen: list[str] = []

    def verifier(spec: JobSpec, result: JobResult) -> Verification:
        seen.append(spec.outputs.dir)
        by = load_artifact(spec.outputs.dir).metrics["by"]
        return Verification(by != "liar", f"mse differs ({by})")

    out = run_chain(_spec(tmp_path), ["node:liar", "agent:http://liar:1", "local"], factory=factory,
                    jobs_dir=tmp_path, verify=verifier, poll_s=0.01)  # fmt: skip
    assert out.succeeded and out.runner == "local"
    first, second, third = out.attempts
    assert (first.state, first.failure, first.verified) == (JobState.FAILED, FailureKind.VERIFY, False)
    assert "mse differs (liar)" in (first.reason or "")
    assert (
        second.failure == FailureKind.INFRA and "blocked" in (second.reason or "") and not same_node.submitted
    )
    assert third.verified is None  # local is trusted: not verified
    assert len(seen) == 1 and ".verify" in seen[0]  # verified in the staging dir, which is gone now
    assert not Path(seen[0]).exists() and load_artifact(tmp_path / "model").metrics["by"] == "honest"


def test_every_runner_failing_names_each_reason(tmp_path: Path) -> None:
    runners = {"node:a": Fake("infra", tmp_path / "a"), "node:b": Fake("cancelled", tmp_path / "b")}
    out = run_chain(_spec(tmp_path), list(runners), factory=FakeFactory(runners), jobs_dir=tmp_path,
                    verify=ok_verifier, poll_s=0.01)  # fmt: skip
    assert not out.succeeded and out.runner is None and out.result.failure == FailureKind.INFRA
    assert out.result.error is not None and out.result.error.startswith("every runner of the chain failed")
    assert "node:a: worker killed by SIGKILL" in out.result.error and "preempted" in out.result.error
    assert not (tmp_path / "model").exists()


def test_time_is_bounded_hung_and_silent_runners_are_left(tmp_path: Path) -> None:
    hang, stall, ok = Fake("hang", tmp_path / "h"), Fake("stall", tmp_path / "s"), Fake("ok", tmp_path / "o")
    runners = {"node:stall": stall, "node:ok": ok}
    out = run_chain(_spec(tmp_path), list(runners), factory=FakeFactory(runners), jobs_dir=tmp_path,
                    verify=ok_verifier, poll_s=0.01, stall_s=0.2)  # fmt: skip
    assert out.succeeded and "did not answer for 0.2 s" in (out.attempts[0].reason or "")

    runners = {"node:hang": hang, "node:ok": ok}
    out = run_chain(_spec(tmp_path), list(runners), factory=FakeFactory(runners), jobs_dir=tmp_path,
                    verify=ok_verifier, poll_s=0.01, max_total_s=0.5)  # fmt: skip
    assert not out.succeeded and hang.cancelled == [out.job_id]
    assert "ran out of time" in (out.result.error or "") and [x.runner for x in out.attempts] == ["node:hang"]


def test_permanent_runner_errors_move_on_but_config_errors_stop(tmp_path: Path) -> None:
    class WrongToken(Fake):
        def submit(self, spec: JobSpec, *, job_id: str | None = None) -> str:
            raise PermanentError("wrong token for agent URL; check DEPIN_AGENT_TOKEN")

    runners = {"node:a": WrongToken("ok", tmp_path / "a"), "node:b": Fake("ok", tmp_path / "b")}
    out = run_chain(_spec(tmp_path), list(runners), factory=FakeFactory(runners), jobs_dir=tmp_path,
                    verify=ok_verifier, poll_s=0.01)  # fmt: skip
    assert out.succeeded and "wrong token" in (out.attempts[0].reason or "")
    with pytest.raises(ConfigError, match="unknown in this test"):
        run_chain(_spec(tmp_path), ["node:a", "node:zz"], factory=FakeFactory(runners), jobs_dir=tmp_path)
