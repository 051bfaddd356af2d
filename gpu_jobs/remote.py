"""``AgentRunner``: a ``JobRunner`` that runs jobs on a worker agent (``gpu_jobs.agent``) over HTTPS.

Transport: ``https://`` with the node's certificate pinned (``tls_cert``, or ``tls_fingerprint`` whose
certificate is read once and kept only if its sha256 matches); the runner trusts that certificate and no other,
so a man in the middle fails the TLS handshake before the token or any data is sent, and is reported as a
permanent ``PinMismatch`` (never retried). Plain ``http://`` is accepted only to loopback addresses
(``ConfigError`` before any connection otherwise).

The agent runs the job with its own ``LocalRunner`` (the same worker code); this side ships the inputs, watches
the job and brings the results home:

- ``submit``: a health check first (an unreachable agent raises ``TransientError`` within
  ``connect_timeout_s``), then every input blob the agent lacks is uploaded (``HEAD`` first; a partial upload
  resumes from the agent's ``Upload-Offset``; files are streamed in 1 MiB chunks, never read whole), plus the
  checkpoint files of ``spec.checkpoint.resume_from``, then ``POST /v1/jobs`` (idempotent by job id).
- A background poller (every ``poll_s``) refreshes each unfinished job and mirrors its newest checkpoint pair
  into ``workdir_root/<job_id>/checkpoints/`` (sha256 verified; the JSON marker is moved in last), so
  ``checkpoint_dir(job_id)`` still has it after the node is gone. With ``on_log`` (or the ``gpu_jobs.remote``
  logger at INFO) it also streams the job's log lines.
- Lost jobs: when the agent cannot be reached for ``heartbeat_timeout_s``, or the job's heartbeat has not moved
  for ``heartbeat_timeout_s`` while it is staging/running/uploading (measured on this machine's clock, so clock
  skew between the hosts does not matter), the job is lost for good: ``status`` says FAILED "heartbeat lost …"
  and ``result`` returns FAILED(infra).
- ``result`` downloads every file of the agent's output manifest into the caller's ``spec.outputs.dir``
  (through a staging directory), checks each size and sha256 against the manifest and the result's
  ``artifacts``, and only then moves them into place; any mismatch gives FAILED(verify) and removes them.
  ``artifacts`` are rewritten to local absolute paths and the last attempt to ``runner=self.name`` and the
  agent's node.

Errors: connection failures, 429 and 5xx are retried (``Retry-After`` honoured) for at most
``retry_budget_s``, then ``TransientError``; 401/403 raise ``AgentAuthError`` (a ``PermanentError``) naming the
token fix; other 4xx raise ``AgentRefused`` with the agent's message and field. The token is a ``SecretStr``
that goes into the ``Authorization`` header and nowhere else.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from depin_core import tls as tlslib
from depin_core.errors import ConfigError, PermanentError, TransientError
from depin_core.fs import atomic_write_bytes
from depin_core.http import TRANSIENT_STATUSES, check_base_url
from depin_core.retry import Failures, Outcome, Retryable, RetryPolicy
from gpu_jobs.errors import AgentAuthError, AgentRefused, JobNotFinished, JobNotFound
from gpu_jobs.runner import JobStatus, now
from gpu_jobs.spec import AttemptRecord, FailureKind, JobResult, JobSpec, JobState, sha256_file

log = logging.getLogger(__name__)

CHUNK = 1 << 20
TOKEN_FIX = "wrong token for agent URL; check DEPIN_AGENT_TOKEN / depin worker register"
ACTIVE = frozenset({JobState.STAGING, JobState.RUNNING, JobState.UPLOADING})
_JOB_ID = re.compile(r"^[0-9a-f]{12}-[0-9a-f]{8}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# every 5xx of the agent (or a proxy before it) is worth a retry: its requests are idempotent (a job id, a blob hash)
RETRY_POLICY = RetryPolicy(
    max_retries=None, base_s=0.1, max_s=5.0, statuses=TRANSIENT_STATUSES | set(range(500, 600))
)
_CKPT_FILE = re.compile(r"^ckpt-(\d{9})\.(json|safetensors)$")
_SPEC, _RESULT, _CHECKPOINTS = "spec.json", "result.json", "checkpoints"


class _Mismatch(Exception):
    """A downloaded file's size or sha256 differs from what the agent announced."""


def file_chunks(path: Path, offset: int = 0, chunk: int = CHUNK) -> Iterator[bytes]:
    """The bytes of ``path`` from ``offset`` on, ``chunk`` bytes at a time (never the whole file at once)."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        while data := fh.read(chunk):
            yield data


def _error_of(r: httpx.Response) -> tuple[str, str | None]:
    """(message, field) of an agent error answer ``{"error": {"code", "message", "field"?}}`` (any body
    shape)."""
    try:
        body = r.json()
    except ValueError:
        return r.text[:300].strip() or r.reason_phrase, None
    if not isinstance(body, dict):
        return str(body)[:300], None
    err = body.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err.get("code") or ""), err.get("field")
    return str(err or body)[:500], None


def _safe_relpath(rel: str) -> PurePosixPath | None:
    """``rel`` as a relative POSIX path that stays inside its directory, else None."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or any(part in ("..", "") for part in p.parts) or "\\" in rel:
        return None
    return p


@dataclass
class _Job:
    job_id: str
    spec: JobSpec | None
    attempt: int
    started: datetime = field(default_factory=now)
    lock: threading.RLock = field(default_factory=threading.RLock)
    status: JobStatus | None = None
    last_contact: float = field(default_factory=time.monotonic)
    beat: datetime | None = None
    beat_seen: float = field(default_factory=time.monotonic)
    lost: str | None = None
    ckpt_step: int | None = None
    log_offset: int = 0
    result: JobResult | None = None
    submitted: bool = False  # created by this runner's submit (so a 404 means the node lost it)
    refreshed: float = 0.0  # monotonic time of the last status fetch
    ckpt_listing: Any = None  # the agent's last {"step", "files"} answer
    mirror_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def active(self) -> bool:
        return self.result is None and self.lost is None and not (self.status and self.status.state.terminal)


class _Failures(Failures):
    """The runner's words for the failures its retry policy stops on."""

    def __init__(self, runner: AgentRunner, method: str, path: str, job_id: str | None = None) -> None:
        super().__init__(f"{method} {runner.url}{path}")
        self.runner, self.method, self.path, self.job_id = runner, method, path, job_id

    def problem(self, outcome: Outcome) -> str:
        if isinstance(outcome, httpx.Response):
            return f"{outcome.status_code}: {_error_of(outcome)[0]}"
        return f"cannot reach the agent ({type(outcome).__name__}: {outcome})"

    def refused(self, r: httpx.Response) -> PermanentError:
        return self.runner._refused(self.method, self.path, r, self.job_id)

    def certificate(self, exc: httpx.TransportError) -> Exception:
        return self.runner._pin_failed(exc) or super().certificate(exc)

    def gave_up(self, problem: str, attempts: int, retry_after: float | None) -> TransientError:
        hint = "is the agent running there? (depin worker serve)" if "reach" in problem else "retry later"
        return TransientError(
            f"{self.where}: {problem}; gave up after {attempts} attempt(s) — {hint}", retry_after=retry_after
        )


class AgentRunner:
    """A ``JobRunner`` backed by one worker agent at ``url`` (see the module docstring).

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

    @property
    def _client(self) -> httpx.Client:
        """The HTTP client, made on first use: a pin given as a fingerprint is resolved to the certificate
        then (one TLS handshake, no request), so a runner can be built before its node answers."""
        with self._client_lock:
            if self._client_obj is None:
                verify: Any = True
                if self._pin is not None:
                    cert, fp = self._pin
                    if cert is None:
                        cert = self._fetch_pinned(fp)
                        self._pin = (cert, fp)
                    verify = tlslib.client_context(cert)
                self._client_obj = httpx.Client(
                    base_url=self.url, timeout=self._timeouts, transport=self._transport, verify=verify
                )
            return self._client_obj

    def _fetch_pinned(self, fp: str) -> str:
        try:
            return tlslib.fetch_certificate(self.url, fp, timeout_s=self.connect_timeout_s)
        except tlslib.PinMismatch as exc:
            raise tlslib.PinMismatch(f"agent {self.name} at {self.url}: {exc}; no data was sent") from None
        except (OSError, ValueError) as exc:
            raise TransientError(
                f"cannot reach the agent at {self.url} to check its certificate ({type(exc).__name__}: {exc});"
                " is the agent running there? (depin worker serve)"
            ) from None

    def _pin_failed(self, exc: Exception) -> tlslib.PinMismatch | None:
        """A ``PinMismatch`` naming this node when ``exc`` is a failed certificate check, else None."""
        if not tlslib.is_certificate_refusal(exc):
            return None
        return tlslib.pin_refused(
            exc,
            f"agent {self.name} at {self.url}",
            self._pin[1] if self._pin is not None else None,
            "Check the node; if it was set up again (or has a new certificate), pin its new certificate "
            "(depin worker register NAME --url … --fingerprint …)",
        )

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

    # --- agent calls -----------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """``GET /v1/health`` within ``connect_timeout_s`` (``TransientError`` when the agent is unreachable)."""
        budget = self.connect_timeout_s
        r = self._request("GET", "/v1/health", budget_s=budget, timeout=httpx.Timeout(budget))
        body = r.json()
        if self.node is None and isinstance(body, dict) and body.get("node"):
            self.node = str(body["node"])
        return body

    def ensure_blob(self, path: Path | str, sha256: str) -> bool:
        """Make sure the agent holds blob ``sha256`` with the bytes of ``path``; True when bytes were sent.

        A partial upload the agent already holds is resumed from its ``Upload-Offset``; a dropped connection
        is resumed the same way (within ``retry_budget_s``).
        """
        if not _SHA256.match(sha256):
            raise ConfigError(f"blob sha256 {sha256!r} must be 64 lowercase hex digits")
        where = f"PUT {self.url}/v1/blobs/{sha256[:12]}…"
        tries = RETRY_POLICY.attempts(self.retry_budget_s)
        sent, restarted, conflicts = False, False, 0
        while True:
            head = self._request("HEAD", f"/v1/blobs/{sha256}", ok=(200, 404))
            if head.status_code == 200:
                return sent
            path = Path(path)
            try:
                size = path.stat().st_size
            except OSError:
                raise ConfigError(
                    f"input {path} is missing (blob {sha256[:12]}… is not on the agent either); stage the file "
                    "or rebuild the spec"
                ) from None
            offset = _int_header(head, "upload-offset")
            if offset > size:
                raise ConfigError(
                    f"{path}: the agent holds {offset} bytes of blob {sha256[:12]}… but the file has {size}; "
                    "the file is not the one the spec names — rebuild the spec (DatasetRef.from_path)"
                )
            headers = {
                "Upload-Offset": str(offset),
                "Upload-Length": str(size),
                "Content-Length": str(size - offset),
                "Content-Type": "application/octet-stream",
            }
            try:
                r = RETRY_POLICY.attempt(
                    partial(
                        self._call,
                        "PUT",
                        f"/v1/blobs/{sha256}",
                        headers=headers,
                        content=file_chunks(path, offset),
                    ),
                    _Failures(self, "PUT", f"/v1/blobs/{sha256}"),
                    ok=(200, 201, 202, 409, 422),
                )
                if r.status_code == 202:
                    # the body ended early and the agent kept what arrived: resume from HEAD's Upload-Offset
                    raise Retryable(f"upload incomplete at {_int_header(r, 'upload-offset')} of {size} bytes")
            except Retryable as exc:
                delay = tries.next_delay(exc.retry_after)
                if delay is None:
                    raise TransientError(
                        f"{where}: {exc.problem}; gave up after {tries.failures} attempts — is the agent still "
                        "running?",
                        retry_after=exc.retry_after,
                    ) from None
                log.info("%s: %s; resuming in %.2fs", where, exc.problem, delay)
                time.sleep(delay)
                continue
            sent = True
            if r.status_code in (200, 201):
                return True
            if r.status_code == 409 and conflicts < 5:  # another upload moved the partial on
                conflicts += 1
                time.sleep(RETRY_POLICY.delay(conflicts + 1))
                continue
            if r.status_code == 409:
                raise TransientError(
                    f"{where}: the agent keeps answering 409 (a concurrent upload?); retry later"
                )
            if offset > 0 and not restarted:  # 422: a bad partial from elsewhere, now deleted: once more
                restarted = True
                continue
            raise ConfigError(
                f"{path}: its bytes do not match sha256 {sha256} ({_error_of(r)[0]}); the file changed "
                "after the spec was made — rebuild the spec (DatasetRef.from_path) or restore the file"
            )

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

    # --- HTTP ------------------------------------------------------------------------------------------------
    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request to the agent with the token (no retries)."""
        headers = {**kwargs.pop("headers", {}), "Authorization": f"Bearer {self._token.get_secret_value()}"}
        return self._client.request(method, path, headers=headers, **kwargs)

    def _refused(self, method: str, path: str, r: httpx.Response, job_id: str | None) -> PermanentError:
        """The permanent error for the agent's refusal ``r``."""
        message, fld = _error_of(r)
        where = f"{method} {self.url}{path}"
        if r.status_code in (401, 403):
            return AgentAuthError(
                f"{where} refused ({r.status_code}: {message}); {TOKEN_FIX}", status=r.status_code
            )
        if r.status_code == 404 and job_id is not None:
            return JobNotFound(f"the agent at {self.url} has no job {job_id}; use an id returned by submit()")
        return AgentRefused(
            f"{where} refused ({r.status_code}{', field ' + fld if fld else ''}): {message}",
            status=r.status_code,
            field=fld,
        )

    def _request(
        self,
        method: str,
        path: str,
        *,
        ok: Collection[int] = (200, 201),
        budget_s: float | None = None,
        job_id: str | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """One request with retries of transient failures for ``budget_s`` (default ``retry_budget_s``)."""
        return RETRY_POLICY.send(
            lambda: self._call(method, path, **kwargs),
            _Failures(self, method, path, job_id),
            ok=ok,
            budget_s=self.retry_budget_s if budget_s is None else budget_s,
        )

    def _download(
        self,
        path: str,
        dest: Path,
        sha256: str,
        size: int | None,
        job_id: str,
        *,
        budget_s: float | None = None,
    ) -> None:
        """Stream ``GET path`` into ``dest`` (via a temp file beside it), checking size and sha256
        (``_Mismatch``); transient failures are retried within ``retry_budget_s``."""
        tmp = dest.with_name(f".{dest.name}.part")
        headers = {"Authorization": f"Bearer {self._token.get_secret_value()}"}

        def fetch() -> httpx.Response:
            try:
                with self._client.stream("GET", path, headers=headers) as r:
                    if r.status_code != 200:
                        r.read()
                        return r
                    h, n = hashlib.sha256(), 0
                    with open(tmp, "wb") as fh:
                        for chunk in r.iter_bytes(CHUNK):
                            h.update(chunk)
                            fh.write(chunk)
                            n += len(chunk)
                got = h.hexdigest()
                if got != sha256 or (size is not None and n != size):
                    raise _Mismatch(
                        f"{dest.name}: got {n} bytes with sha256 {got}, expected {size} bytes with sha256 {sha256}"
                    )
                os.replace(tmp, dest)
                return r
            finally:
                tmp.unlink(missing_ok=True)  # gone after a successful replace

        RETRY_POLICY.send(
            fetch,
            _Failures(self, "GET", path, job_id if "/artifacts/" not in path else None),
            ok=(200,),
            budget_s=self.retry_budget_s if budget_s is None else budget_s,
        )

    # --- jobs ------------------------------------------------------------------------------------------------
    def _job(self, job_id: str) -> _Job:
        """The job's record; an id this runner did not submit is attached (its spec read from the workdir)."""
        if not _JOB_ID.match(job_id):
            raise JobNotFound(
                f"no job {job_id!r}: ids look like '<12 hex>-<8 hex>'; use an id returned by submit()"
            )
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                spec = None
                with contextlib.suppress(OSError, ValueError):
                    spec = JobSpec.model_validate_json((self.root / job_id / _SPEC).read_bytes())
                job = _Job(job_id, spec, 1, ckpt_step=_newest_step(self.root / job_id / _CHECKPOINTS))
                with contextlib.suppress(OSError, ValueError):
                    job.result = JobResult.model_validate_json((self.root / job_id / _RESULT).read_bytes())
                self._jobs[job_id] = job
            return job

    def _view(self, job: _Job) -> JobStatus:
        st = job.status or JobStatus(job_id=job.job_id, state=JobState.PENDING)
        if job.lost:
            return st.model_copy(update={"state": JobState.FAILED, "message": job.lost})
        if job.result is not None and st.state != job.result.state:
            return st.model_copy(update={"state": job.result.state, "message": job.result.error})
        return st

    def _refresh(self, job: _Job, max_age: float = 0.0) -> JobStatus:
        """Fetch the job's status (unless fetched less than ``max_age`` s ago), detect a lost job, mirror a
        newer checkpoint."""
        st = self._fetch_status(job, max_age)
        self._mirror(job, blocking=False)  # outside the job lock: status() never waits for a download
        return st

    def _fetch_status(self, job: _Job, max_age: float) -> JobStatus:
        with job.lock:
            if not job.active or time.monotonic() - job.refreshed < max_age:
                return self._view(job)
            job.refreshed = time.monotonic()
            path = f"/v1/jobs/{job.job_id}"
            try:
                r = self._request("GET", path, budget_s=0, timeout=self._poll_timeout, job_id=job.job_id)
            except TransientError as exc:
                silent = time.monotonic() - job.last_contact
                if silent > self.heartbeat_timeout_s:
                    self._mark_lost(
                        job, f"heartbeat lost: agent {self.url} unreachable for {silent:.0f} s ({exc})"
                    )
                return self._view(job)
            except JobNotFound:
                if not job.submitted:
                    raise
                self._mark_lost(
                    job, f"heartbeat lost: the agent at {self.url} no longer knows job {job.job_id}"
                )
                return self._view(job)
            body = r.json()
            st = JobStatus.model_validate(body["status"])
            t = time.monotonic()
            job.last_contact = t
            job.status = st
            if st.heartbeat != job.beat:
                job.beat, job.beat_seen = st.heartbeat, t
            elif st.state in ACTIVE and t - job.beat_seen > self.heartbeat_timeout_s:
                self._mark_lost(
                    job,
                    f"heartbeat lost: job {job.job_id} on {self.url} is {st.state} but its heartbeat has not moved "
                    f"for {t - job.beat_seen:.0f} s (last {st.heartbeat})",
                )
                with contextlib.suppress(Exception):  # do not leave it running on a node we gave up on
                    self._request("POST", f"{path}/cancel", ok=(200, 202, 404), budget_s=0)
            job.ckpt_listing = body.get("checkpoint")
            return self._view(job)

    def _mark_lost(self, job: _Job, reason: str) -> None:
        job.lost = reason
        log.warning("%s: %s", self.name, reason)

    def _mirror(self, job: _Job, *, blocking: bool) -> None:
        """Copy the agent's newest checkpoint pair into the local mirror when it is newer than ours (one
        mirror at a time per job: without ``blocking`` a call returns at once while another one runs)."""
        if not job.mirror_lock.acquire(blocking=blocking):
            return
        try:
            self._mirror_locked(job, job.ckpt_listing)
        finally:
            job.mirror_lock.release()

    def _mirror_locked(self, job: _Job, ckpt: Any) -> None:
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("step"), int):
            return
        step = ckpt["step"]
        if job.ckpt_step is not None and step <= job.ckpt_step:
            return
        files = [f for f in ckpt.get("files") or [] if isinstance(f, dict)]
        names = [str(f.get("name")) for f in files]
        if (
            not files
            or not all(_CKPT_FILE.match(n) for n in names)
            or not any(n.endswith(".json") for n in names)
        ):
            log.warning(
                "%s: job %s: ignoring a malformed checkpoint listing %s", self.name, job.job_id, names
            )
            return
        dest = self.root / job.job_id / _CHECKPOINTS
        incoming = self.root / job.job_id / ".checkpoint-incoming"
        shutil.rmtree(incoming, ignore_errors=True)
        incoming.mkdir(parents=True)
        try:
            for f in files:
                self._download(
                    f"/v1/jobs/{job.job_id}/checkpoints/{f['name']}",
                    incoming / f["name"],
                    str(f["sha256"]),
                    f.get("size"),
                    job.job_id,
                    budget_s=min(self.retry_budget_s, self.heartbeat_timeout_s),
                )
        except (TransientError, PermanentError, _Mismatch, OSError) as exc:
            # rotated away meanwhile, a dying node or a bad copy: keep the previous mirror, try the next one
            log.info("%s: job %s: checkpoint %d not mirrored (%s)", self.name, job.job_id, step, exc)
            shutil.rmtree(incoming, ignore_errors=True)
            return
        dest.mkdir(parents=True, exist_ok=True)
        for name in sorted(names, key=lambda n: n.endswith(".json")):  # the JSON commit marker last
            os.replace(incoming / name, dest / name)
        for old in dest.iterdir():
            if (m := _CKPT_FILE.match(old.name)) and int(m.group(1)) != step:
                old.unlink(missing_ok=True)
        shutil.rmtree(incoming, ignore_errors=True)
        job.ckpt_step = step
        log.info("%s: job %s: mirrored checkpoint step %d", self.name, job.job_id, step)

    def _pump_logs(self, job: _Job) -> None:
        """Forward new log lines to ``on_log`` / this module's logger (only when someone listens)."""
        if self.on_log is None and not log.isEnabledFor(logging.INFO):
            return
        with job.lock:
            try:
                r = self._request(
                    "GET",
                    f"/v1/jobs/{job.job_id}/logs",
                    params={"offset": job.log_offset},
                    budget_s=0,
                    timeout=self._poll_timeout,
                    job_id=job.job_id,
                )
                body = r.json()
            except (TransientError, PermanentError):
                return
            job.log_offset = int(body["next_offset"])
            for line in str(body["text"]).splitlines():
                if self.on_log is not None:
                    self.on_log(line)
                else:
                    log.info("%s %s: %s", self.name, job.job_id, line)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                jobs = [j for j in self._jobs.values() if j.active and j.submitted]
            for job in jobs:
                try:
                    self._refresh(job, max_age=self.poll_s / 2)
                    self._pump_logs(job)
                except Exception as exc:  # never let the poller die; status()/result() surface errors
                    log.debug("%s: polling job %s failed: %s", self.name, job.job_id, exc)

    # --- results ---------------------------------------------------------------------------------------------
    def _record(
        self, job: _Job, state: JobState, failure: FailureKind | None, reason: str | None
    ) -> AttemptRecord:
        return AttemptRecord(
            attempt=job.attempt,
            runner=self.name,
            node=self.node or self.url,
            started=job.started,
            ended=now(),
            state=state,
            failure=failure,
            reason=reason,
        )

    def _lost_result(self, job: _Job, reason: str) -> JobResult:
        st = job.status
        return JobResult(
            job_id=job.job_id,
            spec_hash=job.spec.spec_hash if job.spec else "",
            state=JobState.FAILED,
            failure=FailureKind.INFRA,
            metrics=dict(st.metrics) if st else {},
            attempts=[self._record(job, JobState.FAILED, FailureKind.INFRA, reason[:500])],
            error=reason,
        )

    def _fetch_result(self, job: _Job) -> JobResult:
        if job.spec is None:
            raise JobNotFound(
                f"job {job.job_id}: no spec under {self.root / job.job_id}; fetch the result with the runner "
                "(workdir_root) that submitted it"
            )
        try:
            deadline = time.monotonic() + self.retry_budget_s
            # the agent may report the worker's terminal state a moment before its runner has the result (409)
            while (
                r := self._request("GET", f"/v1/jobs/{job.job_id}/result", ok=(200, 409), job_id=job.job_id)
            ).status_code == 409:
                if time.monotonic() > deadline:
                    raise TransientError(
                        f"the agent still has no result for job {job.job_id}: {_error_of(r)[0]}"
                    )
                time.sleep(self.poll_s)
            body = r.json()
            res = JobResult.model_validate(body["result"])
            manifest = {str(f["path"]): (str(f["sha256"]), f.get("size")) for f in body.get("files") or []}
        except TransientError as exc:
            return self._lost_result(job, f"agent unreachable while fetching the result: {exc}")
        except (KeyError, TypeError, ValueError) as exc:
            return self._verify_failed(job, None, f"the agent's result answer is malformed ({exc})")
        attempts = list(res.attempts)
        if attempts:
            attempts[-1] = attempts[-1].model_copy(
                update={"runner": self.name, "node": self.node or attempts[-1].node}
            )
        res = res.model_copy(update={"job_id": job.job_id, "attempts": attempts})
        if res.state != JobState.SUCCEEDED:
            return res.model_copy(update={"artifacts": {}})
        if res.spec_hash != job.spec.spec_hash:
            return self._verify_failed(
                job, res, f"the agent reports spec_hash {res.spec_hash}, the job's is {job.spec.spec_hash}"
            )
        problems = [
            f"{p!r} is not a relative path inside the output dir" for p in manifest if not _safe_relpath(p)
        ]
        problems += [
            f"artifact {rel}: sha256 {sha} is not in the agent's manifest (manifest: "
            f"{manifest.get(rel, ('absent',))[0]})"
            for rel, sha in res.artifacts.items()
            if manifest.get(rel, (None,))[0] != sha
        ]
        if problems:
            return self._verify_failed(job, res, "; ".join(problems[:5]))
        out = Path(job.spec.outputs.dir).resolve()
        staging = out / f".incoming-{job.job_id}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            for rel, (sha, size) in manifest.items():
                dest = staging / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                self._download(f"/v1/jobs/{job.job_id}/artifacts/{quote(rel)}", dest, sha, size, job.job_id)
            for rel in manifest:  # all verified: move them into place
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / rel, out / rel)
        except _Mismatch as exc:
            return self._verify_failed(
                job, res, f"downloaded artifact does not match the agent's manifest: {exc}"
            )
        except AgentAuthError:
            raise
        except AgentRefused as exc:  # a file it listed but will not serve
            return self._verify_failed(job, res, f"the agent did not serve a listed artifact: {exc}")
        except TransientError as exc:
            return self._lost_result(job, f"agent unreachable while downloading the artifacts: {exc}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        artifacts = {str((out / rel).resolve()): sha for rel, sha in res.artifacts.items()}
        return res.model_copy(update={"artifacts": artifacts})

    def _verify_failed(self, job: _Job, res: JobResult | None, problem: str) -> JobResult:
        reason = (
            f"verification failed on {self.node or self.url}: {problem}; the node's outputs were discarded"
        )
        log.warning("%s: job %s: %s", self.name, job.job_id, reason)
        assert job.spec is not None
        base = res or JobResult(job_id=job.job_id, spec_hash=job.spec.spec_hash, state=JobState.FAILED)
        prior = base.attempts[:-1] if base.attempts else []
        record = self._record(job, JobState.FAILED, FailureKind.VERIFY, reason[:500])
        if base.attempts:
            record = base.attempts[-1].model_copy(
                update={"state": JobState.FAILED, "failure": FailureKind.VERIFY, "reason": reason[:500]}
            )
        return base.model_copy(
            update={
                "state": JobState.FAILED,
                "failure": FailureKind.VERIFY,
                "artifacts": {},
                "attempts": [*prior, record],
                "error": reason,
            }
        )

    # --- inputs ----------------------------------------------------------------------------------------------
    @staticmethod
    def _input_blobs(spec: JobSpec) -> dict[str, Path]:
        """sha256 → local file for every input (a file ref is one blob, a directory ref one per file)."""
        blobs: dict[str, Path] = {}
        for ref in spec.inputs:
            if not ref.files:
                blobs.setdefault(ref.sha256, Path(ref.path))
            for f in ref.files:
                if _safe_relpath(f.path) is None:
                    raise ConfigError(f"input {ref.path}: file {f.path!r} must be a relative path inside it")
                blobs.setdefault(f.sha256, Path(ref.path) / f.path)
        return blobs

    @staticmethod
    def _resume_blobs(spec: JobSpec) -> list[tuple[dict[str, str], Path]]:
        """[({"name", "sha256"}, path)] for the checkpoint files of ``spec.checkpoint.resume_from``."""
        src = spec.checkpoint.resume_from
        if not src:
            return []
        d = Path(src)
        if not d.is_dir():
            raise ConfigError(
                f"checkpoint.resume_from {d} is not a directory; pass a runner's checkpoint_dir()"
            )
        files = sorted(p for p in d.iterdir() if p.is_file() and _CKPT_FILE.match(p.name))
        return [({"name": p.name, "sha256": sha256_file(p)}, p) for p in files]


def _pin_of(base: str, cert: str | None, fp: str | None) -> tuple[str | None, str] | None:
    """``(certificate PEM or None, fingerprint)`` pinning an https ``base``; None for loopback http.
    ``ConfigError`` when an https agent has no pin, or the two given disagree."""
    if not base.startswith("https://"):
        return None
    try:
        agreed = tlslib.agreed_fingerprint(cert, fp)
    except ConfigError as exc:
        raise ConfigError(f"agent {base}: {exc}") from None
    if agreed is not None:
        return cert or None, agreed
    raise ConfigError(
        f"agent URL {base}: no pinned certificate; give the node's certificate or its sha256 fingerprint "
        "(`depin worker serve --json` prints tls_fingerprint; depin worker register NAME --url … --fingerprint …)"
    )


def _int_header(r: httpx.Response, name: str) -> int:
    try:
        return max(0, int(r.headers.get(name, "0")))
    except ValueError:
        return 0


def _missing_of(r: httpx.Response) -> list[str]:
    """The blobs a 422 ``missing_blobs`` answer lists (``error.missing``)."""
    try:
        missing = r.json()["error"].get("missing")
    except (ValueError, AttributeError, KeyError, TypeError):
        return []
    return [str(m) for m in missing] if isinstance(missing, list) else []


def _newest_step(d: Path) -> int | None:
    """The newest step with a JSON marker in checkpoint directory ``d`` (None when there is none)."""
    if not d.is_dir():
        return None
    steps = [int(m.group(1)) for p in d.iterdir() if (m := _CKPT_FILE.match(p.name)) and m.group(2) == "json"]
    return max(steps, default=None)
