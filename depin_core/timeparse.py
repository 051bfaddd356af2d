"""Parse user-facing times: ISO-8601 instants and relative durations such as ``7d`` or ``90m``."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from depin_core.errors import ConfigError

_REL = re.compile(r"(\d+(?:\.\d+)?)(w|d|h|m|s)")
_UNIT_SECONDS = {"w": 604800.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str, *, field: str = "duration") -> timedelta:
    """Parse ``7d``, ``36h``, ``1h30m``, ``90s``, ``2w`` into a timedelta (positive, non-zero)."""
    s = text.strip().lower()
    pos, total = 0, 0.0
    for m in _REL.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if not s or pos != len(s) or total <= 0:
        raise ConfigError(
            f"{field}: {text!r} is not a duration; use a number with a unit w/d/h/m/s, e.g. '7d', '36h', '1h30m'"
        )
    return timedelta(seconds=total)


def parse_instant(text: str | datetime, *, field: str = "time", now: datetime | None = None) -> datetime:
    """Parse an ISO-8601 time (naive means UTC) or a relative duration meaning ``now - duration``.

    ``now`` (for the relative form) defaults to the current UTC time. Returns an aware UTC datetime.
    """
    if isinstance(text, datetime):
        return text if text.tzinfo else text.replace(tzinfo=UTC)
    s = text.strip()
    if s.lower() == "now":
        return (now or datetime.now(UTC)).astimezone(UTC)
    try:
        return (now or datetime.now(UTC)).astimezone(UTC) - parse_duration(s, field=field)
    except ConfigError:
        pass
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"{field}: {text!r} is neither an ISO-8601 time (2026-11-20T00:00:00Z) nor a relative duration (7d, 12h)"
        ) from None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def to_rfc3339(dt: datetime) -> str:
    """Format an aware datetime the way DIMO's GraphQL ``Time`` scalar does: ``2024-06-28T00:00:00Z``."""
    dt = dt.astimezone(UTC)
    if dt.microsecond:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")
