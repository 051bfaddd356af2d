"""DimoClient against the emulator on the contracts DIMO documents today: the token-exchange body (current form,
legacy fallback), ``dataSummary`` planning on a fleet with idle vehicles, and the per-service rate limit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest

from connectors.dimo._http import RetryPolicy
from connectors.dimo.client import DimoClient
from connectors.dimo.emulator.app import create_app
from connectors.dimo.emulator.fleet import Fleet
from connectors.dimo.emulator.ratelimit import RateLimiter
from connectors.dimo.emulator.server import credentials_document
from connectors.dimo.emulator.sim.simulator import simulate_fleet
from connectors.dimo.emulator.state import EmulatorState, make_license
from connectors.dimo.settings import DimoSettings
from tests.support.dimo_loopback import LoopbackServer
from tests.support.handbuilt_fleet import END, SIGNALS, START, handbuilt_fleet

Tables = dict[int, pa.Table]


def _settings(url: str, fleet: Fleet, **over: Any) -> DimoSettings:
    return DimoSettings(
        **credentials_document(fleet, url), **{"max_values_per_request": 2_000, "rate_limit_per_s": 0, **over}
    )


def _serve(fleet: Fleet, **state: Any) -> LoopbackServer:
    return LoopbackServer(create_app(EmulatorState(fleet=fleet, public_url="http://127.0.0.1", **state)))


async def _fetch(
    client: DimoClient, since: datetime, until: datetime, interval: timedelta, signals: list[str]
) -> tuple[Tables, int]:
    """Every readable vehicle's table, and the telemetry requests spent (pages + dataSummary lookups)."""
    vehicles = await client.discover_vehicles()
    out: Tables = {}
    requests = 0
    async for hist in client.fetch_fleet(
        vehicles, since=since, until=until, interval=interval, signals=signals
    ):
        if hist.skipped_reason is None:
            out[hist.vehicle.token_id] = hist.table
            requests += hist.requests
    return out, requests


def _assert_same(got: Tables, want: Tables) -> None:
    assert got.keys() == want.keys()
    for tid, table in want.items():
        assert got[tid].equals(table, check_metadata=True), f"vehicle {tid} differs"


@pytest.fixture(scope="module")
def small() -> Iterator[tuple[Fleet, Tables]]:
    """The hand-built fleet (two readable vehicles, one day of 30 s samples) and its dataset, fetched from an
    emulator without limits or quirks: the reference every variant below must reproduce."""
    fleet = handbuilt_fleet()
    with _serve(fleet) as server:

        async def go() -> Tables:
            async with DimoClient(_settings(server.url, fleet)) as client:
                return (await _fetch(client, START, END, timedelta(minutes=1), SIGNALS))[0]

        yield fleet, asyncio.run(go())


# ---------------------------------------------------------------- token exchange


async def test_exchange_sends_the_current_body(small) -> None:
    fleet, want = small
    with _serve(fleet) as server:
        async with DimoClient(_settings(server.url, fleet)) as client:
            got, _ = await _fetch(client, START, END, timedelta(minutes=1), SIGNALS)
            assert not client.vehicle_tokens.legacy_body and client.vehicle_tokens.exchanges == 2
            assert 400 not in client.stats.statuses
    _assert_same(got, want)


async def test_exchange_falls_back_to_the_legacy_body(small, caplog) -> None:
    caplog.set_level(logging.INFO, logger="connectors.dimo")
    fleet, want = small
    with _serve(fleet, exchange_legacy_only=True) as server:
        async with DimoClient(_settings(server.url, fleet)) as client:
            got, _ = await _fetch(client, START, END, timedelta(minutes=1), SIGNALS)
            tokens = client.vehicle_tokens
            assert tokens.legacy_body and tokens.exchanges == 2
            # The two vehicles exchange concurrently: each may try the current body once before the
            # fallback is remembered; never more.
            assert 1 <= client.stats.statuses[400] <= 2
    _assert_same(got, want)
    assert "legacy nftContractAddress/privileges/tokenId body" in caplog.text


# ---------------------------------------------------------------- dataSummary planning


@pytest.fixture(scope="module")
def idle_fleet() -> Fleet:
    """8 simulated vehicles over 3 days; half went offline early (one never reported)."""
    end = datetime(2026, 11, 1, tzinfo=UTC)
    return simulate_fleet(make_license(0), vehicles=8, days=3, seed=1, end=end, idle_fraction=0.5)


async def test_data_summary_skips_empty_windows_with_an_identical_dataset(idle_fleet: Fleet) -> None:
    fleet = idle_fleet
    signals = ["speed", "powertrainTransmissionTravelledDistance", "currentLocationCoordinates", "obdDTCList"]
    idle = [
        tid
        for tid, s in fleet.series.items()
        if s.is_empty() or s["ts"].max() < fleet.end - timedelta(days=1)
    ]
    assert len(idle) == 4
    runs = {}
    with _serve(fleet) as server:
        for use, window in (
            (False, timedelta(hours=6)),
            (True, timedelta(hours=6)),
            (True, timedelta(days=3)),
        ):
            settings = _settings(
                server.url, fleet, use_data_summary=use, max_window=window, max_values_per_request=40_000
            )
            async with DimoClient(settings) as client:
                runs[use, window] = await _fetch(
                    client, fleet.start, fleet.end, timedelta(minutes=5), signals
                )
    plain, plain_requests = runs[False, timedelta(hours=6)]
    planned, planned_requests = runs[True, timedelta(hours=6)]
    _assert_same(planned, plain)
    assert sum(t.num_rows for t in plain.values()) > 0
    # 8 vehicles × 12 six-hour windows without it (96); with it one lookup per vehicle, no window of an idle
    # vehicle after its data stops, nothing at all for the one that never reported (64 on this fleet).
    assert plain_requests == 8 * 12
    assert planned_requests < plain_requests - 8, (planned_requests, plain_requests)
    # A one-window plan is below data_summary_min_requests: no lookup, one request per vehicle.
    whole, whole_requests = runs[True, timedelta(days=3)]
    _assert_same(whole, plain)
    assert whole_requests == 8


# ---------------------------------------------------------------- rate limit


async def test_default_client_limiter_never_meets_the_documented_limit(small) -> None:
    """DIMO documents 10 requests/s per service and client host; the client's default limiter (10/s, burst 2)
    stays under it whatever the load: ≤ in-flight + 2 + 10·T requests reach the server in any T seconds, and
    its bucket admits 10 + 10·T (max_concurrency 4 leaves room; the default 8 meets the bound exactly)."""
    fleet, want = small
    with _serve(fleet, rate_limit_per_s=10) as server:
        settings = _settings(server.url, fleet, max_concurrency=4)
        settings = settings.model_copy(update={"rate_limit_per_s": DimoSettings().rate_limit_per_s})
        assert settings.rate_limit_per_s == 10
        async with DimoClient(settings) as client:
            got, _ = await _fetch(client, START, END, timedelta(minutes=1), SIGNALS)
            assert client.stats.statuses[429] == 0 and client.stats.retries == 0
    _assert_same(got, want)


class VirtualTime:
    """A clock that moves only when the client sleeps: the server's bucket refills exactly as much as the client
    waited, so the test neither depends on the machine's speed nor waits in real time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


async def test_without_the_client_limiter_429s_are_retried_after_retry_after(small) -> None:
    fleet, want = small
    vt = VirtualTime()
    with _serve(fleet, rate_limit_per_s=10, rate_limit_clock=vt.clock) as server:
        settings = _settings(
            server.url, fleet, max_values_per_request=500
        )  # 15 and 9 windows (5 and 3 columns)
        policy = RetryPolicy(max_retries=50, sleep=vt.sleep)
        async with DimoClient(settings, policy=policy) as client:
            got, requests = await _fetch(client, START, END, timedelta(minutes=1), SIGNALS)
            limited = client.stats.statuses[429]
    _assert_same(got, want)
    # 15 + 9 windows + 2 dataSummary lookups = 26 telemetry requests against a bucket of 10 that refills only
    # while the client waits: some must be refused, and every wait is the server's Retry-After (whole seconds).
    assert requests == 26 and limited > 0 and len(vt.slept) == limited
    assert set(vt.slept) == {1.0}


def test_rate_limiter_buckets_per_service_and_host() -> None:
    now = [0.0]
    limiter = RateLimiter(lambda *_: None, 10, clock=lambda: now[0])  # type: ignore[arg-type]
    assert [limiter.admit("telemetry", "a") for _ in range(10)] == [0.0] * 10
    assert limiter.admit("telemetry", "a") == pytest.approx(0.1)  # empty: a token is back in 0.1 s
    assert limiter.admit("identity", "a") == 0.0 and limiter.admit("telemetry", "b") == 0.0
    now[0] += 0.25
    assert limiter.admit("telemetry", "a") == 0.0 and limiter.admit("telemetry", "a") == 0.0
    assert limiter.admit("telemetry", "a") > 0
    assert limiter.limited == {"telemetry": 2} and limiter.passed["telemetry"] == 13


async def test_rate_limiter_per_license_shares_one_bucket_across_hosts() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def status(limiter: RateLimiter, host: str) -> int:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "path": "/telemetry/query", "client": (host, 40000)}
        await limiter(scope, None, send)  # type: ignore[arg-type]
        return int(sent[0]["status"])

    now = [0.0]
    hosts = ["10.0.0.2", "10.0.0.3"] * 6  # two workers, 12 requests in the same instant
    per_host = RateLimiter(app, 5, clock=lambda: now[0])
    assert [await status(per_host, h) for h in hosts].count(429) == 2  # each host: its own 5
    per_license = RateLimiter(app, 5, per="license", clock=lambda: now[0])
    assert [await status(per_license, h) for h in hosts].count(429) == 7  # 5 for the license, whoever asks
    assert per_license.limited == {"telemetry": 7}


def test_rate_limiter_rejects_a_non_positive_rate() -> None:
    fn: Callable[..., Any] = RateLimiter
    with pytest.raises(ValueError, match="rate must be > 0"):
        fn(None, 0)
