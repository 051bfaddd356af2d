"""The requests of ``AgentRunner`` to its agent: one retry policy, the agent's error answers, the TLS pin and
verified streamed downloads."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from depin_core import tls as tlslib
from depin_core.errors import ConfigError, PermanentError, TransientError
from depin_core.http import TRANSIENT_STATUSES
from depin_core.retry import Failures, Outcome, RetryPolicy
from gpu_jobs.errors import AgentAuthError, AgentRefused, JobNotFound

log = logging.getLogger("gpu_jobs.remote")  # one logger for the package, the name users configure

CHUNK = 1 << 20
TOKEN_FIX = "wrong token for agent URL; check DEPIN_AGENT_TOKEN / depin worker register"
# every 5xx of the agent (or a proxy before it) is worth a retry: its requests are idempotent (a job id, a blob hash)
RETRY_POLICY = RetryPolicy(
    max_retries=None, base_s=0.1, max_s=5.0, statuses=TRANSIENT_STATUSES | set(range(500, 600))
)


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
    field = body.get("field")  # an agent of an earlier version: {"error": message, "field": …}
    return str(err or body)[:500], field if isinstance(field, str) else None


class _Failures(Failures):
    """The runner's words for the failures its retry policy stops on."""

    def __init__(self, runner: AgentClient, method: str, path: str, job_id: str | None = None) -> None:
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


class AgentClient:
    """The HTTP layer of :class:`~gpu_jobs.remote.AgentRunner`: its settings and its requests to the agent (the
    token in the ``Authorization`` header, retries of transient failures, the TLS pin, verified downloads).
    ``AgentRunner.__init__`` sets the attributes."""

    url: str
    name: str
    node: str | None
    root: Path
    poll_s: float
    heartbeat_timeout_s: float
    connect_timeout_s: float
    retry_budget_s: float
    on_log: Callable[[str], None] | None
    _token: SecretStr
    _pin: tuple[str | None, str] | None
    _timeouts: httpx.Timeout
    _transport: httpx.BaseTransport | None
    _client_obj: httpx.Client | None
    _client_lock: threading.Lock
    _poll_timeout: httpx.Timeout

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

    # --- agent calls -----------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """``GET /v1/health`` within ``connect_timeout_s`` (``TransientError`` when the agent is unreachable)."""
        budget = self.connect_timeout_s
        r = self._request("GET", "/v1/health", budget_s=budget, timeout=httpx.Timeout(budget))
        body = r.json()
        if self.node is None and isinstance(body, dict) and body.get("node"):
            self.node = str(body["node"])
        return body

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
