"""HTTP plumbing of the DIMO client: per-service rate limiting, bounded concurrency, retries with full-jitter
backoff (honouring ``Retry-After``), one token refresh on 401, and error classification.

Classification: 429/500/502/503/504, timeouts, connect errors, dropped connections and unparseable pages are
transient (retried, then :class:`DimoTransientError`); 401 refreshes the token once; 400/403/404 and
GraphQL errors are permanent with a message saying what to fix.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import httpx
import orjson

from connectors.dimo.errors import (
    ComplexityLimitExceeded,
    DimoAuthError,
    DimoPrivilegeError,
    DimoQueryError,
    DimoTransientError,
    ExecutionTimeExceeded,
)
from depin_core import retry
from depin_core.http import parse_retry_after

T = TypeVar("T")
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
RETRY_AFTER_CAP_S = 60.0  # a server asking for longer is treated as 'a minute'
USER_AGENT = "depin-pipeline/0.1 (+httpx)"

Sleep = Callable[[float], Awaitable[None]]
# Called with the service's name before each request, after the client's own rate limiter: a gate shared with
# other processes, such as a fleet-wide rate limit held by the orchestrator (``pipelines.fleet_rate``).
Admission = Callable[[str], Awaitable[None]]


# httpcore may write a request's headers and body separately; without TCP_NODELAY, Nagle's algorithm and
# the peer's delayed ACK can add ~40 ms to a keep-alive POST (seen on loopback with servers lacking it).
NO_DELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


class TokenRejected(Exception):
    """The server rejected the bearer token (HTTP 401 or a GraphQL ``unauthorized: jwt …`` error)."""


class TokenSource(Protocol):
    """Hands out a bearer token; ``refresh(stale)`` replaces it unless someone already did."""

    async def token(self) -> str: ...

    async def refresh(self, stale: str) -> None: ...


@dataclass
class ClientStats:
    """Counters for one client: requests sent, retries, bytes received, status codes, time in requests."""

    requests: int = 0
    retries: int = 0
    bytes: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    vehicles_skipped: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "retries": self.retries,
            "bytes": self.bytes,
            "statuses": dict(self.statuses),
            "errors": dict(self.errors),
            "seconds": round(self.seconds, 3),
            "vehicles_skipped": self.vehicles_skipped,
        }


class Pacer:
    """An :data:`Admission` pacing each DIMO service at ``rate`` requests/s (``burst`` at once): each client's
    own limiter, and one shared by every client of a process, across threads and event loops (a Prefect run's
    tasks each run their own loop in a thread). DIMO's limit belongs to the license, so a run's tasks share one pace rather than each taking a
    fixed share: their bursts do not stack, and the tasks still running get the rate the finished ones left.

    A request reserves its send time under a thread lock (GCRA: a theoretical arrival time advanced by
    ``1/rate`` per request, ``burst - 1`` of them early), then sleeps until then; waiters are served in
    reservation order. ``rate <= 0`` disables it."""

    def __init__(
        self,
        rate: float,
        burst: int = 2,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._clock = clock
        self._sleep = sleep
        self._next: dict[str, float] = {}  # service -> theoretical arrival time of its next request
        self._lock = threading.Lock()

    def reserve(self, service: str) -> float:
        """Reserve the next send time of a ``service`` request; return the seconds to wait for it."""
        if self.rate <= 0:
            return 0.0
        interval = 1.0 / self.rate
        with self._lock:
            now = self._clock()
            due = max(self._next.get(service, now), now)
            send_at = max(now, due - (self.burst - 1) * interval)
            self._next[service] = due + interval
        return send_at - now

    async def __call__(self, service: str) -> None:
        wait = self.reserve(service)
        if wait > 0:
            await self._sleep(wait)


@dataclass
class RetryPolicy(retry.RetryPolicy):
    """``depin_core.retry``'s policy with the DIMO client's settings: 500 is transient too (the DIMO APIs answer
    it under load), full-jitter backoff, a server's ``Retry-After`` taken as is (capped at 60 s), async waits.
    Every DIMO request is a read (GraphQL queries, token exchanges), so each is retried."""

    max_retries: int | None = 8
    base_s: float = 0.5
    max_s: float = 30.0
    statuses: frozenset[int] = RETRYABLE_STATUS
    full_jitter: bool = True
    retry_after_cap_s: float | None = RETRY_AFTER_CAP_S
    sleep: Sleep = asyncio.sleep


def _short(body: bytes, limit: int = 300) -> str:
    return body[:limit].decode("utf-8", "replace").strip()


def orjson_or_none(body: bytes) -> Any:
    """``body`` decoded as JSON, or None when it is not valid JSON."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _message(body: bytes) -> str:
    """The human message of an error body (JSON ``message``/``error_description``/``errors``, or text)."""
    doc = orjson_or_none(body)
    if isinstance(doc, dict):
        if isinstance(doc.get("errors"), list) and doc["errors"]:
            return "; ".join(str(e.get("message", e)) for e in doc["errors"] if isinstance(e, dict))
        for key in ("message", "error_description", "error"):
            if doc.get(key):
                return str(doc[key])
    return _short(body)


def classify_status(resp: httpx.Response, what: str, transient: Collection[int] = RETRYABLE_STATUS) -> None:
    """Raise the right error for a non-2xx response (401 → :class:`TokenRejected`, ``transient`` statuses →
    :class:`DimoTransientError`)."""
    status = resp.status_code
    if status < 300:
        return
    if status == 401:
        raise TokenRejected(_message(resp.content))
    if status in transient:
        raise DimoTransientError(
            f"{what}: HTTP {status} ({_message(resp.content)[:120]})",
            retry_after=parse_retry_after(resp.headers.get("retry-after")),
        )
    if status == 422:
        doc = orjson_or_none(resp.content)
        if doc is None:  # gqlgen always sends JSON: this page was cut short
            raise DimoTransientError(f"{what}: HTTP 422 with a truncated body")
        raise_graphql_errors(doc, what)
    msg = _message(resp.content)
    if status == 403:
        raise DimoPrivilegeError(f"{what}: HTTP 403 {msg}")
    raise DimoQueryError(f"{what}: HTTP {status} {msg}")


def raise_graphql_errors(doc: Any, what: str, *, privilege_hint: str = "") -> None:
    """Raise for a GraphQL ``errors`` list (no-op when there is none)."""
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not errors or not isinstance(errors, list):
        return
    first: dict[str, Any] = errors[0] if isinstance(errors[0], dict) else {"message": str(errors[0])}
    msg = str(first.get("message", ""))
    code = str((first.get("extensions") or {}).get("code", ""))
    all_msgs = "; ".join(str(e.get("message", "")) for e in errors if isinstance(e, dict))
    if code == "COMPLEXITY_LIMIT_EXCEEDED":
        raise ComplexityLimitExceeded(f"{what}: {msg}")
    if "maximum execution time" in msg:
        raise ExecutionTimeExceeded(f"{what}: {msg}")
    if msg.startswith("unauthorized: jwt") or msg.startswith("unauthorized: token id does not match"):
        raise TokenRejected(msg)
    if msg.startswith("unauthorized"):
        raise DimoPrivilegeError(f"{what}: {all_msgs}{privilege_hint}")
    if code in ("TOO_MANY_REQUESTS", "INTERNAL_SERVER_ERROR"):
        raise DimoTransientError(f"{what}: {msg} ({code})")
    if code in ("GRAPHQL_VALIDATION_FAILED", "GRAPHQL_PARSE_FAILED"):
        raise DimoQueryError(
            f"{what}: the server rejected the query ({all_msgs}); a signal may have been renamed or removed "
            "from the DIMO schema — drop it or update the catalog"
        )
    raise DimoQueryError(f"{what}: {all_msgs}" + (f" ({code})" if code else ""))


class Service:
    """One DIMO service: a keep-alive ``httpx.AsyncClient``, a rate limiter, a concurrency bound, retries."""

    def __init__(
        self,
        name: str,
        *,
        rate: float,
        concurrency: int,
        timeout_s: float,
        policy: RetryPolicy,
        stats: ClientStats,
        transport: httpx.AsyncBaseTransport | None = None,
        admit: Admission | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self.stats = stats
        self.limiter = Pacer(rate, sleep=policy.sleep)
        self.admit = admit
        self.slots = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.http = httpx.AsyncClient(
            timeout=timeout_s,
            http2=False,
            transport=transport or httpx.AsyncHTTPTransport(limits=limits, socket_options=NO_DELAY),
            headers={"user-agent": USER_AGENT},
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _send(self, method: str, url: str, what: str, **kwargs: Any) -> httpx.Response:
        async with self.slots:
            await self.limiter(self.name)
            if self.admit is not None:
                await self.admit(self.name)
            started = time.perf_counter()
            self.stats.requests += 1
            try:
                resp = await self.http.request(method, url, **kwargs)
            except httpx.TimeoutException as exc:
                raise DimoTransientError(f"{what}: timed out ({type(exc).__name__})") from None
            except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:  # connect/read/write/close
                if self.policy.classify(exc) is retry.Verdict.CERTIFICATE:
                    raise retry.Failures(what).certificate(exc) from None
                raise DimoTransientError(f"{what}: connection failed ({type(exc).__name__})") from None
            finally:
                self.stats.seconds += time.perf_counter() - started
        self.stats.statuses[resp.status_code] += 1
        self.stats.bytes += len(resp.content)
        return resp

    async def call(
        self,
        method: str,
        url: str,
        *,
        what: str,
        parse: Callable[[httpx.Response], Awaitable[T]],
        auth: TokenSource | None = None,
        **kwargs: Any,
    ) -> T:
        """Send with the policy's retries; ``parse`` turns a 2xx into a value and may raise (transient →
        retried). A rejected token is refreshed once per call, and that resend is not a retry."""
        refreshed = False
        headers = dict(kwargs.pop("headers", None) or {})

        async def attempt() -> T:
            nonlocal refreshed
            while True:
                token = None
                try:
                    if auth is not None:
                        token = await auth.token()
                        headers["authorization"] = f"Bearer {token}"
                    resp = await self._send(method, url, what, headers=headers, **kwargs)
                    classify_status(resp, what, self.policy.statuses)
                    return await parse(resp)
                except TokenRejected as exc:
                    self.stats.errors["401"] += 1
                    if auth is None or token is None:
                        raise DimoAuthError(
                            f"{what}: the server asked for a token ({exc}) but none was sent; check that the "
                            "service URL points at the right DIMO API"
                        ) from None
                    if refreshed:
                        raise DimoAuthError(
                            f"{what}: the token was rejected ({exc}) even after a refresh; check that the "
                            "license credentials are valid and the clock is right"
                        ) from None
                    refreshed = True
                    await auth.refresh(token)

        def retrying(exc: DimoTransientError, _delay: float) -> None:
            self.stats.errors[type(exc).__name__] += 1
            self.stats.retries += 1

        def gave_up(exc: DimoTransientError, attempts: int) -> DimoTransientError:
            self.stats.errors[type(exc).__name__] += 1
            return DimoTransientError(
                f"{exc} — gave up after {attempts} attempts; DIMO may be overloaded, try again later "
                "or lower max_concurrency / rate_limit_per_s",
                retry_after=exc.retry_after,
            )

        return await self.policy.run_async(
            attempt, gave_up=gave_up, on_retry=retrying, retry_on=DimoTransientError
        )


async def json_body(resp: httpx.Response, what: str) -> Any:
    """Decode a JSON body; an unparseable page is transient (proxies cut pages short)."""
    try:
        return orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        raise DimoTransientError(f"{what}: response is not valid JSON (truncated page?)") from None


async def graphql_data(resp: httpx.Response, what: str, *, privilege_hint: str = "") -> dict[str, Any]:
    """The ``data`` object of a GraphQL response, raising classified errors for ``errors``."""
    doc = await json_body(resp, what)
    if not isinstance(doc, dict):
        raise DimoTransientError(f"{what}: response is not a GraphQL document")
    raise_graphql_errors(doc, what, privilege_hint=privilege_hint)
    data = doc.get("data")
    if not isinstance(data, dict):
        raise DimoTransientError(f"{what}: response has no data")
    return data
