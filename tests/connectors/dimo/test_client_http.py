"""Retries, backoff, Retry-After, error classification and the rate limiter, against a loopback server."""

from __future__ import annotations

import random
import threading
import time

import pytest

from connectors.dimo._http import (
    ClientStats,
    Pacer,
    RetryPolicy,
    Service,
    graphql_data,
    parse_retry_after,
)
from connectors.dimo.errors import DimoAuthError, DimoPrivilegeError, DimoQueryError, DimoTransientError
from tests.support.dimo_loopback import FakeState, LoopbackServer, RecordingSleep, create_app


@pytest.fixture
def fake():
    state = FakeState()
    with LoopbackServer(create_app(state)) as server:
        yield state, server.url


def _service(sleep: RecordingSleep, max_retries: int = 4) -> tuple[Service, ClientStats]:
    stats = ClientStats()
    policy = RetryPolicy(max_retries=max_retries, base_s=0.5, max_s=8, sleep=sleep, rng=random.Random(1))
    return Service("identity", rate=0, concurrency=2, timeout_s=5, policy=policy, stats=stats), stats


async def _identity(service: Service, url: str):
    return await service.call(
        "POST",
        f"{url}/identity/query",
        what="identity",
        parse=lambda r: graphql_data(r, "identity"),
        json={
            "query": "query($lic: Address!) { vehicles(first: 100) { nodes { tokenId } } }",
            "variables": {"lic": "0x"},
        },
    )


async def test_retries_429_honouring_retry_after_then_succeeds(fake):
    state, url = fake
    state.scripts["/identity/query"].extend([429, 503, "drop", "malformed"])
    sleep = RecordingSleep()
    service, stats = _service(sleep)
    try:
        data = await _identity(service, url)
    finally:
        await service.aclose()
    assert [n["tokenId"] for n in data["vehicles"]["nodes"]] == [3, 2, 1]
    assert state.hits["/identity/query"] == 5
    assert stats.requests == 5 and stats.retries == 4
    assert sleep.delays[0] == 3.0  # Retry-After: 3 wins over the jittered backoff
    assert all(0 <= d <= 8 for d in sleep.delays[1:])
    assert stats.statuses[429] == 1 and stats.statuses[503] == 1
    assert stats.errors["DimoTransientError"] == 4


async def test_gives_up_after_max_retries(fake):
    state, url = fake
    state.scripts["/identity/query"].extend([503] * 10)
    service, _ = _service(RecordingSleep(), max_retries=2)
    try:
        with pytest.raises(DimoTransientError, match="gave up after 3 attempts"):
            await _identity(service, url)
    finally:
        await service.aclose()
    assert state.hits["/identity/query"] == 3


@pytest.mark.parametrize("status", [400, 403, 404])
async def test_permanent_errors_are_not_retried(fake, status):
    state, url = fake
    state.scripts["/identity/query"].append(status)
    sleep = RecordingSleep()
    service, _ = _service(sleep)
    try:
        with pytest.raises(DimoPrivilegeError if status == 403 else DimoQueryError):
            await _identity(service, url)
    finally:
        await service.aclose()
    assert state.hits["/identity/query"] == 1 and sleep.delays == []


async def test_401_without_token_source_is_an_auth_error(fake):
    _state, url = fake
    service, _ = _service(RecordingSleep())
    try:
        with pytest.raises(DimoAuthError, match="none was sent"):
            await service.call(
                "POST",
                f"{url}/telemetry/query",
                what="telemetry",
                parse=lambda r: graphql_data(r, "telemetry"),
                json={"query": "{x}"},
            )
    finally:
        await service.aclose()


async def test_connect_error_is_transient():
    sleep = RecordingSleep()
    service, stats = _service(sleep, max_retries=1)
    try:
        with pytest.raises(DimoTransientError, match="connection failed"):
            await service.call(
                "POST",
                "http://127.0.0.1:9/query",
                what="nothing",
                parse=lambda r: graphql_data(r, "nothing"),
                json={},
            )
    finally:
        await service.aclose()
    assert len(sleep.delays) == 1 and stats.requests == 2


def test_retry_after_parsing_and_backoff_bounds():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    policy = RetryPolicy(base_s=0.5, max_s=4, rng=random.Random(0))
    assert policy.delay(1, retry_after=1e6) == 60.0  # capped
    delays = [policy.delay(a) for a in range(1, 12) for _ in range(20)]
    assert min(delays) >= 0 and max(delays) <= 4
    assert max(policy.delay(1) for _ in range(50)) <= 0.5


def test_retry_after_date_without_zone_is_utc_not_local_time(monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:  # "-0000" parses to a naive datetime
        assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 -0000", now=1445412470.0) == pytest.approx(10.0)
    finally:
        monkeypatch.undo()
        time.tzset()


async def test_rate_limiter_spaces_requests_with_a_small_burst():
    now = [0.0]
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s

    limiter = Pacer(10, burst=2, clock=lambda: now[0], sleep=sleep)
    for _ in range(6):
        await limiter("telemetry")
    assert len(sleeps) == 4  # two free (burst), then one per 0.1 s
    assert now[0] == pytest.approx(0.4)
    off = Pacer(0)
    await off("telemetry")


async def test_pacer_is_shared_by_threads_and_paces_each_service_on_its_own():
    now = [0.0]
    pacer = Pacer(10, burst=2, clock=lambda: now[0])
    # two threads with their own event loops (a flow's tasks) reserve from one pacer: one pace between them
    waits: list[float] = []
    threads = [threading.Thread(target=lambda: waits.extend(pacer.reserve("telemetry") for _ in range(3)))
               for _ in range(2)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(waits) == pytest.approx([0.0, 0.0, 0.1, 0.2, 0.3, 0.4])  # a burst of 2, then 0.1 s apart
    assert pacer.reserve("auth") == 0.0  # another service has its own pace
    now[0] = 10.0  # idle: the burst is available again, not the time missed
    assert [pacer.reserve("telemetry") for _ in range(3)] == pytest.approx([0.0, 0.0, 0.1])
    assert Pacer(0).reserve("telemetry") == 0.0

    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    paced = Pacer(4, burst=1, clock=lambda: 0.0, sleep=sleep)
    for _ in range(3):
        await paced("identity")  # an Admission: called with the service's name
    assert slept == pytest.approx([0.25, 0.5])


def test_stats_as_dict():
    s = ClientStats()
    s.statuses[200] += 2
    assert s.as_dict()["statuses"] == {200: 2}
