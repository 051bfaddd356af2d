"""VastProvider against the fake Vast.ai API (tests/support/fakes/vast.py): offers, idempotent launch, readiness,
destroy, the reaper, the v1 instance list (pages, label filter, v0 fallback), Vast's refusals, failures, and
secrets kept out of reprs and logs. The official client against the same fake:
tests/e2e/test_official_vastai.py."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from depin_core import tls
from depin_core.errors import ConfigError, PermanentError, TransientError
from gpu_jobs.providers import NoCapacity, VastProvider, choose_offer, pick_offer, reap, worker_name
from gpu_jobs.providers.base import Bootstrap
from gpu_jobs.providers.vast import server_root
from tests.support.fakes.vast import FakeVast
from tests.support.providers import JOB_ID, TOKEN, make_bootstrap, make_spec


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
    with pytest.raises(
        NoCapacity, match=r"no_such_ask Instance type 1002 is no longer available.*quote again"
    ):
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
    with VastProvider(SecretStr("k"), "http://127.0.0.1:9", poll_s=0.01) as p:
        p._api.policy.max_retries, p._api.policy.base_s = 1, 0.01
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


def test_the_url_may_be_the_server_root_or_api_v0(api: FakeVast) -> None:
    # the official client's VAST_URL is the root; settings here used to name …/api/v0: both reach the same API
    assert server_root("https://console.vast.ai/api/v0/") == server_root("https://console.vast.ai")
    assert server_root("https://console.vast.ai") == "https://console.vast.ai"
    for url in (api.server_url, api.base_url, api.base_url + "/"):
        with VastProvider(SecretStr(api.api_key), url) as p:
            assert [o.offer_id for o in p.quote(make_spec(min_vram_gb=24))] == ["1002", "1001", "1003"]
            assert p.instances() == []
    assert {path for _, path in api.requests} == {"/api/v0/bundles/", "/api/v1/instances/"}


def test_instances_are_listed_in_v1_pages_and_found_by_a_server_side_label_filter(
    api: FakeVast, vast: VastProvider
) -> None:
    api.page_limit = 2
    ours = [api.leak(worker_name(JOB_ID, n)) for n in (1, 2, 3)]
    api.leak("my-jupyter-box")
    again = api.leak(worker_name(JOB_ID, 2))  # a newer instance with the same name
    api.calls.clear()
    assert sorted(int(i.instance_id) for i in vast.instances()) == sorted([*ours, again])
    pages = [q for m, path, q in api.calls if path == "/api/v1/instances/"]
    assert len(pages) == 3  # 5 instances, 2 a page
    assert "after_token" not in pages[0] and pages[1]["after_token"] != pages[2]["after_token"]
    assert all(
        json.loads(q["order_by"]) == [{"col": "id", "dir": "asc"}] and q["limit"] == "25" for q in pages
    )

    api.calls.clear()
    assert vast.find(worker_name(JOB_ID, 2))["id"] == again
    [(_, _, q)] = api.calls  # one page: the server filtered by label
    assert json.loads(q["select_filters"]) == {"label": {"in": [worker_name(JOB_ID, 2)]}}
    assert vast.find(worker_name(JOB_ID, 9)) is None


def test_an_api_without_v1_is_listed_through_v0(api: FakeVast, vast: VastProvider) -> None:
    api.v1 = False
    name = worker_name(JOB_ID, 1)
    first = vast.launch(pick_offer(vast, make_spec()), make_bootstrap(), name=name)
    again = vast.launch(pick_offer(vast, make_spec()), make_bootstrap(), name=name)
    assert first.instance_id == again.instance_id and api.launches == 1
    api.leak("my-jupyter-box")
    assert [i.name for i in vast.instances()] == [name]
    lists = [path for m, path in api.requests if m == "GET" and path.endswith("/instances/")]
    assert lists == ["/api/v0/instances/"] * 3  # v1 answered 404 once (unrecorded) and is not asked again


@pytest.mark.parametrize(
    ("status", "error", "msg", "raised", "hint"),
    [
        (400, "invalid_args", "error 400/3467: Invalid args: 'image' is too long", ConfigError, "bootstrap"),
        (400, "invalid_price", "error 400: price out of range", ConfigError, "0.001 and 128"),
        (400, "no_ssh_key_for_vm", "error 400: VM offers need an SSH key", ConfigError, "create ssh-key"),
        (404, "invalid_args", "error 404/3603: no_such_ask Instance type by id 1002 is not available.",
         NoCapacity, "quote again"),
        (410, "no_such_ask", "error 410/3907: no_such_ask Instance type 1002 is no longer available.",
         NoCapacity, "quote again"),
        (403, "invalid_args", "error 403/3586: Offer 1002 is not your own. Hosts can only rent their own "
         "machines.", PermanentError, "not an API-key problem"),
    ],
)  # fmt: skip
def test_a_refused_rent_says_what_vast_said_and_what_it_means(
    api: FakeVast, vast: VastProvider, status: int, error: str, msg: str, raised: type, hint: str
) -> None:
    offer = pick_offer(vast, make_spec())
    api.ask_error = (status, error, msg)
    with pytest.raises(raised) as info:
        vast.launch(offer, make_bootstrap(), name=worker_name(JOB_ID, 1))
    text = str(info.value)
    assert msg in text and hint in text and f"offer {offer.offer_id}" in text
    assert "DEPIN_VAST_API_KEY" not in text  # none of these is a bad key
    assert type(info.value) is raised or (
        raised is PermanentError and not isinstance(info.value, ConfigError)
    )
    assert not isinstance(info.value, TransientError) or raised is NoCapacity
    assert api.launches == 0 and api.instances == {}


def test_the_fakes_own_refusals_reach_the_caller(api: FakeVast, vast: VastProvider) -> None:
    offer = pick_offer(vast, make_spec())
    small = Bootstrap(token=SecretStr(TOKEN), disk_gb=4)
    with pytest.raises(
        ConfigError, match=r"\(invalid_args: error 400: Invalid args: disk must be at least 8 GB\)"
    ):
        vast.launch(offer, small, name=worker_name(JOB_ID, 1))
    api.foreign_offers.add(int(offer.offer_id))
    with pytest.raises(PermanentError, match="is not your own") as info:
        vast.launch(offer, make_bootstrap(), name=worker_name(JOB_ID, 1))
    assert not isinstance(info.value, ConfigError | TransientError)
    gone = offer.model_copy(update={"offer_id": "999"})
    with pytest.raises(NoCapacity, match="no_such_ask Instance type by id 999 is not available"):
        vast.launch(gone, make_bootstrap(), name=worker_name(JOB_ID, 1))
    assert api.launches == 0


def test_the_fake_takes_the_official_clients_query_syntax(api: FakeVast) -> None:
    auth = {"Authorization": f"Bearer {api.api_key}"}
    query = {  # as vastai's parse_query sends 'num_gpus>=2 gpu_name in [A100_SXM4,RTX_4090]': numbers as strings
        "verified": {"eq": True},
        "num_gpus": {"gte": "2"},
        "gpu_name": {"in": ["A100 SXM4", "RTX 4090"]},
        "geolocation": {"notin": ["Texas, US"]},
        "order": [["score", "desc"]],
        "type": "on-demand",
        "allocated_storage": 5.0,
    }
    r = httpx.post(f"{api.base_url}/bundles/", json=query, headers=auth, timeout=10)
    assert r.status_code == 200 and [o["id"] for o in r.json()["offers"]] == [1003]
    query["num_gpus"] = {"lte": "1"}
    r = httpx.post(f"{api.base_url}/bundles/", json=query, headers=auth, timeout=10)
    assert [o["id"] for o in r.json()["offers"]] == [1001]
    r = httpx.post(f"{api.base_url}/bundles/", json={"num_gpus": {"like": 1}}, headers=auth, timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "invalid_args"

    v1 = f"{api.server_url}/api/v1/instances/"
    bad = httpx.get(v1, params={"select_filters": '{"dph_total": {"lte": 1}}'}, headers=auth, timeout=10)
    assert (
        bad.status_code == 400
        and bad.json()["error"] == "invalid_request"
        and "dph_total" in bad.json()["msg"]
    )
    first, second = api.leak(worker_name(JOB_ID, 1)), api.leak("other")
    found = httpx.get(
        v1, params={"select_filters": json.dumps({"id": {"gte": str(second)}})}, headers=auth, timeout=10
    )
    assert [r["id"] for r in found.json()["instances"]] == [second] and found.json()["total_instances"] == 1
    found = httpx.get(
        v1, params={"select_filters": '{"label": {"in": [null, "other"]}}'}, headers=auth, timeout=10
    )
    assert found.json()["label_counts"] == {"other": 1} and first != second
    bad = httpx.get(v1, params={"after_token": "not-a-token"}, headers=auth, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_token"


def test_list_errors_keep_vasts_message_and_a_page_token_loop_stops() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        body = {
            "error": "invalid_request",
            "msg": "Error in query parameters: label is not a valid search key",
        }
        return httpx.Response(400, json=body)

    with (
        VastProvider(SecretStr("k"), transport=httpx.MockTransport(refuse)) as p,
        pytest.raises(PermanentError, match="invalid_request: Error in query parameters: label is not"),
    ):
        p.instances()

    def loop(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"instances": [{"id": 1, "label": "x"}], "next_token": "same"})

    with (
        VastProvider(SecretStr("k"), transport=httpx.MockTransport(loop)) as p,
        pytest.raises(PermanentError, match="repeated its page token"),
    ):
        p.instances()


@pytest.mark.e2e
def test_quote_launch_ready_destroy_with_a_real_agent(tmp_path: Path) -> None:
    with FakeVast(tmp_path) as fake, provider_for(fake) as vast:
        spec = make_spec(gpu_count=1, min_vram_gb=16)
        offer = pick_offer(vast, spec, max_usd_per_hour=1.0)
        worker = vast.launch(offer, make_bootstrap(), name=worker_name(JOB_ID, 1))
        try:
            assert worker.url == ""
            ready = vast.wait_ready(worker, timeout_s=120)
            assert ready.url.startswith("https://127.0.0.1:") and ready.tls_cert
            pinned = tls.client_context(ready.tls_cert)  # the certificate made for this node, sent in its env
            auth = {"Authorization": f"Bearer {TOKEN}"}
            r = httpx.get(f"{ready.url}/v1/health", headers=auth, timeout=10, verify=pinned)
            assert r.status_code == 200 and "gpus" in r.json()
            assert httpx.get(f"{ready.url}/v1/health", timeout=10, verify=pinned).status_code == 401
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
            httpx.get(f"{ready.url}/v1/health", timeout=2, verify=pinned)
