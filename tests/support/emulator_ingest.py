"""Ingestion against emulator processes: the fixed fleet the e2e tests share and one ``run`` of the real
client into the Parquet store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from connectors.dimo.client import DimoClient
from connectors.dimo.emulator.server import EmulatorProcess
from connectors.dimo.emulator.state import EmulatorConfig
from connectors.dimo.ingest import ingest
from connectors.dimo.settings import DimoSettings
from connectors.dimo.store import TelemetryStore

# A fixed end of history, so two emulators (with and without faults) serve identical data.
FIXED_END = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)


def fleet_config(**overrides: object) -> EmulatorConfig:
    base = {"vehicles": 6, "days": 2.0, "seed": 11, "end": FIXED_END}
    base.update(overrides)
    return EmulatorConfig(**base)  # type: ignore[arg-type]


SIGNALS = [
    "speed",
    "powertrainTransmissionTravelledDistance",
    "exteriorAirTemperature",
    "lowVoltageBatteryCurrentVoltage",
    "currentLocationCoordinates",
]
MINUTE = timedelta(minutes=1)


def settings_for(emu: EmulatorProcess, **overrides: object) -> DimoSettings:
    return DimoSettings.from_credentials_file(emu.credentials_path).model_copy(update=overrides)


async def run(emu: EmulatorProcess, out: Path, since, until, signals=SIGNALS, **overrides):  # type: ignore[no-untyped-def]
    async with DimoClient(settings_for(emu, rate_limit_per_s=0, **overrides)) as client:
        return await ingest(
            client, TelemetryStore(out), since=since, until=until, interval=MINUTE, signals=signals
        )
