"""Flow tests. ``prefect_backend``: the one Prefect test server of the session (``tests.support.prefect_harness``, with
Prefect's fast test settings), requested only by the tests that run flows, so the plain-function tests here
never pay its start. Also: a small emulator fleet, and a fresh working directory per test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.dimo.emulator.server import EmulatorProcess
from connectors.dimo.emulator.state import EmulatorConfig
from tests.support.flow_fleet import FLEET, FLEET_END
from tests.support.prefect_harness import prefect_session


@pytest.fixture(scope="session")
def prefect_backend() -> Iterator[None]:
    """The Prefect test server (one per session, shared with tests/e2e/test_train_and_publish.py)."""
    with prefect_session():
        yield


@pytest.fixture(scope="session")
def fleet_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    """A DIMO emulator process with the small fixed fleet (ground truth written beside it)."""
    truth = tmp_path_factory.mktemp("fleet-truth")
    with EmulatorProcess(EmulatorConfig(**FLEET, end=FLEET_END, ground_truth_out=truth)) as emu:  # type: ignore[arg-type]
        yield emu


_DEPIN_PREFIXES = ("DEPIN_GATEWAY_", "DEPIN_PUBLISHER_", "DEPIN_DIMO_", "DEPIN_SCHEDULE_")


def _isolate(mp: pytest.MonkeyPatch, where: Path) -> None:
    """Work in ``where``: the flows' relative defaults (.depin/…: publisher key, registry, models) land
    there, and no gateway, publisher, DIMO or schedule setting of the developer leaks in."""
    mp.chdir(where)
    for var in list(os.environ):
        if var.startswith(_DEPIN_PREFIXES):
            mp.delenv(var)
    mp.delenv("DEPIN_ADMIN_KEY", raising=False)


@pytest.fixture(scope="session", autouse=True)
def _session_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Session fixtures (set up before any function-scoped one) run in a session temp directory."""
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, tmp_path_factory.mktemp("flow-session"))
        yield


@pytest.fixture(autouse=True)
def _project_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own directory (see ``_isolate``)."""
    _isolate(monkeypatch, tmp_path)
