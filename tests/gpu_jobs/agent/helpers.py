"""Helpers for the worker-agent tests: the token, raw HTTP uploads and job polling (toy specs and job ids come
from ``tests.support.gpu_jobs``)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpu_jobs.spec import JobSpec
from tests.support.gpu_jobs import ENV, TOKEN, new_job_id, train_spec

__all__ = [
    "ENV",
    "TOKEN",
    "auth",
    "new_job_id",
    "terminal",
    "train_spec",
    "upload",
    "upload_inputs",
    "wait_job",
]


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def upload(client: httpx.Client, data: bytes) -> httpx.Response:
    sha = hashlib.sha256(data).hexdigest()
    return client.put(f"/v1/blobs/{sha}", content=data, headers={"Upload-Length": str(len(data))})


def upload_inputs(client: httpx.Client, spec: JobSpec) -> None:
    """PUT every input file of ``spec`` as a blob."""
    for ref in spec.inputs:
        files = [Path(ref.path)] if not ref.files else [Path(ref.path) / f.path for f in ref.files]
        for f in files:
            r = upload(client, f.read_bytes())
            assert r.status_code in (200, 201), r.text


def wait_job(client: httpx.Client, job_id: str, until: Any, timeout: float = 120.0) -> dict[str, Any]:
    """Poll ``GET /v1/jobs/{id}`` until ``until(doc)``; fail with the job log after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        doc = client.get(f"/v1/jobs/{job_id}").json()
        if until(doc):
            return doc
        if time.monotonic() > deadline:
            logs = client.get(f"/v1/jobs/{job_id}/logs").json()["text"]
            pytest.fail(f"job {job_id} stuck at {doc}; log:\n{logs[-3000:]}")
        time.sleep(0.05)


def terminal(doc: dict[str, Any]) -> bool:
    return doc["status"]["state"] in ("SUCCEEDED", "FAILED", "CANCELLED")
