"""Replay of real driving: the CMAP 1 Hz recordings served by the emulator and ingested by the client."""

from __future__ import annotations

from datetime import timedelta

import pandas as pd
import pyarrow.compute as pc
import pytest

from connectors.dimo.emulator.fleet import bundled_cmap_dir
from connectors.dimo.emulator.replay import cmap_replay_rows
from connectors.dimo.emulator.server import EmulatorProcess
from connectors.dimo.emulator.state import EmulatorConfig
from connectors.dimo.store import TelemetryStore
from tests.support.emulator_ingest import FIXED_END, run

pytestmark = pytest.mark.e2e
CMAP = bundled_cmap_dir()
MPH = 1.609344


def csv_truth() -> tuple[float, float]:
    """Total distance (km, 1 Hz integration over logged seconds) and top speed (km/h), straight from the CSVs."""
    km, top = 0.0, 0.0
    for f in sorted(CMAP.glob("*.csv")):
        df = pd.read_csv(f)
        kmh = df["speed_mph"] * MPH
        km += float(kmh[df["timestep"] == 1].sum()) / 3600
        top = max(top, float(kmh.max()))
    return km, top


async def test_real_recordings_replay_through_the_client(tmp_path) -> None:
    path = tmp_path / "cmap.parquet"
    cmap_replay_rows(CMAP, end=FIXED_END, seed=0).write_parquet(path)
    with EmulatorProcess(EmulatorConfig(replay=path)) as emu:
        report = await run(
            emu,
            tmp_path / "ds",
            FIXED_END - timedelta(days=2),
            FIXED_END,
            signals=[
                "speed",
                "powertrainTransmissionTravelledDistance",
                "powertrainTractionBatteryStateOfChargeCurrent",
            ],
        )
    assert report.vehicles == len(list(CMAP.glob("*.csv"))) and report.skipped == []
    table = TelemetryStore(tmp_path / "ds").read()
    expected_km, top_kmh = csv_truth()
    driven = 0.0
    for tid in pc.unique(table.column("token_id")).to_pylist():
        odo = table.filter(pc.equal(table.column("token_id"), tid)).column(
            "powertrainTransmissionTravelledDistance"
        )
        driven += pc.max(odo).as_py() - pc.min(odo).as_py()
    print(f"replayed {driven:.2f} km vs {expected_km:.2f} km in the CSVs")
    assert driven == pytest.approx(expected_km, rel=0.05)
    fastest_minute = pc.max(table.column("speed")).as_py()
    assert 0.5 * top_kmh < fastest_minute <= top_kmh + 1e-6  # a 1-minute average never exceeds the top speed
    soc = table.column("powertrainTractionBatteryStateOfChargeCurrent")
    assert soc.null_count < table.num_rows and 0 <= pc.min(soc).as_py() <= pc.max(soc).as_py() <= 100
