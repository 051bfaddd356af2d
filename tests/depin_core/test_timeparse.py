from datetime import UTC, datetime, timedelta

import pytest

from depin_core.errors import ConfigError, PermanentError
from depin_core.timeparse import parse_duration, parse_instant, to_rfc3339

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", timedelta(days=7)),
        ("36h", timedelta(hours=36)),
        ("1h30m", timedelta(minutes=90)),
        ("90s", timedelta(seconds=90)),
        ("2w", timedelta(days=14)),
        ("1.5h", timedelta(minutes=90)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "7", "d", "7x", "0d", "7d foo", "-1d"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="duration"):
        parse_duration(text)


def test_parse_instant_relative_iso_and_now() -> None:
    assert parse_instant("3d", now=NOW) == NOW - timedelta(days=3)
    assert parse_instant("now", now=NOW) == NOW
    assert parse_instant("2026-11-20T00:00:00Z") == datetime(2026, 11, 20, tzinfo=UTC)
    assert parse_instant("2026-11-20T02:00:00+02:00") == datetime(2026, 11, 20, tzinfo=UTC)
    assert parse_instant("2026-11-20") == datetime(2026, 11, 20, tzinfo=UTC)  # naive means UTC


def test_parse_instant_error_names_field() -> None:
    with pytest.raises(ConfigError, match="since: 'yesterday'") as info:
        parse_instant("yesterday", field="since")
    assert isinstance(info.value, PermanentError)


def test_rfc3339() -> None:
    assert to_rfc3339(datetime(2024, 6, 28, tzinfo=UTC)) == "2024-06-28T00:00:00Z"
    assert to_rfc3339(datetime(2024, 6, 28, 0, 0, 0, 500, tzinfo=UTC)) == "2024-06-28T00:00:00.000500Z"
