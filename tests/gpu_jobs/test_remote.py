"""AgentRunner end to end against a real worker agent process on loopback (toy family jobs)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr

from depin_core.errors import ConfigError, PermanentError, TransientError
from depin_core.net import free_port
from depin_core.tls import PinMismatch
from gpu_jobs.agent.process import AgentProcess
from gpu_jobs.artifacts import MANIFEST, WEIGHTS, load_artifact
from gpu_jobs.checkpoint import FileCheckpointer
from gpu_jobs.errors import AgentAuthError
from gpu_jobs.local import LocalRunner
from gpu_jobs.remote import AgentRunner
from gpu_jobs.runner import JobRunner
from gpu_jobs.spec import DatasetRef, FailureKind, JobResult, JobState, sha256_file
from tests.support.gpu_jobs import ENV, TOKEN, infer_spec, toy_data, train_spec, wait_for
from tests.support.tls_proxy import MitmProxy
from tests.support.toy_family import write_toy_dataset

pytestmark = pytest.mark.e2e


class Recorder(httpx.HTTPTransport):
    """A real transport that records (method, path, headers) of every request; ``corrupt`` flips the first
    byte of the answer for paths ending with it."""

    def __init__(self, corrupt: str | None = None, *, verify: ssl.SSLContext | bool = True) -> None:
        super().__init__(verify=verify)  # a transport carries its own TLS settings: the agent's pin
        self.calls: list[tuple[str, str, dict[str, str]]] = []
        self.corrupt = corrupt

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls.append((request.method, request.url.path, dict(request.headers)))
        response = super().handle_request(request)
        if self.corrupt and request.url.path.endswith(self.corrupt) and response.status_code == 200:
            body = bytearray(response.read())
            body[0] ^= 0xFF
            return httpx.Response(200, headers=response.headers, content=bytes(body))
        return response

    def count(self, method: str, prefix: str) -> int:
        return sum(1 for m, p, _ in self.calls if m == method and p.startswith(prefix))


def _start_agent(data_dir: Path, env: dict[str, str] | None = None) -> AgentProcess:
    return AgentProcess(data_dir, TOKEN, env={**ENV, **(env or {})}).start()


@pytest.fixture()
def agent(worker_agent: AgentProcess) -> AgentProcess:
    """The session's honest agent: every test uses its own job ids (and output dirs)."""
    return worker_agent


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DatasetRef:
    """Toy data of its own (seed 2): the first job here finds its blob missing on the shared agent."""
    return toy_data(tmp_path_factory.mktemp("toy"), seed=2)


@dataclass(frozen=True)
class Reference:
    """The toy job trained (no checkpoints) and its model scoring the data, both through ``LocalRunner``."""

    train: JobResult
    predictions: Path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, data: DatasetRef) -> Reference:
    tmp = tmp_path_factory.mktemp("local")
    with LocalRunner(tmp / "jobs", env=ENV) as local:
        want = local.result(local.submit(train_spec(data, tmp / "model", every=0)), timeout=120)
        scores = local.result(local.submit(infer_spec(data, tmp / "scores", tmp / "model")), timeout=120)
    assert want.state == scores.state == JobState.SUCCEEDED, want.error or scores.error
    return Reference(want, tmp / "scores" / "predictions.parquet")


def _runner(url: str, root: Path, **kw: object) -> AgentRunner:
    return AgentRunner(url, SecretStr(TOKEN), workdir_root=root, **kw)  # type: ignore[arg-type]


def test_agent_job_equals_local_job(
    tmp_path: Path,
    data: DatasetRef,
    agent: AgentProcess,
    reference: Reference,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    want = reference.train
    rec = Recorder(verify=agent.verify)
    lines: list[str] = []
    spec = train_spec(data, tmp_path / "agent-model")  # a checkpoint every 10 steps
    data_blob = f"/v1/blobs/{data.files[0].sha256}"
    with _runner(
        agent.url, tmp_path / "remote", tls_cert=agent.tls_cert, transport=rec, on_log=lines.append
    ) as runner:
        assert isinstance(runner, JobRunner)
        job_id = runner.submit(spec)
        res = runner.result(job_id, timeout=120)
        text, offset = runner.logs(job_id)
        st = runner.status(job_id)
        ckpt_dir = runner.checkpoint_dir(job_id)
        node = runner.health()["node"]
        assert rec.count("PUT", "/v1/blobs/") == len(data.files) == 1
        # inference with the model that came back (another job): the dataset is held already, HEAD says so and
        # it is not sent again; only the model's files are uploaded
        scores = runner.result(
            runner.submit(infer_spec(data, tmp_path / "agent-scores", tmp_path / "agent-model")), timeout=120
        )
    assert rec.count("PUT", data_blob) == 1 and rec.count("HEAD", data_blob) >= 2
    assert rec.count("PUT", "/v1/blobs/") == 1 + len(list((tmp_path / "agent-model").iterdir()))

    assert res.state == JobState.SUCCEEDED, res.error
    assert res.job_id == job_id and res.spec_hash == spec.spec_hash == want.spec_hash
    assert res.metrics == pytest.approx(want.metrics, rel=1e-5)
    # artifacts: local absolute paths, each verified, and the artifact loads with its manifest digest
    out = (tmp_path / "agent-model").resolve()
    assert set(res.artifacts) == {str(p) for p in out.iterdir()} and len(res.artifacts) >= 2
    assert all(sha256_file(p) == sha for p, sha in res.artifacts.items())
    art = load_artifact(out, expected_manifest_sha256=res.artifacts[str(out / MANIFEST)])
    assert art.manifest["spec_hash"] == spec.spec_hash and art.metrics == res.metrics
    assert [(a.attempt, a.runner, a.node, a.state) for a in res.attempts] == [
        (1, "agent", node, JobState.SUCCEEDED)
    ]
    # status, logs (proxied and streamed to on_log), the mirrored last checkpoint
    assert (st.state, st.step, st.total) == (JobState.SUCCEEDED, 30, 30)
    assert "step 30/30" in text and offset == len(text.encode())
    assert any("step 30/30" in line for line in lines)
    assert ckpt_dir is not None and sorted(p.name for p in ckpt_dir.iterdir()) == [
        "ckpt-000000030.json",
        "ckpt-000000030.safetensors",
    ]
    assert FileCheckpointer(ckpt_dir, every_steps=10).restore()["step"] == 30  # type: ignore[index]
    # inference with the model that came back: the same predictions as the local pipeline
    assert scores.state == JobState.SUCCEEDED, scores.error
    pred = tmp_path / "agent-scores" / "predictions.parquet"
    assert list(scores.artifacts) == [str(pred.resolve())]
    got = pq.read_table(pred)["prediction"].to_numpy()
    exp = pq.read_table(reference.predictions)["prediction"].to_numpy()
    assert got == pytest.approx(exp, rel=1e-5, abs=1e-6)
    # the token never shows up in a repr or a log line
    assert TOKEN not in repr(runner) and TOKEN not in caplog.text


def test_auth_reachability_and_blob_uploads(tmp_path: Path, agent: AgentProcess) -> None:
    spec = train_spec(DatasetRef.from_path(write_toy_dataset(tmp_path / "d.parquet")), tmp_path / "m")

    wrong = AgentRunner(
        agent.url, SecretStr("not-the-token-0123456789"), workdir_root=tmp_path / "w", tls_cert=agent.tls_cert
    )
    with wrong, pytest.raises(AgentAuthError) as auth:
        wrong.submit(spec)
    assert isinstance(auth.value, PermanentError) and auth.value.status == 401
    assert "DEPIN_AGENT_TOKEN" in str(auth.value) and "not-the-token" not in str(auth.value)

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with _runner(dead, tmp_path / "dead", connect_timeout_s=1.0) as runner:
        t = time.monotonic()
        with pytest.raises(TransientError, match="is the agent running there"):
            runner.submit(spec)
        # bounded by connect_timeout_s, not by the 30 s retry budget of other calls (a loose bound)
        assert time.monotonic() - t < 10

    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 12_000)  # ~3 MiB: several chunks
    sha, size = sha256_file(blob), blob.stat().st_size
    auth_header = {"Authorization": f"Bearer {TOKEN}"}
    # a partial upload the agent holds (the client "dropped" after half the bytes)
    half = size // 2
    r = httpx.put(
        f"{agent.url}/v1/blobs/{sha}",
        content=blob.read_bytes()[:half],
        headers={**auth_header, "Upload-Offset": "0", "Upload-Length": str(size)},
        verify=agent.verify,
    )
    assert r.status_code == 202 and r.headers["upload-offset"] == str(half)
    rec = Recorder(verify=agent.verify)
    with _runner(agent.url, tmp_path / "w2", tls_cert=agent.tls_cert, transport=rec) as runner:
        assert runner.ensure_blob(blob, sha) is True
        puts = [h for m, p, h in rec.calls if m == "PUT"]
        assert [(h["upload-offset"], h["content-length"]) for h in puts] == [(str(half), str(size - half))]
        assert runner.ensure_blob(blob, sha) is False  # held now: HEAD only
        assert rec.count("PUT", "/v1/blobs/") == 1
        # bytes that do not match their digest are refused, and the message says what to do
        other = tmp_path / "other.bin"
        other.write_bytes(b"x" * 1000)
        with pytest.raises(ConfigError, match="rebuild the spec"):
            runner.ensure_blob(other, "0" * 64)
        with pytest.raises(ConfigError, match="is missing"):
            runner.ensure_blob(tmp_path / "nope.bin", "1" * 64)
    head = httpx.head(f"{agent.url}/v1/blobs/{sha}", headers=auth_header, verify=agent.verify)
    assert head.status_code == 200 and head.headers["content-length"] == str(size)


def test_tampered_artifacts_fail_verification(tmp_path: Path, data: DatasetRef, agent: AgentProcess) -> None:
    spec = train_spec(data, tmp_path / "tampered", every=0)
    with _runner(agent.url, tmp_path / "remote", tls_cert=agent.tls_cert) as runner:
        job_id = runner.submit(spec)
        wait_for("the job to finish", lambda: runner.status(job_id).state.terminal)
        assert runner.status(job_id).state == JobState.SUCCEEDED

        # bytes corrupted on the way: another client of the same job (its id and spec: the agent's finished job,
        # not a new one) downloads weights that do not match the manifest
        rec = Recorder(corrupt=WEIGHTS, verify=agent.verify)
        moved = spec.model_copy(
            update={"outputs": spec.outputs.model_copy(update={"dir": str(tmp_path / "in-transit")})}
        )
        with _runner(agent.url, tmp_path / "remote2", tls_cert=agent.tls_cert, transport=rec) as other:
            assert other.submit(moved, job_id=job_id) == job_id
            res = other.result(job_id, timeout=120)
        assert (res.state, res.failure) == (JobState.FAILED, FailureKind.VERIFY), res.error
        assert (
            "does not match" in (res.error or "") and rec.count("GET", f"/v1/jobs/{job_id}/artifacts/") >= 2
        )
        assert not [p for p in (tmp_path / "in-transit").rglob("*") if p.is_file()]

        # the node changes its output after the worker hashed it
        (weights,) = [p for p in agent.data_dir.rglob(WEIGHTS) if job_id in p.parts]
        raw = bytearray(weights.read_bytes())
        raw[-1] ^= 0xFF
        weights.write_bytes(bytes(raw))
        res = runner.result(job_id, timeout=60)
    assert (res.state, res.failure) == (JobState.FAILED, FailureKind.VERIFY)
    assert WEIGHTS in (res.error or "") and res.artifacts == {}
    assert res.attempts[-1].failure == FailureKind.VERIFY
    assert not [p for p in (tmp_path / "tampered").rglob("*") if p.is_file()]


def test_killed_agent_is_lost_and_the_job_resumes_elsewhere(
    tmp_path: Path, data: DatasetRef, agent: AgentProcess, reference: Reference
) -> None:
    spec = train_spec(data, tmp_path / "model")  # a checkpoint every 10 steps
    node_a = _start_agent(tmp_path / "agent-a", env={"TOY_PAUSE_AT_STEP": "20"})
    try:
        # a heartbeat timeout no loaded machine reaches while the node lives; shortened once it is killed
        with _runner(
            node_a.url,
            tmp_path / "remote-a",
            tls_cert=node_a.tls_cert,
            name="a",
            heartbeat_timeout_s=300.0,
            poll_s=0.1,
        ) as a:
            job_id = a.submit(spec)
            wait_for(
                "the step-20 checkpoint to be mirrored",
                lambda: (d := a.checkpoint_dir(job_id)) is not None and (d / "ckpt-000000020.json").exists(),
            )
            node_a.kill()  # the node vanishes with its worker
            a.heartbeat_timeout_s = 0.5
            wait_for("the job to be declared lost", lambda: a.status(job_id).state == JobState.FAILED, 30)
            st = a.status(job_id)
            lost = a.result(job_id, timeout=30)
            ckpt_dir = a.checkpoint_dir(job_id)
    finally:
        node_a.close()
    assert (st.message or "").startswith("heartbeat lost")
    assert (lost.state, lost.failure) == (JobState.FAILED, FailureKind.INFRA)
    assert (lost.error or "").startswith("heartbeat lost") and lost.attempts[-1].runner == "a"
    assert ckpt_dir is not None
    assert FileCheckpointer(ckpt_dir, every_steps=10).restore()["step"] == 20  # type: ignore[index]

    resumed = spec.model_copy(
        update={"checkpoint": spec.checkpoint.model_copy(update={"resume_from": str(ckpt_dir)})}
    )
    with _runner(
        agent.url, tmp_path / "remote-b", tls_cert=agent.tls_cert, name="b"
    ) as b:  # another node: the module's agent
        assert b.submit(resumed, job_id=job_id, attempt=2) == job_id
        res = b.result(job_id, timeout=120)
        text = b.logs(job_id)[0]
    assert res.state == JobState.SUCCEEDED, res.error
    assert "resumed from step 20" in text
    assert res.spec_hash == spec.spec_hash and res.attempts[-1].runner == "b"
    assert res.metrics == pytest.approx(reference.train.metrics, rel=1e-5)  # as the uninterrupted run


def test_stalled_worker_is_lost(tmp_path: Path, data: DatasetRef, agent: AgentProcess) -> None:
    # a heartbeat timeout no loaded machine reaches while the worker lives; shortened once it is stopped
    with _runner(
        agent.url, tmp_path / "remote", tls_cert=agent.tls_cert, heartbeat_timeout_s=300.0, poll_s=0.1
    ) as runner:
        job_id = runner.submit(train_spec(data, tmp_path / "model", sleep_s=0.2))
        wait_for("the job to run", lambda: runner.status(job_id).step >= 1)
        workers = agent.worker_pids()
        assert workers
        for pid in workers:  # the agent answers, but the job's heartbeat stops moving
            os.kill(pid, signal.SIGSTOP)
        runner.heartbeat_timeout_s = 1.0
        try:
            wait_for(
                "the job to be declared lost", lambda: runner.status(job_id).state == JobState.FAILED, 30
            )
            st = runner.status(job_id)
            res = runner.result(job_id, timeout=10)
        finally:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            # the agent still runs the job the runner gave up on: end it (the agent is shared by the module)
            httpx.post(
                f"{agent.url}/v1/jobs/{job_id}/cancel",
                headers={"Authorization": f"Bearer {TOKEN}"},
                verify=agent.verify,
            )
    assert "heartbeat has not moved" in (st.message or "") and st.step >= 1
    assert (res.state, res.failure) == (JobState.FAILED, FailureKind.INFRA)
    assert (res.error or "").startswith("heartbeat lost")


# ---- transport security --------------------------------------------------------------------------------------
def test_a_man_in_the_middle_is_refused_and_gets_no_job_data(tmp_path: Path, agent: AgentProcess) -> None:
    spec = train_spec(DatasetRef.from_path(write_toy_dataset(tmp_path / "d.parquet", seed=7)), tmp_path / "m")
    assert isinstance(agent.verify, ssl.SSLContext)
    with MitmProxy(agent.url, agent.verify, tmp_path / "mitm") as proxy:
        # control: a client that trusted the proxy's certificate would talk to the agent through it
        with _runner(proxy.url, tmp_path / "fooled", tls_cert=proxy.cert.cert_pem) as fooled:
            assert fooled.health()["jobs_running"] >= 0
        assert proxy.received, "the proxy relays"
        seen, proxy.received[:] = proxy.connections, b""

        runner = _runner(proxy.url, tmp_path / "w", name="node-x", tls_cert=agent.tls_cert)
        with runner, pytest.raises(PinMismatch) as refused:
            runner.submit(spec)
        assert isinstance(refused.value, PermanentError)
        message = str(refused.value)
        assert "node-x" in message and proxy.url in message and "man in the middle" in message
        assert "--fingerprint" in message and TOKEN not in message
        assert proxy.connections == seen + 1  # refused at once: not retried into success
        assert bytes(proxy.received) == b""  # no token, no blob, no spec crossed it

        # pinned by fingerprint: the certificate is read once and kept only if it matches
        runner = _runner(proxy.url, tmp_path / "fp", tls_fingerprint=agent.fingerprint)
        with runner, pytest.raises(PinMismatch, match="not the pinned"):
            runner.health()
        assert bytes(proxy.received) == b""
    with _runner(agent.url, tmp_path / "fp-ok", tls_fingerprint=agent.fingerprint) as runner:
        assert runner.health()["jobs_running"] >= 0


def test_plain_http_to_a_remote_host_is_refused_before_any_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]
    looked_up: list[str] = []
    real = socket.getaddrinfo

    def resolve(host: object, *args: object, **kw: object) -> object:  # "agent.example" is this listener
        looked_up.append(str(host))
        return real("127.0.0.1" if host == "agent.example" else host, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with listener:
        with pytest.raises(ConfigError, match="plain HTTP to a remote machine"):
            _runner(f"http://agent.example:{port}", tmp_path / "w")
        with pytest.raises(ConfigError, match="no pinned certificate"):
            _runner(f"https://agent.example:{port}", tmp_path / "w")
        assert looked_up == []
        # control: the name does lead to the listener, so a client that tried would have been seen there
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(f"http://agent.example:{port}/", timeout=0.5)
        conn, _ = listener.accept()
        conn.close()
    assert looked_up == ["agent.example"]


def test_agent_errors_are_read_in_the_current_and_the_earlier_shape() -> None:
    from gpu_jobs.remote._client import _error_of

    now = httpx.Response(
        422, json={"error": {"code": "invalid", "message": "bad spec", "field": "spec.seed"}}
    )
    before = httpx.Response(422, json={"error": "bad spec", "field": "spec.seed"})
    assert _error_of(now) == _error_of(before) == ("bad spec", "spec.seed")
    assert _error_of(httpx.Response(502, text="<html>proxy error</html>")) == (
        "<html>proxy error</html>",
        None,
    )
