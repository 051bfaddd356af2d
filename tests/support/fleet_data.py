"""Build a REAL telemetry dataset once: emulator process → DimoClient → ingest → TelemetryStore.

Used by the model tests (session fixture) and runnable as a script for the quality-bar numbers:
``python -m tests.support.fleet_data OUT --vehicles 30 --days 7 [--cmap] [--interval-s 20]``.
The range model needs short buckets: 1-minute averages hide the stop-and-go inside each minute.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from connectors.dimo.client import DimoClient
from connectors.dimo.emulator.fleet import bundled_cmap_dir
from connectors.dimo.emulator.server import EmulatorProcess
from connectors.dimo.emulator.state import EmulatorConfig
from connectors.dimo.ingest import ingest
from connectors.dimo.settings import DimoSettings
from connectors.dimo.store import TelemetryStore

SIGNALS = [
    "speed",
    "powertrainTransmissionTravelledDistance",
    "isIgnitionOn",
    "exteriorAirTemperature",
    "lowVoltageBatteryCurrentVoltage",
    "chassisAxleRow1WheelLeftTirePressure",
    "chassisAxleRow1WheelRightTirePressure",
    "chassisAxleRow2WheelLeftTirePressure",
    "chassisAxleRow2WheelRightTirePressure",
    "powertrainType",
    "powertrainTractionBatteryStateOfChargeCurrent",
    "powertrainTractionBatteryGrossCapacity",
    "powertrainTractionBatteryStateOfHealth",
    "powertrainTractionBatteryCurrentPower",
    "powertrainTractionBatteryTemperatureAverage",
    "powertrainTractionBatteryChargingIsCharging",
    "powertrainCombustionEngineSpeed",
    "obdEngineLoad",
    "powertrainFuelSystemRelativeLevel",
    "powertrainCombustionEngineECT",
]


FIXED_END = datetime(2026, 11, 25, tzinfo=UTC)


def default_end() -> datetime:
    """A fixed end of history, so the fleets (and the quality numbers) are the same on every day and machine.
    The emulator anchors grant expiry on today for past histories, so the vehicles stay shared."""
    return FIXED_END


@dataclass(frozen=True)
class FleetData:
    telemetry: Path  # TelemetryStore root (a Delta table)
    truth: Path  # vehicles.parquet + faults.parquet


async def _ingest(
    emu: EmulatorProcess,
    out: Path,
    since: datetime,
    until: datetime,
    interval: timedelta,
    signals: list[str] = SIGNALS,
) -> None:
    settings = DimoSettings.from_credentials_file(emu.credentials_path).model_copy(
        update={"rate_limit_per_s": 0}
    )
    async with DimoClient(settings) as client:
        await ingest(
            client,
            TelemetryStore(out),
            since=since,
            until=until,
            interval=interval,
            signals=signals,
        )


def build_fleet_data(
    root: Path,
    *,
    vehicles: int,
    days: float,
    seed: int,
    cmap: bool = False,
    end: datetime | None = None,
    interval: timedelta = timedelta(seconds=20),
    signals: list[str] = SIGNALS,
) -> FleetData:
    """Simulate, serve and ingest ``vehicles`` × ``days`` (plus the CMAP vehicles) under ``root``; ``signals``
    (default :data:`SIGNALS`; add ``currentLocationCoordinates`` for tracks)."""
    end = end or default_end()
    data = FleetData(root / "telemetry", root / "truth")
    config = EmulatorConfig(
        vehicles=vehicles,
        days=days,
        seed=seed,
        end=end,
        ground_truth_out=data.truth,
        cmap_dir=bundled_cmap_dir() if cmap else None,
    )
    with EmulatorProcess(config) as emu:
        asyncio.run(_ingest(emu, data.telemetry, end - timedelta(days=days), end, interval, signals))
    return data


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--vehicles", type=int, default=30)
    ap.add_argument("--days", type=float, default=7.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--cmap", action="store_true")
    ap.add_argument("--interval-s", type=float, default=20.0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    d = build_fleet_data(
        a.out,
        vehicles=a.vehicles,
        days=a.days,
        seed=a.seed,
        cmap=a.cmap,
        interval=timedelta(seconds=a.interval_s),
    )
    print(d, f"{time.perf_counter() - t0:.1f}s")
