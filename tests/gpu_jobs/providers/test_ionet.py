"""IonetProvider against the fake io.net CaaS API (tests/support/fakes/ionet.py): offers from the inventory as io.net sells
them (8 GPUs per container), idempotent deploy, refusals classified, listing under both page numberings,
readiness, termination, the reaper, and secrets kept out of reprs and logs."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from depin_core import tls
from depin_core.errors import PermanentError, TransientError
from gpu_jobs.errors import ProviderRefused
from gpu_jobs.providers import IonetProvider, NoCapacity, choose_offer, pick_offer, reap, worker_name
from gpu_jobs.providers.ionet import CAAS, _parse_offer_id, status_of
from tests.support.fakes.ionet import FakeIonet
from tests.support.providers import JOB_ID, TOKEN, make_bootstrap, make_spec

RTX, H100 = '"203":8:2', "7:8:2"  # hardware "203" is listed with a string id: it goes back as one
DEPRECATED = {f"{CAAS}/hardware/max-gpus-per-container", f"{CAAS}/available-replicas"}


def provider_for(fake: FakeIonet, key: str | None = None, **kw) -> IonetProvider:
    return IonetProvider(SecretStr(key or fake.api_key), fake.base_url, poll_s=0.05, margin_s=0, **kw)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeIonet]:
    """The fake API without machines behind it (deployments never get an agent)."""
    with FakeIonet(tmp_path, agent_factory=None) as fake:
        yield fake


@pytest.fixture
def ionet(api: FakeIonet) -> Iterator[IonetProvider]:
    with provider_for(api) as p:
        yield p


def _queries(api: FakeIonet, path: str) -> list[dict[str, str]]:
    return [q for _, p, q in api.calls if p == f"{CAAS}{path}"]


def test_quote_offers_eight_gpu_containers_at_their_full_price(api: FakeIonet, ionet: IonetProvider) -> None:
    spec = make_spec(gpu_count=1, min_vram_gb=24, max_wall_s=5400)  # 1.5 h → 2 prepaid hours
    offers = {o.offer_id: o for o in ionet.quote(spec)}
    # the A100 has nothing free; the L4 holds at most 4 GPUs per container, io.net deploys 8
    assert sorted(offers) == [RTX, H100]
    rtx = offers[RTX]
    assert (rtx.gpu_name, rtx.gpu_count, rtx.vram_gb, rtx.host) == ("RTX 4090", 8, 24.0, None)
    assert rtx.region == "United States"  # where most of it is free (24 GPUs vs 8 in Germany)
    assert rtx.usd_per_hour == pytest.approx(0.39 * 8 * 1.02)  # io.net's price for 2 h of 8 GPUs, per hour
    assert offers[H100].usd_per_hour == pytest.approx(2.19 * 8 * 1.02)
    # priced the way io.net sells it: 8 per container, anywhere (the inventory has no location ids)
    assert {json.dumps(q, sort_keys=True) for q in _queries(api, "/price")} == {
        json.dumps({"hardware_id": hw, "duration_hours": "2", "gpus_per_container": "8", "replica_count": "1"},
                   sort_keys=True)
        for hw in ("7", "203")
    }  # fmt: skip
    assert not api.paths() & DEPRECATED
    assert [o.offer_id for o in ionet.quote(make_spec(gpu_count=1, min_vram_gb=40))] == ["7:8:1"]
    assert ionet.quote(make_spec(gpu_count=9)) == []  # more than one container holds


def test_following_the_jobs_gpu_count_where_io_net_allows_it(tmp_path: Path) -> None:
    with (
        FakeIonet(tmp_path, agent_factory=None, accepted_gpus=frozenset(range(1, 9))) as fake,
        provider_for(fake, gpus_per_container=None) as ionet,
    ):
        offers = {o.offer_id: o for o in ionet.quote(make_spec(gpu_count=2, min_vram_gb=16))}
        assert sorted(offers) == ['"203":2:1', "21:2:1", "7:2:1"]  # the L4 holds 2 now
        assert offers["21:2:1"].usd_per_hour == pytest.approx(0.25 * 2 * 1.02)


def test_the_price_cap_and_the_offer_choice_decide_whether_eight_gpus_are_worth_it(
    ionet: IonetProvider,
) -> None:
    spec = make_spec(gpu_count=1, min_vram_gb=24)
    offers = ionet.quote(spec)
    assert choose_offer(offers, spec).offer_id == '"203":8:1'  # RTX 4090 ×8, $3.18/h
    assert choose_offer(offers, spec, blocked={("ionet", '"203":8:1')}).gpu_name == "H100 80GB"
    with pytest.raises(NoCapacity, match=r"ionet: no offer with >= 1 GPU\(s\) of >= 24 GB at most \$3.00/h"):
        pick_offer(ionet, spec, max_usd_per_hour=3.0)


def test_deploy_sends_what_spec_and_sdk_both_accept_and_is_idempotent_by_name(
    api: FakeIonet, ionet: IonetProvider
) -> None:
    offer = pick_offer(ionet, make_spec(gpu_count=1, min_vram_gb=24, max_wall_s=3600))
    name = worker_name(JOB_ID, 1)
    boot = make_bootstrap()
    first = ionet.launch(offer, boot, name=name)
    second = ionet.launch(offer, make_bootstrap(), name=name)
    assert first.instance_id == second.instance_id and api.launches == 1
    assert first.tls_cert == boot.tls_cert  # the runner pins the certificate made for this node
    (body,) = api.deploy_bodies
    assert body == {
        "resource_private_name": name,
        "duration_hours": 1,
        "gpus_per_container": 8,
        "hardware_id": "203",  # as listed: a string id stays a string
        "container_config": {
            "replica_count": 1,
            "entrypoint": ["/bin/sh", "-c"],
            "args": [boot.script()],
            "env_variables": {"DEPIN_AGENT_PORT": "8900"},
            "secret_env_variables": boot.env(),  # the token, the node's certificate and its key
            "traffic_port": 8900,
        },
        "registry_config": {"image_url": boot.image},
    }  # no location_ids (io.net places it), no payment_source / on_incomplete_booking (not in the spec)
    details = ionet.deployment(first.instance_id)
    assert details["container_config"]["secret_env_keys"] == sorted(boot.env()) and TOKEN not in str(details)
    assert "DEPIN_AGENT_TOKEN" in boot.env() and boot.env()["DEPIN_AGENT_TLS_KEY"] not in str(details)
    assert details["locations"][0]["name"] == "United States" and details["gpus_per_container"] == 8
    assert [i.name for i in ionet.instances()] == [name]
    ionet.destroy(first)
    ionet.destroy(first)  # terminating twice is fine
    assert ionet.instances() == [] and api.deployments[first.instance_id]["status"] == "destroyed"
    assert not api.paths() & DEPRECATED


def test_no_capacity_on_price_or_deploy_is_no_capacity(api: FakeIonet, ionet: IonetProvider) -> None:
    spec = make_spec(gpu_count=1, min_vram_gb=24)
    api.fail_next("price", 422, {"status": "failed", "error": "No capacity for H100 80GB right now"})
    assert [o.gpu_name for o in ionet.quote(spec)] == ["RTX 4090"]  # the H100 price said no: skipped
    offer = pick_offer(ionet, spec)
    api.no_capacity = True
    with pytest.raises(NoCapacity, match=r"ionet: no offer with >= 1 GPU\(s\) of >= 24 GB"):
        pick_offer(ionet, spec)
    with pytest.raises(NoCapacity, match=r"no capacity \(Not enough available replicas of RTX 4090"):
        ionet.launch(offer, make_bootstrap(), name=worker_name(JOB_ID, 1))
    assert api.launches == 0


def test_a_request_io_net_refuses_is_permanent_with_its_message(api: FakeIonet) -> None:
    with provider_for(api, gpus_per_container=1) as one, pytest.raises(PermanentError) as info:
        one.quote(make_spec())
    assert not isinstance(info.value, ProviderRefused | NoCapacity)
    assert "gpus_per_container: gpus_per_container must be one of [8]" in str(info.value)

    with provider_for(api) as ionet:
        offer = pick_offer(ionet, make_spec())
        one_gpu = offer.model_copy(update={"offer_id": "7:1:1"})
        with pytest.raises(
            PermanentError, match=r"deploy of offer 7:1:1 .* was refused \(422: gpus_per_container"
        ):
            ionet.launch(one_gpu, make_bootstrap(), name=worker_name(JOB_ID, 1))
        api.fail_next("deploy", 422, {"detail": [
            {"loc": ["body", "container_config", "traffic_port"], "msg": "Input should be less than 65536",
             "type": "less_than"}]})  # fmt: skip
        with pytest.raises(
            PermanentError, match=r"container_config\.traffic_port: Input should be less"
        ) as info:
            ionet.launch(offer, make_bootstrap(), name=worker_name(JOB_ID, 1))
        assert not isinstance(info.value, NoCapacity | ProviderRefused)
        with pytest.raises(PermanentError, match="take it from quote"):
            ionet.launch(
                offer.model_copy(update={"offer_id": "7:8"}), make_bootstrap(), name=worker_name(JOB_ID, 2)
            )
    assert api.launches == 0


@pytest.mark.parametrize("first_page, clamp", [(0, False), (1, False), (1, True)])
def test_deployments_are_listed_across_pages_whichever_number_the_first_page_has(
    tmp_path: Path, first_page: int, clamp: bool
) -> None:
    with (
        FakeIonet(tmp_path, agent_factory=None, first_page=first_page) as fake,
        provider_for(fake, page_size=40) as ionet,
    ):
        fake.clamp_pages = clamp
        for i in range(105):
            fake.leak(worker_name("ffffffffffff-00000000", i + 1))
        found = ionet.instances()
        assert len(found) == 105 and len({i.instance_id for i in found}) == 105
        pages = [int(q["page"]) for q in _queries(fake, "/deployments")]
        assert (
            pages == {0: [0, 1, 2], 1: [0, 1, 2, 3]}[first_page]
        )  # 1-based: page 0 refused (or page 1 again)


def test_status_words_are_normalised_like_the_sdk_does() -> None:
    assert status_of("DEPLOYMENT_REQUESTED") == "deployment requested" == status_of("Deployment-Requested ")
    assert status_of(None) == "unknown"


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


def test_offer_ids_keep_the_hardware_ids_type() -> None:
    assert _parse_offer_id('"0042":8:3') == ("0042", 8, 3) and _parse_offer_id("42:8:3") == (42, 8, 3)


@pytest.mark.e2e
def test_quote_deploy_ready_destroy_with_a_real_agent(tmp_path: Path) -> None:
    with FakeIonet(tmp_path) as fake, provider_for(fake) as ionet:
        offer = pick_offer(ionet, make_spec(gpu_count=1, min_vram_gb=16), max_usd_per_hour=4.0)
        worker = ionet.launch(offer, make_bootstrap(), name=worker_name(JOB_ID, 1))
        try:
            ready = ionet.wait_ready(worker, timeout_s=120)
            assert ready.url.startswith("https://") and ready.tls_cert
            pinned = tls.client_context(ready.tls_cert)
            r = httpx.get(
                f"{ready.url}/v1/health", headers={"Authorization": f"Bearer {TOKEN}"}, verify=pinned
            )
            assert r.status_code == 200 and "gpus" in r.json()
            agent = fake.pool.agent(worker.instance_id)
            assert agent is not None and agent.proc.poll() is None
            assert ready.url == agent.url
        finally:
            ionet.destroy(worker)
        assert agent.proc.poll() is not None
        assert fake.deployments[worker.instance_id]["status"] == "destroyed"
        assert ionet.instances() == []
