"""DimoClient against the real emulator handlers: in-process with a small hand-built fleet, and (when the
simulator exists) as a child process via ``EmulatorProcess`` with fault injection."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow.compute as pc
import pytest

from connectors.dimo.client import DimoClient
from connectors.dimo.emulator.app import create_app
from connectors.dimo.emulator.server import credentials_document
from connectors.dimo.emulator.state import EmulatorState
from connectors.dimo.schema import telemetry_schema
from connectors.dimo.settings import DimoSettings
from tests.support.dimo_loopback import LoopbackServer
from tests.support.handbuilt_fleet import END, SIGNALS, START, handbuilt_fleet


@pytest.fixture(scope="module")
def emulator():
    fleet = handbuilt_fleet()
    with LoopbackServer(create_app(EmulatorState(fleet=fleet, public_url="http://127.0.0.1"))) as server:
        url = server.url
        yield DimoSettings(**credentials_document(fleet, url), max_values_per_request=2_000)


async def test_discover_and_fetch_fleet_against_emulator_handlers(emulator, caplog):
    caplog.set_level(logging.WARNING, logger="connectors.dimo")
    async with DimoClient(emulator) as client:
        vehicles = await client.discover_vehicles()
        assert {v.token_id: v.privileges for v in vehicles} == {11: {1, 4}, 12: {1}}
        assert "speed" in await client.available_signals(11)
        out = {
            h.vehicle.token_id: h
            async for h in client.fetch_fleet(
                vehicles, since=START, until=END, interval=timedelta(minutes=1), signals=SIGNALS
            )
        }
    schema = telemetry_schema(SIGNALS, interval="1m")
    full = out[11].table
    assert full.schema.equals(schema, check_metadata=True)
    assert full.num_rows == 1440 and out[11].requests > 1  # windows of 2000 values / 5 columns
    ts = full.column("timestamp").to_numpy()
    assert (np.diff(ts) == np.timedelta64(60, "s")).all() and full.column("timestamp")[0].as_py() == START
    # Each minute holds samples k=2m and 2m+1: speed AVG, odometer LAST.
    assert full.column("speed")[0].as_py() == pytest.approx(0.5)
    assert full.column("powertrainTransmissionTravelledDistance")[0].as_py() == pytest.approx(1000.1)
    assert full.column("latitude").null_count == 0 and full.column("powertrainType")[5].as_py() == "ELECTRIC"
    assert out[12].table.column("latitude").null_count == out[12].table.num_rows
    assert pc.min(out[12].table.column("speed")).as_py() == pytest.approx(0.5)
    assert "vehicle 12" in caplog.text and "GetLocationHistory" in caplog.text


async def test_fetch_all_available_signals(emulator):
    async with DimoClient(emulator) as client:
        vehicles = {v.token_id: v for v in await client.discover_vehicles()}
        table = await client.fetch_history(
            vehicles[11],
            since=START + timedelta(hours=1),
            until=START + timedelta(hours=3),
            interval=timedelta(minutes=5),
        )
    assert table.num_rows == 24
    assert {"speed", "latitude", "longitude", "powertrainType"} <= set(table.column_names)


def test_emulator_process_with_faults():
    import asyncio

    from connectors.dimo.emulator.server import EmulatorProcess
    from connectors.dimo.emulator.state import EmulatorConfig

    async def run(settings: DimoSettings) -> tuple[int, int, int]:
        async with DimoClient(settings) as client:
            vehicles = await client.discover_vehicles()
            rows = 0
            async for hist in client.fetch_fleet(
                vehicles,
                since=datetime.now(UTC) - timedelta(days=1),
                until=datetime.now(UTC),
                interval=timedelta(minutes=10),
                signals=["speed", "currentLocationCoordinates"],
            ):
                rows += hist.table.num_rows
            return len(vehicles), rows, client.stats.retries

    with EmulatorProcess(
        EmulatorConfig(port=0, vehicles=4, days=2, faults="all=0.2,retry_after=0,seed=3")
    ) as emu:
        settings = DimoSettings.from_credentials_file(
            emu.credentials_path, backoff_base_s=0.01, backoff_max_s=0.05
        )
        n, rows, retries = asyncio.run(run(settings))
    assert n >= 1 and rows > 0 and retries > 0
