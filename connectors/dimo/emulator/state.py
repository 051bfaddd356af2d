"""Configuration and in-memory state of one emulator instance."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from eth_account import Account
from pydantic import BaseModel, Field, field_validator

from connectors.dimo.emulator.faults import FaultSpec
from connectors.dimo.emulator.fleet import DeveloperLicense, Fleet
from connectors.dimo.emulator.keys import SigningKey
from connectors.dimo.emulator.ratelimit import RateLimitKey

DEFAULT_DOMAIN = "http://localhost:8765/callback"


class EmulatorConfig(BaseModel):
    """Everything ``depin emulator`` accepts; JSON-serializable so a parent process can pass it on."""

    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    vehicles: int = Field(20, ge=0, le=13_824, description="simulated vehicles (24³ three-word names)")
    days: float = Field(7.0, gt=0, le=3650)
    seed: int = 0
    replay: Path | None = None
    cmap_dir: Path | None = Field(
        None, description="import CMAP 1 Hz speed traces from this folder as vehicles"
    )
    faults: str = ""
    credentials_out: Path | None = None
    ground_truth_out: Path | None = None
    end: datetime | None = Field(None, description="end of the simulated history; default: start-up time")
    dev_jwt_ttl_s: int = Field(14 * 86400, gt=0)
    vehicle_jwt_ttl_s: int = Field(600, gt=0)
    restricted_fraction: float = Field(
        0.0, ge=0, le=1, description="share of vehicles not shared with the license"
    )
    idle_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of vehicles whose device went offline early in the history (one never reported)",
    )
    rate_limit_per_s: float = Field(
        0.0,
        ge=0,
        description="per service and client host: more than this many requests/s get 429 + Retry-After "
        "(DIMO documents 10); 0 = no limit",
    )
    rate_limit_per: RateLimitKey = Field(
        "client-host",
        description="whose requests share a bucket: each client host's (DIMO's documentation) or the "
        "license's, all clients together (the emulator has one license)",
    )
    exchange_legacy_only: bool = Field(
        False,
        description="token exchange ignores asset/permissions like an older token-exchange-api",
    )
    history_cache_mb: float = Field(
        96.0,
        gt=0,
        description="simulated rows kept in memory (MB, least recently used dropped); rows are generated on demand",
    )
    log_level: str = "warning"

    @field_validator("faults")
    @classmethod
    def _faults_parse(cls, v: str) -> str:
        FaultSpec.parse(v)  # raises ConfigError naming the bad part before any fleet is built
        return v


def make_license(seed: int, domain: str = DEFAULT_DOMAIN) -> DeveloperLicense:
    """A deterministic developer license (contract address + one signer key) derived from ``seed``."""
    digest = hashlib.sha256(f"depin-emulator-license-{seed}".encode()).digest()
    signer = Account.from_key(hashlib.sha256(digest + b"signer").digest())
    client_id = Account.from_key(hashlib.sha256(digest + b"contract").digest()).address
    return DeveloperLicense(
        client_id=client_id,
        domain=domain,
        signers=(signer.address,),
        private_key="0x" + signer.key.hex().removeprefix("0x"),
    )


@dataclass
class Challenge:
    client_id: str
    domain: str
    address: str
    text: str
    issued_at: float


@dataclass
class EmulatorState:
    fleet: Fleet
    public_url: str
    dev_key: SigningKey = field(default_factory=lambda: SigningKey.generate("dex-1"))
    vehicle_key: SigningKey = field(default_factory=lambda: SigningKey.generate("rr-1"))
    dev_jwt_ttl: timedelta = timedelta(days=14)
    vehicle_jwt_ttl: timedelta = timedelta(minutes=10)
    faults: FaultSpec = field(default_factory=FaultSpec)
    exchange_legacy_only: bool = False
    rate_limit_per_s: float = 0.0
    rate_limit_per: RateLimitKey = "client-host"
    rate_limit_clock: Callable[[], float] = time.monotonic  # tests swap in a virtual clock
    challenges: dict[str, Challenge] = field(default_factory=dict)
    clock: Callable[[], float] = time.time

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    @property
    def license(self) -> DeveloperLicense:
        return self.fleet.license
