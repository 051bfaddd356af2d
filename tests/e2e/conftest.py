"""Fixtures that run real emulator processes on loopback (free ports; always stopped)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from connectors.dimo.emulator.server import EmulatorProcess
from connectors.dimo.emulator.state import EmulatorConfig

# A fixed end of history, so two emulators (with and without faults) serve identical data.
FIXED_END = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)


def fleet_config(**overrides: object) -> EmulatorConfig:
    base = {"vehicles": 6, "days": 2.0, "seed": 11, "end": FIXED_END}
    base.update(overrides)
    return EmulatorConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def emulator() -> Iterator[EmulatorProcess]:
    with EmulatorProcess(fleet_config()) as emu:
        yield emu


@pytest.fixture(scope="session")
def window() -> tuple[datetime, datetime]:
    """Six hours of the fixed history, ending an hour before its end."""
    until = FIXED_END - timedelta(hours=1)
    return until - timedelta(hours=6), until
