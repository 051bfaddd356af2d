"""The HTTP client the providers share: one ``httpx.Client``, timeouts, retries of transient failures, errors
mapped onto ``depin_core.errors``, and the agent health probe.

Transient (retried by ``depin_core.retry``'s policy: jittered exponential backoff, ``Retry-After`` honoured):
connection errors, 429, 502, 503, 504. A request that may have reached the server (read timeout, dropped
connection) is retried only when idempotent; a refused TLS certificate never is. 401/403 → ``PermanentError`` naming the API-key variable; other 4xx → ``PermanentError`` with the
provider's message. The API key lives in the client's default headers and nowhere else: never in a message,
a log line or a ``repr``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from typing import Any

import httpx
from pydantic import SecretStr

from depin_core import tls as tlslib
from depin_core.errors import ConfigError, PermanentError, TransientError
from depin_core.http import check_base_url
from depin_core.retry import Failures, Outcome, RetryPolicy
from gpu_jobs.errors import ProviderRefused

log = logging.getLogger(__name__)


def _field_error(item: Any) -> str:
    """One FastAPI validation error as ``field.path: message`` (the ``body``/``query`` root dropped)."""
    if not isinstance(item, dict):
        return str(item)
    loc = [str(p) for p in item.get("loc") or [] if p not in ("body", "query", "path")]
    msg = str(item.get("msg") or item)
    return f"{'.'.join(loc)}: {msg}" if loc else msg


def _message(r: httpx.Response, secret: str) -> str:
    """A short, secret-free description of an error body (``detail`` / ``error`` / ``msg`` / text)."""
    try:
        doc = r.json()
    except ValueError:
        text = r.text
    else:
        if isinstance(doc, dict) and isinstance(doc.get("detail"), list):  # FastAPI 422: [{loc, msg}]
            text = "; ".join(_field_error(e) for e in doc["detail"])
        elif isinstance(doc, dict):
            code, msg = doc.get("error"), doc.get("msg") or doc.get("message")
            if not doc.get("detail") and isinstance(code, str) and isinstance(msg, str) and msg:
                text = msg if code in msg else f"{code}: {msg}"  # Vast: {"error": code, "msg": text}
            else:
                text = str(doc.get("detail") or code or msg or doc)
        else:
            text = str(doc)
    text = " ".join(text.split())[:300]
    return text.replace(secret, "***") if secret else text


class _Failures(Failures):
    """A provider API's words for the failures the retry policy stops on (the key never in them)."""

    def __init__(self, api: ApiClient, where: str) -> None:
        super().__init__(where)
        self.api = api

    def problem(self, outcome: Outcome) -> str:
        if isinstance(outcome, httpx.Response):
            return f"{outcome.status_code} {_message(outcome, self.api._secret)}"
        return super().problem(outcome)

    def refused(self, r: httpx.Response) -> ProviderRefused:
        if r.status_code in (401, 403):
            return ProviderRefused(
                f"{self.where}: {r.status_code}, the API key was refused; set a valid key in {self.api.key_hint}",
                status=r.status_code,
            )
        detail = _message(r, self.api._secret)
        return ProviderRefused(f"{self.where}: {r.status_code} {detail}", status=r.status_code, detail=detail)

    def gave_up(self, problem: str, attempts: int, retry_after: float | None) -> TransientError:
        return TransientError(
            f"{self.where}: {problem}; gave up after {attempts} attempts, retry later",
            retry_after=retry_after,
        )


class ApiClient:
    """A client of one provider API. ``auth_headers`` carry the key; ``key_hint`` names where the user sets it
    (e.g. ``DEPIN_VAST_API_KEY``)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: SecretStr,
        auth_headers: Callable[[str], dict[str, str]],
        key_hint: str,
        provider: str,
        timeout: float = 30.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 15.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        url = check_base_url(base_url, f"{provider} API URL")
        if not isinstance(api_key, SecretStr) or not api_key.get_secret_value().strip():
            raise ConfigError(f"{provider}: no API key; set {key_hint}")
        self.base_url = url
        self.provider = provider
        self.key_hint = key_hint
        self.policy = RetryPolicy(max_retries=retries, base_s=backoff_s, max_s=max_backoff_s, sleep=sleep)
        self._secret = api_key.get_secret_value()
        self._client = httpx.Client(
            base_url=url,
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            transport=transport,
            headers=auth_headers(self._secret),
            follow_redirects=False,  # a redirect must never carry the key elsewhere
        )

    def __repr__(self) -> str:
        return f"ApiClient({self.provider}, {self.base_url!r}, api_key=set)"

    def close(self) -> None:
        self._client.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        ok: Collection[int] = (200, 201),
        idempotent: bool = True,
        **kwargs: Any,
    ) -> httpx.Response:
        """``method path`` with retries: the response when its status is in ``ok``; else ``PermanentError`` /
        ``TransientError`` (after the last retry)."""
        return self.policy.send(
            lambda: self._client.request(method, path, **kwargs),
            _Failures(self, f"{self.provider}: {method} {self.base_url}{path}"),
            idempotent=idempotent,
            ok=ok,
        )

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """``request`` and decode its JSON body (``PermanentError`` when it is not JSON)."""
        r = self.request(method, path, **kwargs)
        try:
            return r.json()
        except ValueError:
            raise PermanentError(
                f"{self.provider}: {method} {path} answered {r.status_code} with a body that is not JSON"
            ) from None


class HealthCheck:
    """``GET {url}/v1/health`` of a worker agent with its token; ``check`` → the health document or None."""

    def __init__(self, *, timeout: float = 5.0, transport: httpx.BaseTransport | None = None) -> None:
        self._timeout, self._transport = timeout, transport
        self._client = httpx.Client(timeout=timeout, transport=transport, follow_redirects=False)
        self._pinned: dict[str, httpx.Client] = {}  # by certificate PEM
        self.last_problem = ""

    def _client_for(self, url: str, tls_cert: str | None) -> httpx.Client:
        if not url.startswith("https://"):
            return self._client
        if not tls_cert:
            raise PermanentError(f"agent at {url}: no pinned certificate to check it against")
        if tls_cert not in self._pinned:
            self._pinned[tls_cert] = httpx.Client(
                timeout=self._timeout,
                transport=self._transport,
                follow_redirects=False,
                verify=tlslib.client_context(tls_cert),
            )
        return self._pinned[tls_cert]

    def check(self, url: str, token: SecretStr, tls_cert: str | None = None) -> dict[str, Any] | None:
        """The agent's health JSON, or None (``last_problem`` says why); an ``https`` URL must present
        ``tls_cert`` (the pin). A refused token, a certificate other than the pinned one, or plain HTTP to a
        remote host raise ``PermanentError``/``ConfigError``: waiting longer will not help."""
        if not url:
            self.last_problem = "no URL yet"
            return None
        tlslib.check_url(url, "agent URL")
        try:
            r = self._client_for(url, tls_cert).get(
                f"{url.rstrip('/')}/v1/health",
                headers={"Authorization": f"Bearer {token.get_secret_value()}"},
            )
        except httpx.HTTPError as exc:
            if tlslib.is_certificate_refusal(exc):
                pinned = tlslib.fingerprint(tls_cert) if tls_cert else None
                raise tlslib.pin_refused(
                    exc, f"agent at {url}", pinned, "destroy the instance and launch the next attempt"
                ) from None
            self.last_problem = f"{type(exc).__name__}"
            return None
        if r.status_code in (401, 403):
            raise PermanentError(
                f"agent at {url} refused the token ({r.status_code}); the instance runs with another "
                "token (a relaunch under the same name?): destroy it and launch the next attempt"
            )
        if r.status_code != 200:
            self.last_problem = f"health answered {r.status_code}"
            return None
        try:
            doc = r.json()
        except ValueError:
            self.last_problem = "health answered with a body that is not JSON"
            return None
        return doc if isinstance(doc, dict) else None

    def close(self) -> None:
        self._client.close()
        for client in self._pinned.values():
            client.close()
