"""Fixtures of the model tests: one REAL fleet dataset per session (emulator → client → ingest → store), one
torch thread per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.support.fleet_data import FleetData, build_fleet_data

# The evaluation size (≥ 30 vehicles, ≥ 7 days, 20 s buckets): ~8 s to build. A second seed checks
# that the quality bars are not a property of one lucky fleet.
FLEET = {"vehicles": 30, "days": 7.0, "seed": 7}
FLEET_B = {**FLEET, "seed": 11}


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> FleetData:
    return build_fleet_data(tmp_path_factory.mktemp("fleet"), **FLEET)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def fleet_b(tmp_path_factory: pytest.TempPathFactory) -> FleetData:
    return build_fleet_data(tmp_path_factory.mktemp("fleet_b"), **FLEET_B)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
