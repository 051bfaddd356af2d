"""The worker agent's HTTP API against a real agent process on loopback (raw httpx)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from gpu_jobs.agent.process import AgentProcess
from gpu_jobs.spec import DatasetRef
from tests.gpu_jobs.agent.helpers import (
    auth,
    new_job_id,
    terminal,
    train_spec,
    upload,
    upload_inputs,
    wait_job,
)

pytestmark = pytest.mark.e2e


def test_health_reports_the_node(client: httpx.Client) -> None:
    doc = client.get("/v1/health").json()
    assert set(doc) == {
        "agent_version", "node", "gpus", "driver", "cuda", "torch", "tflops", "free_disk_gb", "jobs_running",
    }  # fmt: skip
    assert doc["node"] == socket.gethostname() and doc["torch"] == torch.__version__
    assert doc["tflops"] > 0 and doc["free_disk_gb"] > 0 and doc["jobs_running"] >= 0
    assert len(doc["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    for gpu in doc["gpus"]:
        assert set(gpu) == {"index", "name", "memory_gb"} and gpu["memory_gb"] > 0


# ---- blobs ---------------------------------------------------------------------------------------------------
def test_blob_upload_is_verified_and_idempotent(client: httpx.Client, agent: AgentProcess) -> None:
    data = os.urandom(3 * 2**20 + 17)
    sha = hashlib.sha256(data).hexdigest()
    head = client.head(f"/v1/blobs/{sha}")
    assert (head.status_code, head.headers["Upload-Offset"]) == (404, "0")
    r = upload(client, data)
    assert r.status_code == 201 and r.json() == {"sha256": sha, "size": len(data)}
    head = client.head(f"/v1/blobs/{sha}")
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == len(data)
    assert (agent.data_dir / "blobs" / sha).read_bytes() == data
    again = upload(client, data)
    assert again.status_code == 200 and again.json() == {"sha256": sha, "size": len(data)}

    # the wrong bytes under a name: 422, and nothing is kept
    wrong = hashlib.sha256(b"something else").hexdigest()
    r = client.put(f"/v1/blobs/{wrong}", content=data, headers={"Upload-Length": str(len(data))})
    assert r.status_code == 422 and "sha256 mismatch" in r.json()["error"]["message"]
    assert client.head(f"/v1/blobs/{wrong}").headers["Upload-Offset"] == "0"
    assert not (agent.data_dir / "blobs" / ".partial" / wrong).exists()
    assert not (agent.data_dir / "blobs" / wrong).exists()


@pytest.mark.parametrize("name", ["A" * 64, "abc", "0" * 63 + "g", "0" * 65])
def test_blob_name_must_be_a_sha256(client: httpx.Client, name: str) -> None:
    r = client.put(f"/v1/blobs/{name}", content=b"x", headers={"Upload-Length": "1"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "sha256"
    assert client.head(f"/v1/blobs/{name}").status_code == 400


def test_blob_headers_are_checked(client: httpx.Client) -> None:
    sha = hashlib.sha256(b"abc").hexdigest()
    r = client.put(f"/v1/blobs/{sha}", content=b"abc")
    assert r.status_code == 400 and r.json()["error"]["field"] == "Upload-Length"
    r = client.put(f"/v1/blobs/{sha}", content=b"abc", headers={"Upload-Length": "3", "Upload-Offset": "-1"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "Upload-Offset"
    r = client.put(f"/v1/blobs/{sha}", content=b"abcdef", headers={"Upload-Length": "3"})
    assert r.status_code == 400 and "past Upload-Length" in r.json()["error"]["message"]
    assert client.head(f"/v1/blobs/{sha}").headers["Upload-Offset"] == "0"


@contextlib.contextmanager
def _unfinished_put(agent: AgentProcess, sha: str, total: int, part: bytes) -> Iterator[None]:
    """Send a PUT's headers and the first bytes of its body; drop the connection when the block ends."""
    host, port = agent.url.split("://", 1)[1].rsplit(":", 1)
    head = (
        f"PUT /v1/blobs/{sha} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth()['Authorization']}\r\n"
        f"Upload-Offset: 0\r\nUpload-Length: {total}\r\nContent-Length: {total}\r\n\r\n"
    )
    ctx = agent.verify
    assert isinstance(ctx, ssl.SSLContext)
    with socket.create_connection((host, int(port))) as raw, ctx.wrap_socket(raw) as sock:
        sock.sendall(head.encode() + part)
        yield


def test_dropped_upload_resumes_from_its_offset(client: httpx.Client, agent: AgentProcess) -> None:
    data = os.urandom(2 * 2**20 + 5)
    sha = hashlib.sha256(data).hexdigest()
    sent = 1_300_001
    # the connection drops once the agent has stored part of the body (dropped before the handler read any of
    # it, the server reports a disconnect first and there is nothing to resume from, which is fine but not
    # what this test is about)
    with _unfinished_put(agent, sha, len(data), data[:sent]):
        deadline = time.monotonic() + 120  # a bound on the wait for the agent, not a timing
        while (head := client.head(f"/v1/blobs/{sha}")).headers.get("Upload-Offset") == "0":
            assert time.monotonic() < deadline, f"partial upload not kept: {head.headers}"
            time.sleep(0.05)
    assert head.status_code == 404
    # A PUT from the wrong offset is refused and told where to resume. It is answered once the dropped request
    # has finished (one upload per blob at a time), so its Upload-Offset is final. The server may lose the last
    # bytes it had buffered when the connection dropped, never more than were sent.
    r = client.put(f"/v1/blobs/{sha}", content=data, headers={"Upload-Length": str(len(data))})
    assert r.status_code == 409
    cut = int(r.headers["Upload-Offset"])
    assert 0 < cut <= sent and client.head(f"/v1/blobs/{sha}").headers["Upload-Offset"] == str(cut)
    assert (agent.data_dir / "blobs" / ".partial" / sha).read_bytes() == data[:cut]
    # resume in two pieces: the first ends short of the total (202), the second completes and verifies
    mid = cut + 1000
    r = client.put(
        f"/v1/blobs/{sha}",
        content=data[cut:mid],
        headers={"Upload-Offset": str(cut), "Upload-Length": str(len(data))},
    )
    assert r.status_code == 202 and r.headers["Upload-Offset"] == str(mid)
    r = client.put(
        f"/v1/blobs/{sha}",
        content=data[mid:],
        headers={"Upload-Offset": str(mid), "Upload-Length": str(len(data))},
    )
    assert r.status_code == 201, r.text
    assert (agent.data_dir / "blobs" / sha).read_bytes() == data
    assert not (agent.data_dir / "blobs" / ".partial" / sha).exists()


# ---- jobs ----------------------------------------------------------------------------------------------------
def test_train_job_lifecycle(
    client: httpx.Client, agent: AgentProcess, data: DatasetRef, tmp_path: Path
) -> None:
    spec = train_spec(data, tmp_path / "client-model")
    job_id = new_job_id(spec)
    body = {"job_id": job_id, "attempt": 1, "spec": spec.model_dump(mode="json")}

    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422 and r.json()["error"]["missing"] == [f.sha256 for f in data.files]
    upload_inputs(client, spec)
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 201 and r.json()["created"] is True and r.json()["job_id"] == job_id
    r = client.post("/v1/jobs", json={**body, "attempt": 2})
    assert r.status_code == 200 and r.json()["created"] is False
    other = train_spec(data, tmp_path / "x").model_copy(update={"seed": 6})
    r = client.post("/v1/jobs", json={**body, "spec": other.model_dump(mode="json")})
    assert r.status_code == 409 and r.json()["error"]["field"] == "spec"

    doc = wait_job(client, job_id, terminal)
    st = doc["status"]
    assert (st["state"], st["step"], st["total"]) == ("SUCCEEDED", 30, 30), st
    ckpt = doc["checkpoint"]
    assert ckpt["step"] == 30
    assert [f["name"] for f in ckpt["files"]] == ["ckpt-000000030.json", "ckpt-000000030.safetensors"]
    for f in ckpt["files"]:
        got = client.get(f"/v1/jobs/{job_id}/checkpoints/{f['name']}")
        assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == f["sha256"]
        assert len(got.content) == f["size"]
    assert client.get(f"/v1/jobs/{job_id}/checkpoints/ckpt-000000001.json").status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/checkpoints/spec.json").status_code == 400

    logs = client.get(f"/v1/jobs/{job_id}/logs").json()
    assert "step 30/30" in logs["text"] and logs["next_offset"] == len(logs["text"].encode())
    rest = client.get(f"/v1/jobs/{job_id}/logs", params={"offset": logs["next_offset"]}).json()
    assert rest == {"text": "", "next_offset": logs["next_offset"]}
    assert client.get(f"/v1/jobs/{job_id}/logs", params={"offset": "x"}).status_code == 400

    res = client.get(f"/v1/jobs/{job_id}/result").json()
    result, files = res["result"], {f["path"]: f for f in res["files"]}
    assert result["state"] == "SUCCEEDED" and result["spec_hash"] == spec.spec_hash
    assert result["metrics"]["steps"] == 30 and result["metrics"]["mse"] > 0
    assert {"manifest.json", "weights.safetensors"} <= set(result["artifacts"])
    assert set(result["artifacts"]) <= set(files)
    for rel, sha in result["artifacts"].items():
        assert files[rel]["sha256"] == sha
    for rel, f in files.items():
        got = client.get(f"/v1/jobs/{job_id}/artifacts/{rel}")
        assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == f["sha256"]
        assert len(got.content) == f["size"]
    assert client.get(f"/v1/jobs/{job_id}/artifacts/../spec.json").status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/artifacts/nothing.bin").status_code == 404
    # the agent wrote to its own disk, not to the client's paths
    assert not (tmp_path / "client-model").exists()
    assert (agent.data_dir / "out" / job_id / "manifest.json").is_file()

    # resume a new job from this job's newest checkpoint (uploaded as blobs): it starts at step 30
    for f in ckpt["files"]:
        got = client.get(f"/v1/jobs/{job_id}/checkpoints/{f['name']}")
        assert upload(client, got.content).status_code in (200, 201)
    resumed_id = new_job_id(spec)
    resume = [{"name": f["name"], "sha256": f["sha256"]} for f in ckpt["files"]]
    r = client.post("/v1/jobs", json={**body, "job_id": resumed_id, "resume": resume})
    assert r.status_code == 201, r.text
    doc = wait_job(client, resumed_id, terminal)
    assert doc["status"]["state"] == "SUCCEEDED", doc
    assert "resumed from step 30" in client.get(f"/v1/jobs/{resumed_id}/logs").json()["text"]
    again = client.get(f"/v1/jobs/{resumed_id}/result").json()["result"]
    assert again["metrics"] == result["metrics"]


def test_submit_validates_the_request(client: httpx.Client, data: DatasetRef, tmp_path: Path) -> None:
    spec = train_spec(data, tmp_path / "m")
    body = {"job_id": new_job_id(spec), "attempt": 1, "spec": spec.model_dump(mode="json")}
    r = client.post("/v1/jobs", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["field"] == "body"
    r = client.post("/v1/jobs", json={**body, "job_id": "../../etc"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "job_id"
    r = client.post("/v1/jobs", json={**body, "attempt": 0})
    assert r.status_code == 422 and r.json()["error"]["field"] == "attempt"
    r = client.post("/v1/jobs", json={**body, "resume": [{"name": "../x.json", "sha256": "0" * 64}]})
    assert r.status_code == 422 and r.json()["error"]["field"].startswith("resume.0.name")
    r = client.post("/v1/jobs", json={**body, "unexpected": 1})
    assert r.status_code == 422 and r.json()["error"]["field"] == "unexpected"
    # an input file path that escapes the input directory
    escaping = data.model_dump(mode="json")
    escaping["files"][0]["path"] = "../../evil.parquet"
    upload_inputs(client, spec)
    bad = {**body, "spec": {**body["spec"], "inputs": [escaping]}}
    r = client.post("/v1/jobs", json=bad)
    assert r.status_code == 422 and r.json()["error"]["field"] == "spec.inputs.0.files.0.path"
    assert client.get(f"/v1/jobs/{body['job_id']}").status_code == 404
    assert client.get("/v1/jobs/0123456789ab-01234567/result").status_code == 404
    assert client.get("/v1/jobs/not-an-id").status_code == 400


def test_cancel_a_running_job(client: httpx.Client, data: DatasetRef, tmp_path: Path) -> None:
    spec = train_spec(data, tmp_path / "m", steps=1000, sleep_s=0.05)
    job_id = new_job_id(spec)
    upload_inputs(client, spec)
    r = client.post("/v1/jobs", json={"job_id": job_id, "attempt": 1, "spec": spec.model_dump(mode="json")})
    assert r.status_code == 201
    wait_job(client, job_id, lambda d: d["status"]["step"] >= 1)
    r = client.get(f"/v1/jobs/{job_id}/result")
    assert r.status_code == 409 and "not finished" in r.json()["error"]["message"]
    assert client.get(f"/v1/jobs/{job_id}/artifacts/manifest.json").status_code == 409
    r = client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 202 and "state" in r.json()
    doc = wait_job(client, job_id, terminal)
    assert doc["status"]["state"] == "CANCELLED"
    assert client.get(f"/v1/jobs/{job_id}/result").json()["result"]["state"] == "CANCELLED"


# ---- auth ----------------------------------------------------------------------------------------------------
def test_requests_without_a_valid_token_are_refused(agent: AgentProcess) -> None:
    sha = "0" * 64
    routes = [("GET", "/v1/health"), ("HEAD", f"/v1/blobs/{sha}"), ("PUT", f"/v1/blobs/{sha}"),
              ("POST", "/v1/jobs"), ("GET", "/v1/jobs/0123456789ab-01234567"), ("POST", "/v1/tokens")]  # fmt: skip
    for headers in ({}, auth("wrong-token-0123456789"), {"Authorization": "Basic abc"}):
        for method, path in routes:
            r = httpx.request(method, agent.url + path, headers=headers, timeout=10, verify=agent.verify)
            assert r.status_code == 401, (method, path, headers, r.text)
            if method != "HEAD":
                assert r.json()["error"]["code"] == "unauthorized" and "wrong-token" not in r.text
    assert "wrong-token" not in agent.log_text()


def test_job_tokens_are_scoped_and_expire(
    client: httpx.Client, agent: AgentProcess, data: DatasetRef, tmp_path: Path
) -> None:
    spec = train_spec(data, tmp_path / "m", steps=5)
    job_id, other_id = new_job_id(spec), new_job_id(spec)
    r = client.post("/v1/tokens", json={"job_id": job_id, "ttl_s": 600})
    assert r.status_code == 201, r.text
    minted = r.json()
    assert minted["job_id"] == job_id and minted["expires_at"] and minted["token"] != job_id
    job = httpx.Client(base_url=agent.url, verify=agent.verify, headers=auth(minted["token"]), timeout=30)
    with job:
        assert job.get("/v1/health").status_code == 200
        upload_inputs(job, spec)
        body = {"attempt": 1, "spec": spec.model_dump(mode="json")}
        r = job.post("/v1/jobs", json={**body, "job_id": other_id})
        assert r.status_code == 403
        r = job.post("/v1/jobs", json={**body, "job_id": job_id})
        assert r.status_code == 201, r.text
        assert client.post("/v1/jobs", json={**body, "job_id": other_id}).status_code == 201
        assert job.get(f"/v1/jobs/{job_id}").status_code == 200
        for path in ("", "/logs", "/result", "/checkpoints/ckpt-000000001.json", "/artifacts/x"):
            assert job.get(f"/v1/jobs/{other_id}{path}").status_code == 403, path
        assert job.post(f"/v1/jobs/{other_id}/cancel").status_code == 403
        assert job.post("/v1/tokens", json={"job_id": job_id, "ttl_s": 60}).status_code == 403
        wait_job(job, job_id, terminal)
        wait_job(client, other_id, terminal)

    short = client.post("/v1/tokens", json={"job_id": job_id, "ttl_s": 0.5}).json()
    time.sleep(1.0)
    r = httpx.get(
        f"{agent.url}/v1/jobs/{job_id}", headers=auth(short["token"]), timeout=10, verify=agent.verify
    )
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]
    assert client.post("/v1/tokens", json={"job_id": job_id, "ttl_s": 0}).status_code == 422
    assert client.post("/v1/tokens", json={"job_id": "nope", "ttl_s": 5}).status_code == 422
    assert minted["token"] not in agent.log_text()
