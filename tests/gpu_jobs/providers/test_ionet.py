"""IonetProvider against the fake io.net CaaS API (tests/fakes/ionet.py): offers, idempotent deploy, readiness,
termination, the reaper, failures, and secrets kept out of reprs and logs."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from depin_core.errors import PermanentError, TransientError
from gpu_jobs.providers import IonetProvider, NoCapacity, choose_offer, pick_offer, reap, worker_name
from tests.fakes.ionet import FakeIonet
from tests.gpu_jobs.providers.support import JOB_ID, TOKEN, make_bootstrap, make_spec


def provider_for(fake: FakeIonet, key: str | None = None) -> IonetProvider:
    return IonetProvider(SecretStr(key or fake.api_key), fake.base_url, poll_s=0.05, margin_s=0)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeIonet]:
    """The fake API without machines behind it (deployments never get an agent)."""
    with FakeIonet(tmp_path, agent_factory=None) as fake:
        yield fake


@pytest.fixture
def ionet(api: FakeIonet) -> Iterator[IonetProvider]:
    with provider_for(api) as p:
        yield p


def test_quote_prices_available_hardware_per_location(ionet: IonetProvider) -> None:
    spec = make_spec(gpu_count=1, min_vram_gb=24, max_wall_s=5400)  # 1.5 h → 2 prepaid hours
    offers = ionet.quote(spec)
    # H100 and RTX 4090 in both locations; the A100 has nothing available
    assert sorted(o.offer_id for o in offers) == ["12:4:1:2", "12:9:1:2", "7:4:1:2", "7:9:1:2"]
    rtx = next(o for o in offers if o.offer_id == "12:9:1:2")
    assert (rtx.gpu_name, rtx.gpu_count, rtx.vram_gb, rtx.region) == ("RTX 4090", 1, 24.0, "DE")
    assert rtx.usd_per_hour == pytest.approx(0.39 * 1.02)  # price of the 2 prepaid hours / 2
    assert [o.offer_id for o in ionet.quote(make_spec(gpu_count=1, min_vram_gb=40))] == ["7:9:1:1", "7:4:1:1"]
    assert ionet.quote(make_spec(gpu_count=5)) == []  # the 4090 holds at most 4 per container, H100 has 4


def test_choose_offer_and_price_cap(ionet: IonetProvider) -> None:
    spec = make_spec(gpu_count=1, min_vram_gb=24)
    offers = ionet.quote(spec)
    assert choose_offer(offers, spec).offer_id == "12:4:1:1"  # RTX 4090, equal prices: the lower id
    assert (
        choose_offer(offers, spec, max_usd_per_hour=1.0, blocked={("ionet", "12:4:1:1")}).offer_id
        == "12:9:1:1"
    )
    assert (
        choose_offer(offers, spec, blocked={("ionet", "12:4:1:1"), ("ionet", "12:9:1:1")}).gpu_name
        == "H100 80GB"
    )
    with pytest.raises(NoCapacity, match="ionet: no offer"):
        pick_offer(ionet, spec, max_usd_per_hour=0.1)


def test_deploy_sends_the_documented_request_and_is_idempotent_by_name(
    api: FakeIonet, ionet: IonetProvider
) -> None:
    offer = pick_offer(ionet, make_spec(gpu_count=1, min_vram_gb=24, max_wall_s=3600))
    name = worker_name(JOB_ID, 1)
    first = ionet.launch(offer, make_bootstrap(), name=name)
    second = ionet.launch(offer, make_bootstrap(), name=name)
    assert first.instance_id == second.instance_id and api.launches == 1
    (body,) = api.deploy_bodies
    assert body["resource_private_name"] == name
    assert (
        body["hardware_id"],
        body["location_ids"],
        body["gpus_per_container"],
        body["duration_hours"],
    ) == (
        12,
        [4],
        1,
        1,
    )  # fmt: skip  (equal prices: the lower offer id wins)
    cc = body["container_config"]
    assert cc["secret_env_variables"] == {"DEPIN_AGENT_TOKEN": TOKEN}
    assert TOKEN not in json.dumps({k: v for k, v in cc.items() if k != "secret_env_variables"})
    assert cc["traffic_port"] == 8900 and cc["replica_count"] == 1 and "depin worker serve" in cc["args"][0]
    assert body["registry_config"] == {"image_url": make_bootstrap().image}
    # the details never echo secret values
    details = ionet.deployment(first.instance_id)
    assert details["container_config"]["secret_env_keys"] == ["DEPIN_AGENT_TOKEN"] and TOKEN not in str(
        details
    )
    assert [i.name for i in ionet.instances()] == [name]
    ionet.destroy(first)
    ionet.destroy(first)  # terminating twice is fine
    assert ionet.instances() == [] and api.deployments[first.instance_id]["status"] == "destroyed"


def test_no_capacity_is_a_clear_error(api: FakeIonet, ionet: IonetProvider) -> None:
    spec = make_spec(gpu_count=1, min_vram_gb=24)
    offer = pick_offer(ionet, spec)
    api.no_capacity = True
    with pytest.raises(NoCapacity, match=r"ionet: no offer with >= 1 GPU\(s\) of >= 24 GB"):
        pick_offer(ionet, spec)
    with pytest.raises(NoCapacity, match="cannot deploy offer"):
        ionet.launch(offer, make_bootstrap(), name=worker_name(JOB_ID, 1))
    assert api.launches == 0


def test_a_deployment_that_never_becomes_ready_times_out(api: FakeIonet, ionet: IonetProvider) -> None:
    api.never_ready = True
    worker = ionet.launch(pick_offer(ionet, make_spec()), make_bootstrap(), name=worker_name(JOB_ID, 1))
    with pytest.raises(TransientError, match=r"not ready within 0.3s \(status deployment requested\)"):
        ionet.wait_ready(worker, timeout_s=0.3)
    ionet.destroy(worker)
    assert api.deployments[worker.instance_id]["status"] == "destroyed"


def test_a_deployment_whose_agent_fails_fails_fast(tmp_path: Path) -> None:
    def broken(data_dir: Path, token: str):
        raise RuntimeError("image pull failed")

    with FakeIonet(tmp_path, agent_factory=broken) as fake, provider_for(fake) as ionet:
        worker = ionet.launch(pick_offer(ionet, make_spec()), make_bootstrap(), name=worker_name(JOB_ID, 1))
        with pytest.raises(TransientError, match=r"deployment .* failed"):
            ionet.wait_ready(worker, timeout_s=60)
        ionet.destroy(worker)  # a failed deployment can still be terminated (or is already gone): no error
        assert fake.deployments[worker.instance_id]["status"] == "destroyed"


def test_reaper_terminates_leaked_deployments_only(api: FakeIonet, ionet: IonetProvider) -> None:
    offer = pick_offer(ionet, make_spec())
    live = ionet.launch(offer, make_bootstrap(), name=worker_name(JOB_ID, 1))
    crashed = ionet.launch(offer, make_bootstrap(), name=worker_name(JOB_ID, 2))
    leaked = api.leak(worker_name("ffffffffffff-00000000", 3))
    foreign = api.leak("someone-elses-model")
    assert reap(ionet, live={live.name}) == sorted([crashed.name, worker_name("ffffffffffff-00000000", 3)])
    status = {
        d: api.deployments[d]["status"] for d in (live.instance_id, crashed.instance_id, leaked, foreign)
    }
    assert status == {
        live.instance_id: "deployment requested",
        crashed.instance_id: "destroyed",
        leaked: "destroyed",
        foreign: "running",
    }


def test_deployments_are_listed_across_pages(api: FakeIonet, ionet: IonetProvider) -> None:
    for i in range(105):
        api.leak(worker_name("ffffffffffff-00000000", i + 1))
    assert len(ionet.instances()) == 105


def test_a_wrong_api_key_is_a_permanent_error_without_the_key(api: FakeIonet) -> None:
    with (
        provider_for(api, key="wrong-key-456") as bad,
        pytest.raises(PermanentError, match="DEPIN_IONET_API_KEY") as info,
    ):
        bad.quote(make_spec())
    assert "wrong-key-456" not in str(info.value)


def test_secrets_stay_out_of_reprs_and_logs(
    api: FakeIonet, ionet: IonetProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    worker = ionet.launch(pick_offer(ionet, make_spec()), make_bootstrap(), name=worker_name(JOB_ID, 1))
    ionet.instances()
    ionet.destroy(worker)
    for text in (caplog.text, repr(ionet), repr(worker), str(worker), worker.model_dump_json()):
        assert api.api_key not in text and TOKEN not in text


@pytest.mark.e2e
def test_quote_deploy_ready_destroy_with_a_real_agent(tmp_path: Path) -> None:
    with FakeIonet(tmp_path) as fake, provider_for(fake) as ionet:
        offer = pick_offer(ionet, make_spec(gpu_count=1, min_vram_gb=16), max_usd_per_hour=1.0)
        worker = ionet.launch(offer, make_bootstrap(), name=worker_name(JOB_ID, 1))
        try:
            ready = ionet.wait_ready(worker, timeout_s=120)
            r = httpx.get(f"{ready.url}/v1/health", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
            assert r.status_code == 200 and "gpus" in r.json()
            agent = fake.pool.agent(worker.instance_id)
            assert agent is not None and agent.proc.poll() is None
            assert ready.url == agent.url
        finally:
            ionet.destroy(worker)
        assert agent.proc.poll() is not None
        assert fake.deployments[worker.instance_id]["status"] == "destroyed"
        assert ionet.instances() == []
