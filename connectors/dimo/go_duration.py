"""Go ``time.ParseDuration`` / ``Duration.String`` semantics, used for the telemetry ``interval`` argument."""

from __future__ import annotations

import re
from datetime import timedelta

from depin_core.errors import ConfigError

_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "μs": 1_000,
    "ms": 1_000_000,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}


class GoDurationError(ValueError):
    """Raised with Go's own error text, e.g. ``time: unknown unit "d" in duration "1d"``."""


def parse_go_duration_ns(text: str) -> int:
    """Parse like Go's ``time.ParseDuration``; returns nanoseconds (may be negative or zero)."""
    orig = text
    s = text
    neg = False
    if s[:1] in ("+", "-"):
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise GoDurationError(f'time: invalid duration "{orig}"')
    total = 0.0
    while s:
        m = re.match(r"(\d*)(\.\d*)?", s)
        assert m is not None
        whole, frac = m.group(1), m.group(2) or ""
        if not whole and len(frac) <= 1:
            raise GoDurationError(f'time: invalid duration "{orig}"')
        s = s[m.end() :]
        u = re.match(r"[^\d.]*", s)
        assert u is not None
        unit = u.group(0)
        s = s[u.end() :]
        if not unit:
            raise GoDurationError(f'time: missing unit in duration "{orig}"')
        if unit not in _UNITS_NS:
            raise GoDurationError(f'time: unknown unit "{unit}" in duration "{orig}"')
        total += float((whole or "0") + (frac if len(frac) > 1 else "")) * _UNITS_NS[unit]
    ns = round(total)
    return -ns if neg else ns


def parse_go_duration(text: str) -> timedelta:
    """Parse a Go duration string into a timedelta (microsecond resolution)."""
    return timedelta(microseconds=parse_go_duration_ns(text) / 1000)


def parse_interval(text: str) -> timedelta:
    """A positive Go duration (``1m``, ``30s``, ``1h``), as DIMO's ``interval`` argument takes."""
    try:
        delta = parse_go_duration(text)
    except GoDurationError as exc:
        raise ConfigError(
            f"interval: {exc}; use a Go duration such as 30s, 1m, 15m, 1h (not 1d: use 24h)"
        ) from None
    if delta <= timedelta(0):
        raise ConfigError(f"interval: {text!r} must be positive")
    return delta


def format_go_duration(delta: timedelta) -> str:
    """Format a timedelta as the shortest Go duration string the server accepts, e.g. ``1h30m``, ``60s``."""
    us = round(delta.total_seconds() * 1_000_000)
    if us <= 0:
        raise ValueError("interval must be positive")
    parts = []
    for unit, size in (("h", 3_600_000_000), ("m", 60_000_000), ("s", 1_000_000), ("ms", 1_000), ("us", 1)):
        q, us = divmod(us, size)
        if q:
            parts.append(f"{q}{unit}")
    return "".join(parts)
