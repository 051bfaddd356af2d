"""Pieces the HTTP clients share (gateway, Fluence, providers, worker agent): the retry policy's parts."""

from __future__ import annotations

import random

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


def retry_after_of(r: httpx.Response) -> float | None:
    """The response's ``Retry-After`` in seconds (None when absent or not a number)."""
    raw = r.headers.get("retry-after")
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None


def backoff_delay(attempt: int, retry_after: float | None, *, base_s: float, cap_s: float) -> float:
    """``retry_after`` or ``base_s × 2^attempt``, at most ``cap_s``, jittered ±20 %."""
    base = retry_after if retry_after is not None else base_s * 2**attempt
    return min(cap_s, base) * random.uniform(0.8, 1.2)
