"""VastProvider against the fake Vast.ai API (tests/fakes/vast.py): offers, idempotent launch, readiness,
destroy, the reaper, failures, and secrets kept out of reprs and logs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from depin_core.errors import PermanentError, TransientError
from gpu_jobs.providers import NoCapacity, VastProvider, choose_offer, pick_offer, reap, worker_name
from tests.fakes.vast import FakeVast
from tests.gpu_jobs.providers.support import JOB_ID, TOKEN, make_bootstrap, make_spec


def provider_for(fake: FakeVast, key: str | None = None) -> VastProvider:
    return VastProvider(SecretStr(key or fake.api_key), fake.base_url, poll_s=0.05)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeVast]:
    """The fake API without machines behind it (instances never get an agent)."""
    with FakeVast(tmp_path, agent_factory=None) as fake:
        yield fake


@pytest.fixture
def vast(api: FakeVast) -> Iterator[VastProvider]:
    with provider_for(api) as p:
        yield p


def test_quote_returns_matching_offers_cheapest_first(api: FakeVast, vast: VastProvider) -> None:
    offers = vast.quote(make_spec(gpu_count=1, min_vram_gb=24))
    assert [o.offer_id for o in offers] == ["1002", "1001", "1003"]  # the 12 GB, unverified 3060 is filtered
    cheapest = offers[0]
    assert (cheapest.provider, cheapest.host, cheapest.gpu_name) == ("vast", "502", "RTX 3090")
    assert cheapest.vram_gb == pytest.approx(24.576) and cheapest.usd_per_hour == pytest.approx(0.25)
    assert cheapest.reliability == pytest.approx(0.97) and cheapest.region == "Quebec, CA"
    assert [o.offer_id for o in vast.quote(make_spec(gpu_count=2, min_vram_gb=40))] == ["1003"]
    assert ("POST", "/api/v0/bundles/") in api.requests


def test_choose_offer_over_vast_offers_honours_cap_and_blocklist(vast: VastProvider) -> None:
    spec = make_spec(gpu_count=1, min_vram_gb=24)
    offers = vast.quote(spec)
    assert choose_offer(offers, spec).offer_id == "1002"
    assert choose_offer(offers, spec, blocked={("vast", "502")}).offer_id == "1001"
    assert choose_offer(offers, spec, max_usd_per_hour=0.2) is None
    with pytest.raises(NoCapacity, match=r"at most \$0.20/h"):
        pick_offer(vast, spec, max_usd_per_hour=0.2)


def test_launch_sends_the_documented_request_and_is_idempotent_by_name(
    api: FakeVast, vast: VastProvider
) -> None:
    spec = make_spec(gpu_count=1, min_vram_gb=24)
    offer = pick_offer(vast, spec)
    name = worker_name(JOB_ID, 1)
    first = vast.launch(offer, make_bootstrap(), name=name)
    second = vast.launch(offer, make_bootstrap(), name=name)  # a crashed flow trying again
    assert first.instance_id == second.instance_id
    assert api.launches == 1
    row = api.instances[int(first.instance_id)]
    assert row["label"] == name and row["image_runtype"] == "ssh_direc ssh_proxy"
    assert "depin worker serve" in row["onstart"] and TOKEN not in row["onstart"]
    assert ["DEPIN_AGENT_TOKEN", TOKEN] in row["extra_env"]  # the token travels only as env
    assert [i.name for i in vast.instances()] == [name]
    vast.destroy(first)
    assert api.instances == {}


def test_no_capacity_is_a_clear_error(api: FakeVast, vast: VastProvider) -> None:
    spec = make_spec(gpu_count=1, min_vram_gb=24)
    offer = pick_offer(vast, spec)
    api.no_capacity = True
    with pytest.raises(
        NoCapacity, match=r"vast: no offer with >= 1 GPU\(s\) of >= 24 GB .*0 offer\(s\) seen"
    ):
        pick_offer(vast, spec)
    with pytest.raises(NoCapacity, match="can no longer be rented"):
        vast.launch(offer, make_bootstrap(), name=worker_name(JOB_ID, 1))
    assert api.launches == 0 and api.instances == {}


def test_an_instance_that_never_becomes_ready_times_out(api: FakeVast, vast: VastProvider) -> None:
    api.never_ready = True
    worker = vast.launch(pick_offer(vast, make_spec()), make_bootstrap(), name=worker_name(JOB_ID, 1))
    with pytest.raises(TransientError, match=r"not ready within 0.3s \(status loading"):
        vast.wait_ready(worker, timeout_s=0.3)
    vast.destroy(worker)
    vast.destroy(worker)  # idempotent: already gone is fine
    assert api.instances == {} and api.destroyed == [int(worker.instance_id)]


def test_an_instance_whose_agent_fails_fails_fast(tmp_path: Path) -> None:
    def broken(data_dir: Path, token: str):
        raise RuntimeError("image pull failed")

    with FakeVast(tmp_path, agent_factory=broken) as fake, provider_for(fake) as vast:
        worker = vast.launch(pick_offer(vast, make_spec()), make_bootstrap(), name=worker_name(JOB_ID, 1))
        with pytest.raises(TransientError, match=r"failed: status exited \(agent failed to start"):
            vast.wait_ready(worker, timeout_s=60)
        vast.destroy(worker)
        assert fake.instances == {}


def test_reaper_destroys_leaked_instances_only(api: FakeVast, vast: VastProvider) -> None:
    live = vast.launch(vast.quote(make_spec())[0], make_bootstrap(), name=worker_name(JOB_ID, 1))
    crashed = vast.launch(vast.quote(make_spec())[0], make_bootstrap(), name=worker_name(JOB_ID, 2))
    leaked = api.leak(worker_name("ffffffffffff-00000000", 1))
    foreign = api.leak("my-jupyter-box")  # not ours: never touched
    reaped = reap(vast, live={live.name})
    assert reaped == sorted([crashed.name, worker_name("ffffffffffff-00000000", 1)])
    assert set(api.instances) == {int(live.instance_id), foreign}
    assert leaked in api.destroyed
    assert reap(vast, live={live.name}) == []


def test_a_wrong_api_key_is_a_permanent_error_without_the_key(api: FakeVast) -> None:
    with (
        provider_for(api, key="wrong-key-123") as bad,
        pytest.raises(PermanentError, match="DEPIN_VAST_API_KEY") as info,
    ):
        bad.quote(make_spec())
    assert "wrong-key-123" not in str(info.value)


def test_unreachable_api_is_transient() -> None:
    with VastProvider(SecretStr("k"), "http://127.0.0.1:9/api/v0", poll_s=0.01) as p:
        p._api.retries, p._api.backoff_s = 1, 0.01
        with pytest.raises(TransientError, match="cannot connect"):
            p.quote(make_spec())


def test_secrets_stay_out_of_reprs_and_logs(
    api: FakeVast, vast: VastProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    worker = vast.launch(pick_offer(vast, make_spec()), make_bootstrap(), name=worker_name(JOB_ID, 1))
    vast.instances()
    vast.destroy(worker)
    for text in (caplog.text, repr(vast), repr(worker), str(worker), worker.model_dump_json()):
        assert api.api_key not in text and TOKEN not in text


def test_retries_honour_retry_after_then_succeed() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"msg": "slow down"})
        assert request.headers["authorization"] == "Bearer k-123"
        return httpx.Response(200, json={"offers": []})

    with VastProvider(SecretStr("k-123"), transport=httpx.MockTransport(handler)) as p:
        assert p.quote(make_spec()) == []
    assert len(calls) == 2


@pytest.mark.e2e
def test_quote_launch_ready_destroy_with_a_real_agent(tmp_path: Path) -> None:
    with FakeVast(tmp_path) as fake, provider_for(fake) as vast:
        spec = make_spec(gpu_count=1, min_vram_gb=16)
        offer = pick_offer(vast, spec, max_usd_per_hour=1.0)
        worker = vast.launch(offer, make_bootstrap(), name=worker_name(JOB_ID, 1))
        try:
            assert worker.url == ""
            ready = vast.wait_ready(worker, timeout_s=120)
            assert ready.url.startswith("http://127.0.0.1:")
            r = httpx.get(f"{ready.url}/v1/health", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
            assert r.status_code == 200 and "gpus" in r.json()
            assert httpx.get(f"{ready.url}/v1/health", timeout=10).status_code == 401
            agent = fake.pool.agent(worker.instance_id)
            assert agent is not None and agent.proc.poll() is None
            assert [(i.name, i.status, i.url) for i in vast.instances()] == [
                (worker.name, "running", ready.url)
            ]
        finally:
            vast.destroy(worker)
        assert agent.proc.poll() is not None  # the machine is gone with its agent
        assert fake.instances == {}
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{ready.url}/v1/health", timeout=2)
