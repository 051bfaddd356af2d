"""The emulator's Auth and Identity routes under test: a hand-built fleet with known owners, grants and expiries,
and the ``Server`` handle the fixtures in ``tests/connectors/dimo/emulator/conftest.py`` yield."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import polars as pl

from connectors.dimo.emulator.fleet import SOURCES, Fleet, Grant, Vehicle
from connectors.dimo.emulator.state import EmulatorState, make_license

OWNER = "0x1111111111111111111111111111111111111111"
STRANGER = "0x2222222222222222222222222222222222222222"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def make_fleet(n: int = 4, seed: int = 3) -> Fleet:
    """``n`` vehicles with token ids 10, 20, ...: every third is not shared with the license, id 20's grant
    has expired, the others hold privileges [1, 3, 4] (id 10 also 8); id 30 is owned by STRANGER."""
    lic = make_license(seed)
    far, past = datetime(2099, 1, 1, tzinfo=UTC), datetime(2020, 1, 1, tzinfo=UTC)
    vehicles: dict[int, Vehicle] = {}
    empty = pl.DataFrame({"ts": pl.Series([], dtype=pl.Datetime("us", "UTC"))})
    for i in range(1, n + 1):
        tid = 10 * i
        grants = []
        if i % 3:
            perms = (1, 3, 4, 8) if i == 1 else (1, 3, 4)
            grants.append(Grant(lic.client_id, perms, T0, past if i == 2 else far))
        vehicles[tid] = Vehicle(
            token_id=tid,
            owner=STRANGER if i == 3 else OWNER,
            make="Tesla" if i % 2 else "Ford",
            model="Model 3" if i % 2 else "F-150",
            year=2020 + i % 4,
            powertrain="ELECTRIC" if i % 2 else "COMBUSTION",
            minted_at=T0 + timedelta(days=i),
            name=f"word{i} alpha beta",
            source=SOURCES["autopi"] if i % 2 else SOURCES["smartcar"],
            grants=grants,
            manufacturer_token_id=137 if i % 2 else 42,
            aftermarket_device_id=1000 + i if i % 2 else None,
            synthetic_device_id=None if i % 2 else 2000 + i,
        )
    return Fleet(
        license=lic,
        vehicles=vehicles,
        series={t: empty for t in vehicles},
        events={},
        start=T0,
        end=T0 + timedelta(days=2),
    )


@dataclass
class Server:
    state: EmulatorState
    url: str
    clock: list[float]  # state.clock() returns clock[0]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10)
