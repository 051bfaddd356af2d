"""``AgentRunner``: the ``JobRunner`` calls (submit, status, logs, result, cancel, purge) over the agent."""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from pydantic import SecretStr

from depin_core import tls as tlslib
from depin_core.errors import ConfigError, PermanentError
from depin_core.fs import atomic_write_bytes
from depin_core.http import check_base_url
from gpu_jobs.errors import AgentRefused, JobNotFinished
from gpu_jobs.remote._blobs import _Blobs
from gpu_jobs.remote._client import _error_of, _missing_of, _pin_of, log
from gpu_jobs.remote._poller import _Poller
from gpu_jobs.remote._results import _Results
from gpu_jobs.remote._state import _CHECKPOINTS, _JOB_ID, _RESULT, _SPEC, _Job, _newest_step
from gpu_jobs.runner import JobStatus
from gpu_jobs.spec import JobResult, JobSpec


class AgentRunner(_Poller, _Results, _Blobs):
    """A ``JobRunner`` backed by one worker agent at ``url`` (see the ``gpu_jobs.remote`` docstring).

    ``workdir_root`` holds this side's per-job state: ``<job_id>/spec.json``, the checkpoint mirror
    ``<job_id>/checkpoints/`` and ``<job_id>/result.json``. ``node`` overrides the node name recorded in
    attempts (default: the agent's ``/v1/health`` ``node``). ``on_log`` receives the job's log lines while the
    poller runs. ``tls_cert`` (PEM) or ``tls_fingerprint`` (sha256) pins an ``https://`` agent's certificate
    (one of them is required for https). ``transport`` is for tests.
    """

    def __init__(
        self,
        url: str,
        token: SecretStr,
        *,
        workdir_root: Path | str,
        name: str = "agent",
        node: str | None = None,
        poll_s: float = 0.2,
        heartbeat_timeout_s: float = 10.0,
        connect_timeout_s: float = 5.0,
        timeout_s: float = 60.0,
        retry_budget_s: float = 30.0,
        on_log: Callable[[str], None] | None = None,
        transport: httpx.BaseTransport | None = None,
        tls_cert: str | None = None,
        tls_fingerprint: str | None = None,
    ) -> None:
        base = tlslib.check_url(check_base_url(url, "agent URL"), "agent URL")
        if not isinstance(token, SecretStr):
            raise ConfigError("token must be a pydantic SecretStr (keeps it out of logs and reprs)")
        if not token.get_secret_value():
            raise ConfigError(
                "token is empty; pass the agent's token (DEPIN_AGENT_TOKEN / depin worker register)"
            )
        if poll_s <= 0 or heartbeat_timeout_s <= 0 or connect_timeout_s <= 0:
            raise ConfigError("AgentRunner: poll_s, heartbeat_timeout_s and connect_timeout_s must be > 0")
        self.url = base
        self.name = name
        self.node = node
        self.root = Path(workdir_root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.poll_s = poll_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.retry_budget_s = retry_budget_s
        self.on_log = on_log
        self._token = token
        self._pin = _pin_of(base, tls_cert, tls_fingerprint)
        self._timeouts = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._transport = transport
        self._client_obj: httpx.Client | None = None
        self._client_lock = threading.Lock()
        probe = min(heartbeat_timeout_s, timeout_s)
        self._poll_timeout = httpx.Timeout(probe, connect=min(connect_timeout_s, probe))
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"AgentRunner({self.url!r}, name={self.name!r}, token=set)"

    # --- JobRunner -------------------------------------------------------------------------------------------
    def submit(self, spec: JobSpec, *, job_id: str | None = None, attempt: int = 1) -> str:
        """Check the agent, upload the blobs it lacks, create the job there and return its id.

        ``job_id`` (format ``<spec_hash[:12]>-<8 hex>``) lets a chain reuse one id for every attempt; the agent
        treats a known id with the same spec as the same job. Raises ``TransientError`` when the agent cannot be
        reached, ``AgentAuthError`` for a wrong token, ``ConfigError`` for missing/changed local inputs or an id
        the agent already holds with another spec.
        """
        if attempt < 1:
            raise ConfigError("attempt must be ≥ 1")
        job_id = job_id or f"{spec.spec_hash[:12]}-{secrets.token_hex(4)}"
        if not _JOB_ID.match(job_id):
            raise ConfigError(f"job_id {job_id!r} must look like '<12 hex>-<8 hex>' (spec_hash[:12]-random)")
        self.health()
        blobs = self._input_blobs(spec)
        resume = self._resume_blobs(spec)
        for sha, path in [*blobs.items(), *((f["sha256"], p) for f, p in resume)]:
            self.ensure_blob(path, sha)
        remote_spec = spec
        if spec.checkpoint.resume_from:  # a local path: the agent gets the files as blobs
            remote_spec = spec.model_copy(
                update={"checkpoint": spec.checkpoint.model_copy(update={"resume_from": None})}
            )
        body = {
            "job_id": job_id,
            "attempt": attempt,
            "spec": remote_spec.model_dump(mode="json"),
            "resume": [f for f, _ in resume],
        }
        known = {**blobs, **{f["sha256"]: p for f, p in resume}}
        for round_ in range(2):
            r = self._request("POST", "/v1/jobs", json=body, ok=(200, 201, 409, 422))
            if r.status_code in (200, 201):
                break
            message, fld = _error_of(r)
            if r.status_code == 409:
                raise ConfigError(
                    f"job_id {job_id}: the agent at {self.url} holds this job with a different spec ({message}); "
                    "submit with a new job id"
                )
            missing = _missing_of(r)
            if round_ == 0 and missing and all(m in known for m in missing):
                log.info(
                    "agent %s lost %d blob(s) before the job was created; uploading again",
                    self.url,
                    len(missing),
                )
                for m in missing:
                    self.ensure_blob(known[m], m)
                continue
            raise AgentRefused(
                f"POST {self.url}/v1/jobs refused (422{', field ' + fld if fld else ''}): {message}",
                status=422,
                field=fld,
            )
        else:  # pragma: no cover - the loop always breaks or raises
            raise AssertionError("unreachable")
        job_dir = self.root / job_id
        atomic_write_bytes(job_dir / _SPEC, spec.model_dump_json(indent=2).encode())
        (job_dir / _RESULT).unlink(missing_ok=True)
        job = _Job(job_id, spec, attempt, ckpt_step=_newest_step(job_dir / _CHECKPOINTS), submitted=True)
        with self._lock:
            self._jobs[job_id] = job
            if self._poller is None and not self._stop.is_set():
                self._poller = threading.Thread(
                    target=self._poll_loop, name=f"{self.name}-poller", daemon=True
                )
                self._poller.start()
        return job_id

    def status(self, job_id: str) -> JobStatus:
        """The job's state from the agent (FAILED "heartbeat lost …" once the job is lost)."""
        return self._refresh(self._job(job_id))

    def logs(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        """The job's log text from byte ``offset`` and the next offset (proxied from the agent; nothing new once
        the job is lost). Fails fast (``TransientError``) while the agent does not answer, so a caller polling
        ``status`` and ``logs`` sees the heartbeat verdict in time."""
        job = self._job(job_id)
        if job.lost:
            return "", offset
        r = self._request(
            "GET",
            f"/v1/jobs/{job_id}/logs",
            params={"offset": offset},
            budget_s=min(self.retry_budget_s, 5 * self.poll_s),
            timeout=self._poll_timeout,
            job_id=job_id,
        )
        body = r.json()
        return str(body["text"]), int(body["next_offset"])

    def result(self, job_id: str, timeout: float | None = None) -> JobResult:
        """Wait for a terminal state (``JobNotFinished`` after ``timeout`` s), download and verify the outputs."""
        job = self._job(job_id)
        if job.result is not None:
            return job.result
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self._refresh(job, max_age=self.poll_s)  # shares the poller's fetches
            if job.lost or st.state.terminal:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise JobNotFinished(
                    f"job {job_id} still {st.state} after {timeout} s on {self.url}; ask again later"
                )
            time.sleep(self.poll_s / 4)
        self._pump_logs(job)  # the last lines
        if not job.lost:
            self._mirror(job, blocking=True)  # the final checkpoint, before the caller may ask checkpoint_dir
        with job.lock:
            if job.result is None:
                res = self._lost_result(job, job.lost) if job.lost else self._fetch_result(job)
                atomic_write_bytes(self.root / job_id / _RESULT, res.model_dump_json(indent=2).encode())
                job.result = res
            return job.result

    def cancel(self, job_id: str) -> None:
        """Ask the agent to cancel the job (a no-op once it is terminal or lost)."""
        job = self._job(job_id)
        if not job.active:
            return
        self._request("POST", f"/v1/jobs/{job_id}/cancel", ok=(200, 202), job_id=job_id)

    def purge(self, job_id: str) -> list[str]:
        """Ask the agent to delete everything of the finished job (``DELETE /v1/jobs/{id}/data``: inputs and the
        blobs only it used, checkpoints, outputs, log); what it removed. ``AgentRefused`` (409) while the job runs,
        ``PermanentError`` when the agent says something of it remains."""
        if not _JOB_ID.match(job_id):
            raise ConfigError(f"job_id {job_id!r} must look like '<12 hex>-<8 hex>'")
        with self._lock:
            job = self._jobs.get(job_id)
        # one try for a node we lost (it is destroyed or distrusted anyway), a short retry budget otherwise
        budget = 0.0 if job is not None and job.lost else min(self.retry_budget_s, self.connect_timeout_s)
        r = self._request("DELETE", f"/v1/jobs/{job_id}/data", ok=(200,), budget_s=budget, job_id=job_id)
        body = r.json()
        if body.get("remaining"):
            raise PermanentError(
                f"the agent at {self.url} could not delete {body['remaining']} of job {job_id}"
            )
        return [str(r) for r in body.get("removed") or []]

    def checkpoint_dir(self, job_id: str) -> Path | None:
        """The local mirror of the job's newest checkpoint pair, or None when none was mirrored."""
        d = self.root / job_id
        if not _JOB_ID.match(job_id):
            return None
        return d / _CHECKPOINTS if _newest_step(d / _CHECKPOINTS) is not None else None

    # --- lifecycle -------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the poller, ask the agent to cancel unfinished jobs (best effort) and close the connection."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join()
        with self._lock:
            jobs = [j for j in self._jobs.values() if j.active and j.submitted]
        for job in jobs:
            with contextlib.suppress(Exception):
                self._request("POST", f"/v1/jobs/{job.job_id}/cancel", ok=(200, 202, 404), budget_s=0)
        if self._client_obj is not None:
            self._client_obj.close()

    def __enter__(self) -> AgentRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
