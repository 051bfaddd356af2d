"""Fixtures that run real emulator processes on loopback (free ports; always stopped)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest

from connectors.dimo.emulator.server import EmulatorProcess
from tests.support.emulator_ingest import FIXED_END, fleet_config


@pytest.fixture(scope="session")
def emulator() -> Iterator[EmulatorProcess]:
    with EmulatorProcess(fleet_config()) as emu:
        yield emu


@pytest.fixture(scope="session")
def window() -> tuple[datetime, datetime]:
    """Six hours of the fixed history, ending an hour before its end."""
    until = FIXED_END - timedelta(hours=1)
    return until - timedelta(hours=6), until
