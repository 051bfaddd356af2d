"""The emulator's data model: a developer license, vehicles with SACD grants, and their recorded series.

This is the contract between the fleet builders (``sim.simulator``, ``replay``) and the API handlers
(``auth``, ``identity``, ``telemetry``). Everything here is plain data; nothing talks HTTP.

Simulated fleets generate rows on demand: ``Fleet.history`` answers windows of a vehicle's rows, and
``series``/``events`` are read-only mappings that build a vehicle's whole frame when accessed (for tools and
tests; the server only asks for windows). Replayed fleets hold plain dicts of frames.

Series layout (one polars DataFrame per vehicle, sorted by ``ts``):
- ``ts``: Datetime("us", "UTC"), strictly increasing;
- one column per DIMO signal the vehicle reports, named exactly as the signal: Float64 for Float
  signals, Utf8 for String signals; null where the signal was not sampled at that instant;
- ``latitude``, ``longitude`` (Float64) backing ``currentLocationCoordinates`` (``hdop`` optional).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

import numpy as np
import polars as pl

from connectors.dimo.settings import VEHICLE_NFT_PROD

# Data sources as ethr DIDs (telemetry-api >= 2026-03 accepts only DIDs in SignalFilter.source).
SOURCES = {
    "autopi": "did:ethr:137:0x5e31bBc786D7bEd95216383787deA1ab0f1c1897",
    "macaron": "did:ethr:137:0x4c674ddE8189aEF6e3b58F5a36d7438b2b1f6Bc2",
    "smartcar": "did:ethr:137:0xcd445F4c6bDAD32b68a2939b912150Fe3C88803E",
    "tesla": "did:ethr:137:0xc4035Fecb1cc906130423EF05f9C20977F643722",
}

CHAIN_ID = 137


def vehicle_did(token_id: int) -> str:
    return f"did:erc721:{CHAIN_ID}:{VEHICLE_NFT_PROD}:{token_id}"


@dataclass(frozen=True)
class DeveloperLicense:
    """A developer license: ``client_id`` is the license contract address; signers may sign challenges."""

    client_id: str
    domain: str
    signers: tuple[str, ...]
    private_key: str = field(repr=False)  # hex key of signers[0]; handed out only via --credentials-out
    token_id: int = 1
    alias: str = "depin-emulator"


@dataclass(frozen=True)
class Grant:
    """An SACD grant of privilege ids on one vehicle to ``grantee`` (an address)."""

    grantee: str
    permissions: tuple[int, ...]
    created_at: datetime
    expires_at: datetime
    source: str = "ipfs://emulator"


@dataclass
class Vehicle:
    token_id: int
    owner: str
    make: str
    model: str
    year: int
    powertrain: str  # "ELECTRIC" | "COMBUSTION"
    minted_at: datetime
    name: str  # three-word mnemonic
    source: str  # ethr DID of the connection that reports its data
    grants: list[Grant] = field(default_factory=list)
    definition_id: str = ""
    manufacturer_token_id: int = 0
    aftermarket_device_id: int | None = None
    synthetic_device_id: int | None = None

    def privileges_for(self, grantee: str, at: datetime) -> set[int]:
        """Privilege ids held by ``grantee`` at time ``at`` (owners hold all; addresses compared case-insensitively)."""
        g = grantee.lower()
        if self.owner.lower() == g:
            return set(range(1, 9))
        out: set[int] = set()
        for grant in self.grants:
            if grant.grantee.lower() == g and grant.expires_at > at:
                out.update(grant.permissions)
        return out


class History(Protocol):
    """Rows generated on demand for some vehicles (``sim.history.SimulatedHistory``); times in µs."""

    def __contains__(self, token_id: object) -> bool: ...

    def columns(self, token_id: int) -> list[str]: ...

    def rows(self, token_id: int, from_us: int, to_us: int) -> tuple[pl.DataFrame, np.ndarray]: ...

    def events(self, token_id: int, from_us: int, to_us: int) -> pl.DataFrame: ...

    def iter_chunks(self, token_id: int) -> Iterator[Chunk]: ...


class Chunk(Protocol):
    """A consecutive part of a vehicle's history: rows, their timestamps (µs) and events."""

    @property
    def series(self) -> pl.DataFrame: ...

    @property
    def ts_us(self) -> np.ndarray: ...

    @property
    def events(self) -> pl.DataFrame: ...


@dataclass
class Fleet:
    """Everything the emulator serves."""

    license: DeveloperLicense
    vehicles: dict[int, Vehicle]
    series: Mapping[int, pl.DataFrame]
    events: Mapping[int, pl.DataFrame]  # columns: ts, name, source, duration_ns (Int64), metadata (Utf8 JSON)
    start: datetime
    end: datetime
    # Ground truth a model can learn and a test can check (simulated fleets; empty for pure replays).
    truth_vehicles: pl.DataFrame = field(default_factory=pl.DataFrame)
    truth_faults: pl.DataFrame = field(default_factory=pl.DataFrame)
    # Vehicles whose rows are generated on demand; the server reads their windows from here.
    history: History | None = None

    def token_ids_desc(self) -> list[int]:
        return sorted(self.vehicles, reverse=True)


def bundled_cmap_dir() -> Path:
    """The real CMAP recordings shipped with the package (Apache-2.0, see recordings/cmap/SOURCES.md)."""
    return Path(__file__).resolve().parent / "recordings" / "cmap"
