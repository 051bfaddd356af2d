"""Pieces the HTTP clients share (gateway, Fluence, providers, worker agent, DIMO): base URLs, the statuses
that are worth a retry and a server's ``Retry-After``. The retry policy itself is ``depin_core.retry``."""

from __future__ import annotations

import email.utils
import time
from datetime import UTC

import httpx

from depin_core.errors import ConfigError

TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)  # safe to retry, idempotent or not


def check_base_url(url: str, what: str) -> str:
    """``url`` without blanks and trailing slashes; ``ConfigError`` naming ``what`` unless it is http(s)."""
    base = url.strip().rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ConfigError(f"{what} {url!r} must start with http:// or https://")
    return base


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; None when absent or unparseable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000" parses naive; HTTP dates are UTC, not the machine's local time
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_after_of(r: httpx.Response) -> float | None:
    """The response's ``Retry-After`` in seconds (None when absent or unparseable)."""
    return parse_retry_after(r.headers.get("retry-after"))
