"""HTTP client of the function gateway: invoke functions, read versions, and the admin API, with retries.

Transient failures are retried with exponential backoff (jittered, capped): connection errors, and 429 / 502 /
503 / 504 answers (their ``Retry-After`` is honoured). A request that may have reached the server (a read
timeout, a dropped connection) is retried only when it is idempotent: every call here is, except
``rollback``. Other 4xx/5xx answers raise :class:`GatewayRefused` (a ``PermanentError``) carrying the
gateway's error code, field and message plus what to do about it. The admin key is a ``SecretStr``: it
goes into the ``X-API-Key`` header and nowhere else (never into a message, a log line or ``repr``).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from depin_core.errors import ConfigError, PermanentError, TransientError
from depin_core.http import NOT_SENT, check_base_url
from depin_core.retry import Failures, Outcome, RetryPolicy
from depin_core.tls import (
    PinMismatch,
    check_url,
    client_context,
    fingerprint,
    pin_refused,
)

log = logging.getLogger(__name__)

_SAFE = "@"  # kept literal in path segments (name@alias)


class GatewayRefused(PermanentError):
    """The gateway answered with a permanent error; ``status``, ``code`` and ``field`` come from its
    ``{"error": {...}}`` body, the message adds the fix."""

    def __init__(self, message: str, *, status: int, code: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.field = status, code, field


def _fix(status: int, code: str, field: str | None) -> str:
    """What the caller should do about a refused request."""
    if status == 401:
        return "pass the gateway's admin key (depin publish --admin-key-file FILE, or DEPIN_ADMIN_KEY)"
    if code == "forbidden":
        return (
            "the admin key is wrong: use the key `depin serve` printed on its first start (saved beside its "
            "keys file as admin.key) or one whose sha256 the gateway has in DEPIN_GATEWAY_ADMIN_KEY_HASHES"
        )
    if code == "admin_disabled":
        return "configure an admin key on the gateway (DEPIN_GATEWAY_ADMIN_KEY_HASHES or the keys file)"
    if code == "untrusted_publisher":
        return (
            "add the publisher's address to the gateway's DEPIN_GATEWAY_TRUSTED_PUBLISHERS, or publish with "
            "a trusted key (DEPIN_PUBLISHER_KEY)"
        )
    if status == 413:
        return (
            "send less: fewer rows per request, or raise the gateway's DEPIN_GATEWAY_MAX_BODY_BYTES / "
            "DEPIN_GATEWAY_MAX_UPLOAD_BYTES"
        )
    if code in ("invalid_bundle", "load_failed"):
        return "rebuild the bundle from a model artifact written by `depin train` of this depin version"
    if status == 404:
        return "check the name, alias or version (GET /v1/functions lists what the gateway serves)"
    if status in (400, 422):
        return "send the field the error names as the message says (type, unit, range, an example value)"
    if status >= 500:
        return "see the gateway's log"
    return "see the message"


def _error_of(r: httpx.Response) -> tuple[str, str, str | None]:
    """(code, message, field) of an error response (any body shape)."""
    try:
        err = r.json().get("error") or {}
        return str(err.get("code") or "http_error"), str(err.get("message") or ""), err.get("field")
    except (ValueError, AttributeError):
        return "http_error", r.text[:300].strip(), None


class _Failures(Failures):
    """The gateway client's words for the failures its retry policy stops on."""

    def __init__(self, client: GatewayClient, where: str) -> None:
        super().__init__(where)
        self.client = client

    def problem(self, outcome: Outcome) -> str:
        if isinstance(outcome, httpx.Response):
            code, message, _ = _error_of(outcome)
            return f"{outcome.status_code} {code}: {message}"
        what = "cannot connect" if isinstance(outcome, NOT_SENT) else "connection failed"
        return f"{what} ({type(outcome).__name__}: {outcome})"

    def refused(self, r: httpx.Response) -> GatewayRefused:
        code, message, field = _error_of(r)
        return GatewayRefused(
            f"{self.where} refused ({r.status_code} {code}"
            + (f", field {field}" if field else "")
            + f"): {message or r.reason_phrase}; {_fix(r.status_code, code, field)}",
            status=r.status_code,
            code=code,
            field=field,
        )

    def certificate(self, exc: httpx.TransportError) -> PinMismatch:
        return self.client._pin_error(exc)  # nothing was sent: the handshake failed before the request

    def maybe_applied(self, outcome: Outcome, problem: str, retry_after: float | None) -> TransientError:
        return TransientError(
            f"{self.where}: the connection failed after sending ({type(outcome).__name__}); check the "
            "result (GET the function) before retrying"
        )

    def gave_up(self, problem: str, attempts: int, retry_after: float | None) -> TransientError:
        hint = "is the gateway running there? (depin serve)" if "connect" in problem else "retry later"
        return TransientError(
            f"{self.where}: {problem}; gave up after {attempts} attempts — {hint}", retry_after=retry_after
        )


def invoke_body(inputs: list[Any] | dict[str, Any]) -> dict[str, Any]:
    """The invoke request body: a list is engineered rows (``{"inputs": rows}``); a dict is already a body of one
    form (``{"inputs": …}``, ``{"telemetry": …}``, ``{"plan": …}`` or another its family accepts), sent as is:
    the function's family decides which forms it takes."""
    if isinstance(inputs, dict):
        if len(inputs) != 1:
            raise ConfigError(
                f"an invoke body has exactly one field, its input form (inputs, telemetry, plan, …); got "
                f"{sorted(inputs)[:5]}"
            )
        return inputs
    return {"inputs": inputs}


class GatewayClient:
    """A client of one gateway (``base_url``, e.g. ``http://127.0.0.1:8787``).

    ``tls_cert_pem``: the gateway's certificate, pinned (the only one trusted; ``https://`` needed). A
    plain-HTTP URL to a non-loopback host is refused before any connection, unless ``insecure_http`` (public
    calls only: never with an admin key or a pin). A certificate other than the trusted one raises :class:`depin_core.tls.PinMismatch` (never retried).

    ``retries`` extra attempts after the first for transient failures, waiting ``backoff_s × 2^attempt``
    (or the server's ``Retry-After``), jittered ±20 %, at most ``max_backoff_s``. ``transport`` and ``sleep``
    are for tests.
    """

    def __init__(
        self,
        base_url: str,
        *,
        admin_key: SecretStr | None = None,
        timeout: float = 120.0,
        retries: int = 5,
        backoff_s: float = 0.25,
        max_backoff_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        tls_cert_pem: str | None = None,
        insecure_http: bool = False,
    ) -> None:
        url = check_base_url(base_url, "gateway URL")
        if admin_key is not None and not isinstance(admin_key, SecretStr):
            raise ConfigError("admin_key must be a pydantic SecretStr (keeps it out of logs and reprs)")
        if admin_key is not None or tls_cert_pem is not None or not insecure_http:
            # vehicle rows and the admin key never cross a network in clear; ``insecure_http`` lets public
            # calls (no admin key) reach a remote plain-HTTP gateway the user chose to trust
            check_url(url, "gateway URL")
        if tls_cert_pem is not None and not url.startswith("https://"):
            raise ConfigError(f"gateway URL {url}: a pinned certificate was given, so use https://")
        self.tls_fingerprint = fingerprint(tls_cert_pem) if tls_cert_pem is not None else None
        self.base_url = url
        self._admin_key = admin_key
        self.policy = RetryPolicy(max_retries=retries, base_s=backoff_s, max_s=max_backoff_s, sleep=sleep)
        verify: ssl.SSLContext | bool = client_context(tls_cert_pem) if tls_cert_pem is not None else True
        self._client = httpx.Client(base_url=url, timeout=timeout, transport=transport, verify=verify)

    def __repr__(self) -> str:
        return f"GatewayClient({self.base_url!r}, admin_key={'set' if self._admin_key else 'unset'})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- transport ---------------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        admin: bool = False,
        idempotent: bool = True,
        ok: Collection[int] = (200, 201),
        **kwargs: Any,
    ) -> httpx.Response:
        """Send ``method path`` with retries (see the class docstring): the response if its status is in
        ``ok``, else ``GatewayRefused`` / ``TransientError`` (after the last retry)."""
        headers = dict(kwargs.pop("headers", None) or {})
        if admin:
            if self._admin_key is None:
                raise ConfigError(
                    f"{method} {path} is an admin call: give the gateway's admin key "
                    "(--admin-key-file FILE or DEPIN_ADMIN_KEY)"
                )
            headers["X-API-Key"] = self._admin_key.get_secret_value()
        return self.policy.send(
            lambda: self._client.request(method, path, headers=headers, **kwargs),
            _Failures(self, f"{method} {self.base_url}{path}"),
            idempotent=idempotent,
            ok=ok,
        )

    def _pin_error(self, exc: Exception) -> PinMismatch:
        if self.tls_fingerprint is None:
            return PinMismatch(
                f"{self.base_url}: the gateway's TLS certificate is not trusted ({exc}); pass its certificate "
                "(--tls-cert FILE) or give it a CA-signed certificate"
            )
        return pin_refused(
            exc,
            f"{self.base_url}: the server",
            self.tls_fingerprint,
            "Check the address; if the gateway VM was recreated, run `depin fluence down` and publish again",
        )

    # ---- API ---------------------------------------------------------------------------------------------
    def invoke(
        self,
        ref: str,
        inputs: list[Any] | dict[str, Any],
        *,
        request_id: str | None = None,
        timeout_ms: float | None = None,
    ) -> tuple[dict[str, Any], httpx.Headers]:
        """``POST /v1/functions/{ref}/invoke`` → (``{"function", "version", "outputs", …}``, headers).
        ``inputs``: engineered rows, or a request body of one form (:func:`invoke_body`)."""
        headers = {}
        if request_id is not None:
            headers["X-Request-Id"] = request_id
        if timeout_ms is not None:
            headers["X-Depin-Timeout-Ms"] = str(timeout_ms)
        r = self.request(
            "POST",
            f"/v1/functions/{quote(ref, safe=_SAFE)}/invoke",
            json=invoke_body(inputs),
            headers=headers,
        )
        return r.json(), r.headers

    def functions(self) -> list[dict[str, Any]]:
        """``GET /v1/functions``."""
        return self.request("GET", "/v1/functions").json()["functions"]

    def function(self, name: str) -> dict[str, Any]:
        """``GET /v1/functions/{name}``: versions, aliases, latest manifest + signature."""
        return self.request("GET", f"/v1/functions/{quote(name)}").json()

    def manifest_bytes(self, name: str, version: str) -> bytes:
        """The exact signed bytes of ``manifest.json`` of ``name``@``version``."""
        return self.request(
            "GET", f"/v1/functions/{quote(name)}/versions/{quote(version)}/manifest.json"
        ).content

    def signature(self, name: str, version: str) -> dict[str, Any]:
        """``signature.json`` of ``name``@``version``."""
        return self.request(
            "GET", f"/v1/functions/{quote(name)}/versions/{quote(version)}/signature.json"
        ).json()

    def upload(self, name: str, version: str, packed: bytes) -> dict[str, Any]:
        """Admin: ``PUT`` a packed bundle (idempotent: an existing version answers 200, a new one 201)."""
        r = self.request(
            "PUT",
            f"/v1/functions/{quote(name)}/versions/{quote(version)}",
            admin=True,
            content=packed,
            headers={"Content-Type": "application/x-tar"},
        )
        return r.json()

    def set_alias(self, name: str, alias: str, target: str | Mapping[str, float]) -> dict[str, Any]:
        """Admin: point ``alias`` at a version (or another alias) or a split ``{version: weight}``."""
        body = {"version": target} if isinstance(target, str) else {"weights": dict(target)}
        return self.request(
            "PUT", f"/v1/functions/{quote(name)}/aliases/{quote(alias)}", admin=True, json=body
        ).json()

    def rollback(self, name: str, alias: str) -> dict[str, Any]:
        """Admin: restore ``alias``'s previous target (never re-sent: a rollback is not idempotent)."""
        path = f"/v1/functions/{quote(name)}/aliases/{quote(alias)}/rollback"
        return self.request("POST", path, admin=True, idempotent=False).json()
