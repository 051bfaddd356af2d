"""Discovery and fleet fetches through DimoClient against the loopback fake (privileges, planning, faults)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import pyarrow as pa
import pytest

from connectors.dimo._identity import _page as _identity_page
from connectors.dimo.client import DimoClient, TelemetrySource, VehicleHistory, VehicleInfo
from connectors.dimo.errors import DimoTransientError
from connectors.dimo.schema import telemetry_schema
from depin_core.errors import ConfigError
from tests.support.dimo_loopback import (
    CLIENT_ID,
    FakeState,
    LoopbackServer,
    create_app,
    settings_for,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
MIN = timedelta(minutes=1)
SIGNALS = ["speed", "powertrainType", "currentLocationCoordinates"]


@pytest.fixture
def fake():
    state = FakeState()
    with LoopbackServer(create_app(state)) as server:
        yield state, server.url


async def _collect(client: DimoClient, vehicles, **kw) -> dict[int, VehicleHistory]:
    """Histories of the vehicles that were not skipped."""
    return {h.vehicle.token_id: h async for h in client.fetch_fleet(vehicles, **kw) if not h.skipped_reason}


@pytest.mark.parametrize("sacd", [True, False])
async def test_discovery_pages_and_decodes_privileges(fake, sacd):
    state, url = fake
    state.page_size = 2
    state.sacd_supported = sacd
    async with DimoClient(settings_for(url)) as client:
        assert isinstance(client, TelemetrySource)
        vehicles = await client.discover_vehicles()
    assert [v.token_id for v in vehicles] == [3, 2, 1]
    assert [v.privileges for v in vehicles] == [frozenset({1, 4}), frozenset({1}), frozenset({4})]
    assert vehicles[0].make == "Tesla" and vehicles[0].year == 2022
    assert state.hits["/identity/query"] == (2 if sacd else 3)


async def test_fleet_fetch_schema_privileges_and_logging(fake, caplog):
    state, url = fake
    state.vehicles[9] = set()
    caplog.set_level(logging.INFO, logger="connectors.dimo")
    until = T0 + timedelta(hours=2)
    async with DimoClient(settings_for(url, max_values_per_request=100)) as client:
        vehicles = await client.discover_vehicles()
        every = [
            h
            async for h in client.fetch_fleet(vehicles, since=T0, until=until, interval=MIN, signals=SIGNALS)
        ]
    out = {h.vehicle.token_id: h for h in every if not h.skipped_reason}
    skipped = [h for h in every if h.skipped_reason]
    assert [h.vehicle.token_id for h in skipped] == [9] and "GetNonLocationHistory" in str(
        skipped[0].skipped_reason
    )
    assert skipped[0].table.num_rows == 0 and skipped[0].requests == 0
    schema = telemetry_schema(SIGNALS, interval="1m")
    assert set(out) == {3, 2, 1}  # 9 is skipped: nothing shared
    for hist in out.values():
        assert hist.table.schema.equals(schema, check_metadata=True)
    full = out[3].table
    # 120 buckets, every 5th has no data → 96 rows; 100 values/request over 4 value columns → 25-bucket windows.
    assert full.num_rows == 96 and out[3].requests == 5
    assert full.column("timestamp").to_pylist()[:4] == [T0, T0 + MIN, T0 + 2 * MIN, T0 + 3 * MIN]
    assert pa.compute.all(pa.compute.equal(full.column("token_id"), 3)).as_py()
    assert full.column("powertrainType").null_count == 0 and full.column("speed").null_count > 0
    assert full.column("latitude").null_count < 96
    assert out[2].table.column("latitude").null_count == out[2].table.num_rows  # location dropped
    assert out[1].table.column("speed").null_count == out[1].table.num_rows  # only location shared
    assert "vehicle 2: license" in caplog.text and "lacks privilege:GetLocationHistory" in caplog.text
    assert "vehicle 9: license" in caplog.text and "skipping the vehicle" in caplog.text
    assert client.stats.vehicles_skipped == 1
    tables = pa.concat_tables([h.table for h in out.values()])
    assert tables.num_rows == sum(h.table.num_rows for h in out.values())


async def test_complexity_and_timeouts_are_halved_and_faults_retried(fake):
    state, url = fake
    state.complexity_limit = 5  # timestamp + 3 signals max → chunks get halved
    state.max_buckets = 30  # longer windows "exceed the maximum execution time"
    state.scripts["/telemetry/query"].extend([429, "drop", 503, "malformed"])
    vehicle = VehicleInfo(3, privileges=frozenset({1, 4}))
    signals = ["speed", "powertrainType", "obdRunTime", "powertrainRange"]
    async with DimoClient(settings_for(url)) as client:
        client.policy.sleep = _no_sleep
        table = await client.fetch_history(
            vehicle, since=T0, until=T0 + timedelta(hours=2), interval=MIN, signals=signals
        )
    assert table.num_rows == 96 and table.column("obdRunTime").null_count == 0
    assert client.planner.max_signals <= 3 and client.planner.max_values <= 30 * 4
    assert client.stats.retries == 4
    assert all(len(q) for q in state.telemetry_queries)


async def test_signals_none_uses_available_signals_and_per_vehicle_since(fake):
    state, url = fake
    state.available = ["speed", "currentLocationCoordinates", "someRemovedThing"]
    vehicles = [VehicleInfo(3, privileges=frozenset({1, 4})), VehicleInfo(2, privileges=frozenset({1}))]
    since = {3: T0, 2: T0 + timedelta(minutes=30)}
    async with DimoClient(settings_for(url)) as client:
        out = await _collect(client, vehicles, since=since, until=T0 + timedelta(hours=1), interval=MIN)
        with pytest.raises(ConfigError, match="vehicle 2"):
            await _collect(client, vehicles, since={3: T0}, until=T0 + timedelta(hours=1), interval=MIN)
    assert out[3].table.column_names == ["token_id", "timestamp", "latitude", "longitude", "speed"]
    assert out[2].table.column_names == ["token_id", "timestamp", "speed"]
    assert out[2].since == since[2] and out[2].table.column("timestamp").to_pylist()[0] == since[2]


async def test_unknown_signal_fails_fast(fake):
    _state, url = fake
    async with DimoClient(settings_for(url)) as client:
        with pytest.raises(ConfigError, match="unknown DIMO signal"):
            await _collect(
                client,
                [VehicleInfo(3, privileges=frozenset({1}))],
                since=T0,
                until=T0 + MIN,
                interval=MIN,
                signals=["Speed"],
            )
    assert CLIENT_ID


async def _no_sleep(_: float) -> None:
    return None


async def test_identity_page_of_the_wrong_shape_is_transient():
    def page(nodes) -> httpx.Response:
        return httpx.Response(200, content=orjson.dumps({"data": {"vehicles": {"nodes": nodes}}}))

    vehicles, info = await _identity_page(page([{"tokenId": "5", "owner": CLIENT_ID}]), "p1", CLIENT_ID)
    assert vehicles == [VehicleInfo(5, owner=CLIENT_ID, privileges=frozenset(range(1, 9)))] and info == {}
    for bad in ([{"owner": CLIENT_ID}], [{"tokenId": "x"}], ["not a node"]):
        with pytest.raises(DimoTransientError, match="p1: a vehicle node lacks tokenId"):
            await _identity_page(page(bad), "p1", CLIENT_ID)
    with pytest.raises(DimoTransientError, match="lacks vehicles"):
        await _identity_page(httpx.Response(200, content=b'{"data": {}}'), "p1", CLIENT_ID)


@pytest.mark.parametrize("answer", ["missing", "null"])
async def test_a_service_without_a_data_summary_gets_every_window(fake, caplog, answer):
    """dataSummary refused (422) or null: nothing is known, so nothing is skipped; a refusal is remembered."""
    state, url = fake
    state.data_summary = answer
    settings = settings_for(url, use_data_summary=True, data_summary_min_requests=1)
    async with DimoClient(settings) as client:
        vehicles = [v for v in await client.discover_vehicles() if v.token_id in (2, 3)]
        kw = {"since": T0, "until": T0 + timedelta(hours=2), "interval": MIN, "signals": SIGNALS}
        out = await _collect(client, vehicles, **kw)
        lookups = client.stats.statuses[422] if answer == "missing" else None
    async with DimoClient(settings_for(url)) as plain:
        want = await _collect(plain, vehicles, **kw)
    assert out.keys() == want.keys() == {2, 3}
    for tid in out:
        assert out[tid].table.equals(want[tid].table) and out[tid].table.num_rows > 0
    if answer == "missing":
        # both vehicles may ask before the first refusal is seen; later vehicles would not ask
        assert 1 <= lookups <= 2 and "dataSummary" in caplog.text
