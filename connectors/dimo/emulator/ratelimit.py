"""DIMO's per-service rate limit, as the emulator enforces it (``--rate-limit``; off by default).

DIMO documents "10 requests per second per API service per client host" (reference §3, Rate limits); its
ingresses run nginx ``limit_req``. Here each (service, client host) pair has a token bucket refilled at ``rate``
per second holding up to one second's worth (``rate`` requests, at least 1). With ``per="license"`` all
clients share one bucket per service instead: the limit of a developer license used from several hosts (the
emulator has one license), which is what a fleet of workers must stay within. A request finding the bucket empty
gets nginx's 429 page with ``Retry-After``: the whole seconds until a token is back (at least 1).

A client that spaces its requests with a token bucket of the same rate never sees a 429 here as long as its own
burst plus the requests it keeps in flight fit in one second's worth: a window of T seconds then holds at most
``in_flight + burst + rate·T`` arrivals, which is what this bucket admits (``rate + rate·T``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Literal

from starlette.types import ASGIApp, Receive, Scope, Send

# Path prefix → service; other paths (/healthz, /keys, /.well-known) are not limited.
RateLimitKey = Literal["client-host", "license"]
SERVICES = (
    ("/auth/", "auth"),
    ("/v1/tokens", "token-exchange"),
    ("/identity", "identity"),
    ("/telemetry", "telemetry"),
)
_PAGE = (
    b"<html>\r\n<head><title>429 Too Many Requests</title></head>\r\n<body>\r\n"
    b"<center><h1>429 Too Many Requests</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


def service_of(path: str) -> str | None:
    """The DIMO service a request path belongs to (None: not rate limited)."""
    return next((name for prefix, name in SERVICES if path.startswith(prefix)), None)


class RateLimiter:
    """ASGI middleware: at most ``rate`` requests/s (burst ``rate``) per service and client host."""

    def __init__(
        self,
        app: ASGIApp,
        rate: float,
        *,
        per: RateLimitKey = "client-host",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0 requests/s, got {rate}")
        self.app = app
        self.rate = rate
        self.per = per
        self.capacity = max(1.0, rate)
        self._clock = clock
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # key → (tokens, at)
        self.passed: dict[str, int] = {}
        self.limited: dict[str, int] = {}

    def admit(self, service: str, host: str) -> float:
        """Take a token for (service, host): 0.0 when admitted, else the seconds until one is back."""
        now = self._clock()
        tokens, at = self._buckets.get((service, host), (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[(service, host)] = (tokens - 1.0, now)
            self.passed[service] = self.passed.get(service, 0) + 1
            return 0.0
        self._buckets[(service, host)] = (tokens, now)
        self.limited[service] = self.limited.get(service, 0) + 1
        return (1.0 - tokens) / self.rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = service_of(scope["path"]) if scope["type"] == "http" else None
        if service is None:
            await self.app(scope, receive, send)
            return
        host = (scope.get("client") or ("?", 0))[0] if self.per == "client-host" else "license"
        wait = self.admit(service, host)
        if not wait:
            await self.app(scope, receive, send)
            return
        headers = [
            (b"content-type", b"text/html"),
            (b"content-length", str(len(_PAGE)).encode()),
            (b"retry-after", str(max(1, math.ceil(wait))).encode()),
        ]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": _PAGE})
