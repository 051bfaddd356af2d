"""Contract tests of ``FluenceClient`` against the fake Fluence API (both generations, GPU containers): auth
headers, error mapping, retries, pagination, lifecycles, billing fields, failure injection. No gateway is started
here (see test_fake_gateway.py)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from pydantic import SecretStr

from depin_core.errors import ConfigError, PermanentError, TransientError
from depin_core.net import free_port
from serving.fluence import (
    FluenceAuthError,
    FluenceClient,
    FluenceNotFound,
    FluenceRefused,
    FluenceUnavailable,
    InsufficientBalance,
    NoOffer,
    NotTerminable,
)
from serving.fluence._client import parse_error
from serving.fluence._gen_b import MAX_USER_DATA_BYTES
from tests.support.fakes.fluence import DEFAULT_IMAGES, FakeFluence

PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test@depin"
IMAGE = DEFAULT_IMAGES[0]["downloadUrl"]


@pytest.fixture
def fake_a() -> Iterator[FakeFluence]:
    with FakeFluence("A", step_s=0.1) as fake:
        yield fake


@pytest.fixture
def fake_b() -> Iterator[FakeFluence]:
    with FakeFluence("B", step_s=0.1) as fake:
        yield fake


def client(fake: FakeFluence, **kw: object) -> FluenceClient:
    sleeps: list[float] = []
    c = FluenceClient(fake.api_key, base_url=fake.url, retries=2, backoff_s=0.01, sleep=sleeps.append, **kw)  # type: ignore[arg-type]
    c.sleeps = sleeps  # type: ignore[attr-defined]
    return c


def wait_status(get, wanted: set[str], timeout_s: float = 20.0) -> list[str]:  # type: ignore[no-untyped-def]
    """Poll ``get()`` (→ status) until it is in ``wanted``; every distinct status seen, in order."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = get()
        if not seen or seen[-1] != status:
            seen.append(status)
        if status in wanted:
            return seen
        time.sleep(0.02)
    raise AssertionError(f"status never reached {wanted}: {seen}")


def b_vm(c: FluenceClient, name: str = "depin-gw", **kw: object):  # type: ignore[no-untyped-def]
    cluster = c.b.clusters()[0]
    config = c.b.configurations()[0]
    return c.b.create_vm(
        cluster_id=cluster.id,
        name=name,
        configuration_id=config.id,
        boot_disk=c.b.boot_disk(cluster.id, name),
        **kw,  # type: ignore[arg-type]
    )


# ---- generation detection and auth ------------------------------------------------------------------------------
def test_detects_each_generation(fake_a: FakeFluence, fake_b: FakeFluence) -> None:
    assert client(fake_a).generation == "A"
    assert client(fake_b).generation == "B"
    # the public /v1/service/status answers on the shared host for generation-A accounts too: not a signal
    assert httpx.get(f"{fake_a.url}/v1/service/status").status_code == 200
    for fake in (fake_a, fake_b):
        first = fake.requests[0]
        assert (first["method"], first["path"]) == ("GET", "/v2/vms") and first["x_api_key"]
        assert all(r["path"] != "/v1/service/status" for r in fake.requests if r["x_api_key"])


def test_generation_setting_skips_detection(fake_b: FakeFluence, monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.fluence.settings import FluenceSettings

    monkeypatch.setenv("DEPIN_FLUENCE_API_KEY", fake_b.api_key.get_secret_value())
    monkeypatch.setenv("DEPIN_FLUENCE_URL", fake_b.url)
    monkeypatch.setenv("DEPIN_FLUENCE_GENERATION", "b")
    settings = FluenceSettings()
    assert settings.generation == "B"
    with settings.client() as c:
        assert c.generation == "B" and fake_b.requests == []
    monkeypatch.setenv("DEPIN_FLUENCE_GENERATION", "C")
    with pytest.raises(ConfigError, match="DEPIN_FLUENCE_GENERATION"):
        FluenceSettings()


def test_given_generation_skips_detection(fake_b: FakeFluence) -> None:
    c = client(fake_b, generation="B")
    assert c.generation == "B"
    assert fake_b.requests == []


def test_sends_the_documented_header_forms(fake_a: FakeFluence, fake_b: FakeFluence) -> None:
    """X-API-KEY everywhere; generation B also ``Authorization: X-API-KEY <key>``; never a Bearer."""
    ca, cb = client(fake_a, generation="A"), client(fake_b, generation="B")
    ca.a.list()
    ca.gpu.plans()
    cb.b.clusters()
    by_path = {r["path"]: r for r in fake_a.requests + fake_b.requests}
    for path in ("/vms/v3", "/gpu/plans/"):
        assert by_path[path]["x_api_key"] and by_path[path]["authorization"] is None
    assert by_path["/v1/clusters"]["x_api_key"] and by_path["/v1/clusters"]["authorization"] == "X-API-KEY"
    assert by_path["/v1/clusters"]["authorization_ok"]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"X-API-KEY": "{key}"}, 200),
        ({"Authorization": "X-API-KEY {key}"}, 200),
        ({"X-API-KEY": "{key}", "Authorization": "X-API-KEY {key}"}, 200),
        ({"Authorization": "Bearer {key}"}, 401),  # B's Bearer is a console JWT
        ({"X-API-KEY": "{key}", "Authorization": "X-API-KEY wrong"}, 401),
        ({}, 401),
    ],
)
def test_fake_b_accepts_both_published_key_forms(
    fake_b: FakeFluence, headers: dict[str, str], status: int
) -> None:
    key = fake_b.api_key.get_secret_value()
    r = httpx.get(f"{fake_b.url}/v1/clusters", headers={k: v.format(key=key) for k, v in headers.items()})
    assert r.status_code == status
    if status == 401:
        assert r.json() == {"code": "unauthorized", "error": "Auth token invalid or missing"}


def test_wrong_key_is_a_permanent_auth_error_without_the_key(
    fake_a: FakeFluence, fake_b: FakeFluence
) -> None:
    secret = "wrong-key-5f3a9c0d1e2b"
    for fake, status in ((fake_a, 403), (fake_b, 401)):
        c = FluenceClient(SecretStr(secret), base_url=fake.url, generation=fake.generation, retries=0)  # type: ignore[arg-type]
        with pytest.raises(FluenceAuthError) as info:
            c.a.list() if fake.generation == "A" else c.b.clusters()
        assert info.value.status == status
        assert isinstance(info.value, PermanentError)
        assert "DEPIN_FLUENCE_API_KEY" in str(info.value)
        assert secret not in str(info.value) and secret not in repr(c)


def test_detection_with_a_wrong_key_raises_auth_error(fake_a: FakeFluence) -> None:
    c = FluenceClient(SecretStr("nope-nope-nope"), base_url=fake_a.url, retries=0)
    with pytest.raises(FluenceAuthError):
        c.detect_generation()


def test_config_errors() -> None:
    with pytest.raises(ConfigError):
        FluenceClient("plain-string-key")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        FluenceClient(SecretStr(" "))
    with pytest.raises(ConfigError):
        FluenceClient(SecretStr("k"), base_url="api.fluence.dev")


# ---- error mapping and retries ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "body", "code", "message"),
    [
        (422, {"error": "No suitable offer found"}, "unprocessable_entity", "No suitable offer found"),
        (400, {"code": "bad_request", "error": "Wrong parameters"}, "bad_request", "Wrong parameters"),
        (409, {"code": "insufficient_balance", "error": "top up"}, "insufficient_balance", "top up"),
        (500, b"<html>oops</html>", "http_error", "<html>oops</html>"),
        (400, {"detail": "Plan no longer available"}, "bad_request", "Plan no longer available"),
        (
            400,
            {"detail": "Insufficient balance to deploy instance"},
            "insufficient_balance",
            "Insufficient balance to deploy instance",
        ),
        (
            422,
            {
                "detail": [
                    {
                        "type": "value_error",
                        "loc": ["body", "container_settings", "expose", 0, "port"],
                        "msg": "Value error, Port must be between 1 and 65535",
                        "input": "999999999",
                    }
                ]
            },
            "unprocessable_entity",
            "container_settings.expose.0.port: Value error, Port must be between 1 and 65535",
        ),
    ],
)
def test_parse_error_shapes(status: int, body: object, code: str, message: str) -> None:
    kw = {"json": body} if not isinstance(body, bytes) else {"content": body}
    assert parse_error(httpx.Response(status, **kw)) == (code, message)  # type: ignore[arg-type]


def test_gpu_detail_errors_are_classified() -> None:
    from serving.fluence._client import refused

    poor = refused(
        httpx.Response(400, json={"detail": "Insufficient balance to deploy instance"}), "POST /gpu"
    )
    assert isinstance(poor, InsufficientBalance) and isinstance(poor, PermanentError)
    assert "top up" in str(poor)
    gone = refused(httpx.Response(400, json={"detail": "Plan no longer available"}), "POST /gpu")
    assert isinstance(gone, NoOffer)


def test_transient_errors_are_retried_honouring_retry_after(fake_b: FakeFluence) -> None:
    c = client(fake_b, generation="B")
    fake_b.inject_errors(503, times=1, retry_after=0.7)
    fake_b.inject_errors(429, times=1)
    assert c.b.clusters()
    assert len(c.sleeps) == 2  # type: ignore[attr-defined]
    assert 0.7 * 0.8 <= c.sleeps[0] <= 0.7 * 1.2  # type: ignore[attr-defined]


def test_retries_give_up_with_a_transient_error(fake_a: FakeFluence) -> None:
    c = client(fake_a, generation="A")
    fake_a.inject_errors(502, times=3, retry_after=2)
    with pytest.raises(FluenceUnavailable) as info:
        c.a.list()
    assert isinstance(info.value, TransientError)
    assert info.value.retry_after == 2
    assert "3 attempts" in str(info.value)


def test_vm_create_is_not_resent_after_a_5xx_but_is_after_429(fake_b: FakeFluence) -> None:
    c = client(fake_b, generation="B")
    cluster, config = c.b.clusters()[0], c.b.configurations()[0]
    disk = str(uuid.uuid4())  # an existing storage id
    fake_b.inject_errors(503)
    with pytest.raises(FluenceUnavailable, match="list the resources"):
        c.b.create_vm(cluster_id=cluster.id, name="x", configuration_id=config.id, boot_disk=disk)
    posts = [r for r in fake_b.requests if r["method"] == "POST" and r["path"] == "/v2/vms"]
    assert len(posts) == 1
    fake_b.inject_errors(429)
    vm = c.b.create_vm(cluster_id=cluster.id, name="x", configuration_id=config.id, boot_disk=disk)
    assert [v.id for v in c.b.find("x")] == [vm.id]


def test_unreachable_api_is_transient() -> None:
    c = FluenceClient(
        SecretStr("k"),
        base_url=f"http://127.0.0.1:{free_port()}",
        generation="A",
        retries=1,
        sleep=lambda s: None,
    )
    with pytest.raises(FluenceUnavailable, match="cannot connect"):
        c.a.list()


# ---- generation A -----------------------------------------------------------------------------------------------
def test_gen_a_lifecycle_billing_and_ports(fake_a: FakeFluence) -> None:
    c = client(fake_a)
    fake_a.price_per_epoch_usd = 3.25
    est = c.a.estimate({"basicConfiguration": "cpu-2-ram-4gb-storage-25gb"}, instances=2)
    assert (est.total_price_per_epoch, est.deposit_epochs, est.deposit_amount_usdc) == (6.5, 2, 13.0)
    assert est.max_price_per_epoch == 3.25
    offers = c.a.offers({})
    assert offers and offers[0].configuration.price == 3.25 and offers[0].available_instances > 0
    assert c.a.basic_configurations()
    image = c.a.default_images()[0]
    assert image.username == "ubuntu"
    created = c.a.create(name="depin-gw", os_image=image.download_url, ssh_keys=[PUB], open_ports=[8787])
    vm_id = created[0].vm_id
    assert created[0].vm_name == "depin-gw"
    seen = wait_status(lambda: c.a.get(vm_id).status, {"Active"})  # type: ignore[union-attr]
    assert seen[-2:] == ["Launching", "Active"]
    vm = c.a.get(vm_id)
    assert vm is not None and vm.ready and vm.public_ip == "127.0.0.1"
    assert vm.price_per_epoch == 3.25
    assert {(p.port, p.protocol) for p in vm.ports} == {(22, "tcp"), (8787, "tcp")}  # 22 added by the client
    assert [s.id for s in c.a.status()] == [vm_id]
    c.a.update(vm_id, open_ports=[22, 9000])
    assert {p.port for p in c.a.get(vm_id).ports} == {22, 9000}  # type: ignore[union-attr]
    assert [v.id for v in c.a.find("depin-gw")] == [vm_id]
    c.a.delete([vm_id])
    c.a.delete([vm_id])  # already gone: no error
    assert c.a.get(vm_id) is None


def test_gen_a_port_rules_are_checked_before_sending(fake_a: FakeFluence) -> None:
    c = client(fake_a, generation="A")
    before = len(fake_a.requests)
    with pytest.raises(ConfigError, match="include 22"):
        c.a.update("0xabc", open_ports=[8787])
    with pytest.raises(ConfigError, match="10250"):
        c.a.create(name="gw", os_image=IMAGE, ssh_keys=[PUB], open_ports=[10250])
    with pytest.raises(ConfigError, match="letters, digits"):
        c.a.create(name="bad name", os_image=IMAGE, ssh_keys=[PUB])
    assert len(fake_a.requests) == before


def test_gen_a_fake_validates_bodies(fake_a: FakeFluence) -> None:
    c = client(fake_a, generation="A")
    body = {
        "instances": 1,
        "vmConfiguration": {"name": "gw", "openPorts": [{"port": "80"}], "osImage": IMAGE},
    }
    with pytest.raises(FluenceRefused) as info:
        c.request("POST", "/vms/v3", gen="A", json=body)
    assert info.value.status == 400 and "openPorts" in info.value.api_message
    body["vmConfiguration"]["openPorts"] = []  # type: ignore[index]
    body["vmConfiguration"]["osImage"] = "https://example.com/image.iso"  # type: ignore[index]
    with pytest.raises(FluenceRefused, match="osImage"):
        c.request("POST", "/vms/v3", gen="A", json=body)
    with pytest.raises(FluenceNotFound):
        c.request("PATCH", "/vms/v3", gen="A", json={"updates": [{"id": "0x00", "vmName": "x"}]})


def test_gen_a_no_offer_and_price_cap(fake_a: FakeFluence) -> None:
    c = client(fake_a, generation="A")
    fake_a.price_per_epoch_usd = 5.0
    with pytest.raises(NoOffer):
        c.a.estimate({"maxTotalPricePerEpochUsd": "4.99"})
    assert c.a.offers({"maxTotalPricePerEpochUsd": "4.99"}) == []
    assert c.a.estimate({"maxTotalPricePerEpochUsd": "5.00"}).total_price_per_epoch == 5.0
    fake_a.no_offer = True
    with pytest.raises(NoOffer) as info:
        c.a.create(name="gw", os_image=IMAGE, ssh_keys=[PUB])
    assert info.value.status == 422 and "No suitable offer found" in str(info.value)
    assert c.a.list() == []


def test_gen_a_injected_failure_terminates_the_vm(fake_a: FakeFluence) -> None:
    c = client(fake_a, generation="A")
    fake_a.fail_next = "failed"
    vm_id = c.a.create(name="gw", os_image=IMAGE, ssh_keys=[PUB])[0].vm_id
    wait_status(lambda: c.a.get(vm_id).status, {"Terminated", "Active"})  # type: ignore[union-attr]
    vm = c.a.get(vm_id)
    assert vm is not None and vm.status == "Terminated" and vm.gone and not vm.ready
    second = c.a.create(name="gw2", os_image=IMAGE, ssh_keys=[PUB])[0].vm_id  # the knob is one-shot
    assert wait_status(lambda: c.a.get(second).status, {"Terminated", "Active"})[-1] == "Active"  # type: ignore[union-attr]


# ---- generation B -----------------------------------------------------------------------------------------------
def test_gen_b_lifecycle_billing_and_security_group(fake_b: FakeFluence) -> None:
    c = client(fake_b)
    fake_b.price_hourly_usd = 0.08
    assert c.b.service_status().version
    cluster, config = c.b.clusters()[0], c.b.configurations()[0]
    hourly = c.b.vm_hourly_usd(cluster.id, config.id, volume_gb=25)
    assert hourly == pytest.approx(0.08 + 25 * 0.0001 + 0.005)
    key = c.b.ensure_ssh_key("depin", PUB)
    assert c.b.ensure_ssh_key("depin", PUB + " other-comment").id == key.id  # found, not added twice
    vm = b_vm(c, ssh_key_ids=[key.id])
    assert vm.status == "new" and vm.price_hourly_usd == 0.08 and vm.public_ip_id
    seen = wait_status(lambda: c.b.get_vm(vm.id).status, {"launched"})
    assert seen[-2:] == ["launching", "launched"]
    got = c.b.get_vm(vm.id)
    assert got.ready and got.public_address == "127.0.0.1"
    sg = c.b.create_security_group(cluster_id=cluster.id, name="depin-gw", tcp_ports=[22, 8787])
    assert [r["protocolKind"]["tcp"]["ports"]["exact"]["value"] for r in sg.ingress_rule_list] == [22, 8787]
    assert sg.egress_rules == {"type": "allowAll"}  # egress left out of the request: allow all
    (iface,) = c.b.interfaces(vm.id)
    assert iface.public and iface.security_group_id is None
    c.b.attach_security_group(vm.id, iface.id, sg.id)
    assert c.b.interfaces(vm.id)[0].security_group_id == sg.id
    with pytest.raises(FluenceRefused) as info:  # still attached to a live VM
        c.b.delete_security_group(sg.id)
    assert info.value.status == 409 and info.value.code == "conflict"
    c.b.terminate(vm.id)
    c.b.terminate(vm.id)  # already terminated: no error
    assert c.b.get_vm(vm.id).status == "terminated"
    assert c.b.find("depin-gw")[0].gone  # terminated VMs stay listed
    c.b.delete_security_group(sg.id)
    c.b.delete_security_group(sg.id)  # already gone: no error
    assert c.b.security_groups() == []


def test_gen_b_pagination_walks_every_page(fake_b: FakeFluence) -> None:
    c = client(fake_b, generation="B")
    ids = {b_vm(c, name=f"vm-{i}").id for i in range(5)}
    fake_b.requests.clear()
    vms = c.b.list_vms(per_page=2)
    assert {v.id for v in vms} == ids and len(vms) == 5
    pages = [r for r in fake_b.requests if r["path"] == "/v2/vms"]
    assert len(pages) == 3


def test_gen_b_find_is_exact_although_the_api_filter_is_like(fake_b: FakeFluence) -> None:
    c = client(fake_b, generation="B")
    b_vm(c, name="depin-gw")
    b_vm(c, name="DEPIN-GW")
    b_vm(c, name="depin-gw-2")
    assert len(c.b.list_vms(name="depin-gw")) == 2  # case-insensitive LIKE
    assert [v.name for v in c.b.find("depin-gw")] == ["depin-gw"]


def test_gen_b_without_public_ip_has_no_address(fake_b: FakeFluence) -> None:
    c = client(fake_b, generation="B")
    vm = b_vm(c, public_ip=None)
    wait_status(lambda: c.b.get_vm(vm.id).status, {"launched"})
    assert c.b.get_vm(vm.id).public_address is None
    assert not c.b.interfaces(vm.id)[0].public


def test_gen_b_user_data_cap(fake_b: FakeFluence) -> None:
    c = client(fake_b, generation="B")
    with pytest.raises(ConfigError, match="16 KiB"):
        b_vm(c, cloud_init="#cloud-config\n" + "#" * MAX_USER_DATA_BYTES)
    assert not [r for r in fake_b.requests if r["method"] == "POST"]  # refused before sending
    cluster, config = c.b.clusters()[0], c.b.configurations()[0]
    body = {
        "clusterId": cluster.id,
        "name": "big",
        "configurationId": config.id,
        "bootDisk": str(uuid.uuid4()),
        "cloudInit": {"userData": "é" * (MAX_USER_DATA_BYTES // 2 + 1)},  # bytes, not characters, count
    }
    with pytest.raises(FluenceRefused) as info:
        c.request("POST", "/v2/vms", gen="B", json=body)
    assert info.value.status == 400 and info.value.code == "bad_request"


def test_gen_b_invalid_yaml_fails_the_vm_not_the_request(fake_b: FakeFluence) -> None:
    c = client(fake_b, generation="B")
    vm = b_vm(c, cloud_init="#cloud-config\nwrite_files: [unclosed\n")
    assert vm.status == "new"
    assert wait_status(lambda: c.b.get_vm(vm.id).status, {"failed", "launched"})[-1] == "failed"
    assert c.b.get_vm(vm.id).gone
    assert fake_b.live_gateways() == 0


def test_gen_b_failure_knobs(fake_b: FakeFluence) -> None:
    c = client(fake_b, generation="B")
    fake_b.fail_next = "failed"
    vm = b_vm(c, name="doomed")
    assert wait_status(lambda: c.b.get_vm(vm.id).status, {"failed", "launched"})[-1] == "failed"
    fake_b.no_offer = True
    with pytest.raises(NoOffer) as info:
        b_vm(c, name="none")
    assert info.value.code == "unprocessable_entity"
    fake_b.no_offer, fake_b.insufficient_balance = False, True
    with pytest.raises(InsufficientBalance) as poor:  # permanent: top up first
        b_vm(c, name="poor")
    assert poor.value.code == "insufficient_balance" and isinstance(poor.value, PermanentError)
    assert [v.name for v in c.b.list_vms()] == ["doomed"]


def test_gen_b_fake_validates_create_bodies(fake_b: FakeFluence) -> None:
    c = client(fake_b, generation="B")
    cluster, config = c.b.clusters()[0], c.b.configurations()[0]
    good = {"clusterId": cluster.id, "name": "x", "configurationId": config.id, "bootDisk": str(uuid.uuid4())}
    disk = {"clusterId": cluster.id, "name": "b", "storageType": "NVME", "volumeGb": 25, "replicated": False}
    for field, value, status in (
        ("bootDisk", {**disk, "storageType": "HDD"}, 400),  # new storage is NVME
        ("bootDisk", {**disk, "osImage": DEFAULT_IMAGES[0]["id"]}, 400),  # a URL, not an image id
        ("bootDisk", "disk-1", 400),  # ids are UUIDs
        ("configurationId", "nope", 400),
        ("configurationId", str(uuid.uuid4()), 422),
        ("sshKeys", ["not-a-key-id"], 400),
        ("sshKeys", [str(uuid.uuid4())], 422),
        ("publicIp", {"addressType": "V6", "name": "ip"}, 400),
    ):
        with pytest.raises(FluenceRefused) as info:
            c.request("POST", "/v2/vms", gen="B", json={**good, field: value})
        assert info.value.status == status, field
        assert field in info.value.api_message
    with pytest.raises(FluenceNotFound):
        c.b.get_vm("00000000-0000-0000-0000-000000000000")
    c.b.terminate("00000000-0000-0000-0000-000000000000")  # unknown: not an error


# ---- GPU containers ---------------------------------------------------------------------------------------------
def test_gpu_container_lifecycle_without_gateway(fake_a: FakeFluence) -> None:
    c = client(fake_a, generation="A")
    fake_a.gpu_price_hour = 2.96
    (plan,) = c.gpu.plans()
    assert plan.pricing.hour == 2.96 and plan.pricing.upfront_hours == 3 and plan.gpu_count == 1
    with pytest.raises(ConfigError, match="name"):
        c.gpu.create(plan_id=plan.id, name="Bad_Name", image="ghcr.io/x/y:1", ports=[8000])
    with pytest.raises(ConfigError, match="10 ports"):
        c.gpu.create(plan_id=plan.id, name="gw", image="ghcr.io/x/y:1", ports=list(range(8000, 8011)))
    iid = c.gpu.create(plan_id=plan.id, name="gw", image="ghcr.io/x/y:1", ports=[8000], env={"A": "1"})
    with pytest.raises(NotTerminable, match="only ACTIVE"):  # still INITIALIZED
        c.gpu.delete(iid)
    assert wait_status(lambda: c.gpu.get(iid).instance_status, {"ACTIVE", "FAILED"})[-1] == "ACTIVE"
    inst = c.gpu.get(iid)
    assert inst.ready and inst.network and inst.network.domain == "127.0.0.1" and inst.external_port(8000)
    assert [i.id for i in c.gpu.list()] == [iid]
    assert isinstance(c.gpu.logs(iid, last=5), list)
    c.gpu.delete(iid)
    c.gpu.delete(iid)  # already ENDED: no error (the API refuses to terminate it again)
    assert [(i.id, i.instance_status) for i in c.gpu.list()] == [(iid, "ENDED")]
    fake_a.fail_next = "failed"
    bad = c.gpu.create(plan_id=plan.id, name="gw2", image="ghcr.io/x/y:1", ports=[8000])
    assert wait_status(lambda: c.gpu.get(bad).instance_status, {"ACTIVE", "FAILED"})[-1] == "FAILED"
    c.gpu.delete(bad)  # FAILED: nothing to terminate
    fake_a.insufficient_balance = True
    with pytest.raises(InsufficientBalance) as info:
        c.gpu.create(plan_id=plan.id, name="gw3", image="ghcr.io/x/y:1", ports=[8000])
    assert info.value.status == 400 and "Insufficient balance" in info.value.api_message
    r = httpx.post(  # a field the API rejects: FastAPI's 422 detail list, mapped to a field-naming error
        f"{fake_a.url}/gpu/instances/",
        headers={"X-API-KEY": fake_a.api_key.get_secret_value()},
        json={
            "plan_id": plan.id,
            "name": "gw4",
            "container_settings": {"image": "x", "expose": [{"port": "0"}]},
        },
    )
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "port"


def test_pagination_does_not_depend_on_the_first_page_number() -> None:
    """A server counting pages from 0 (the fake counts from 1) is walked completely too."""
    items = [{"id": f"k{i}", "name": f"k{i}", "publicKey": "ssh-ed25519 AAAA"} for i in range(5)]
    asked: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        page = request.url.params.get("page")
        asked.append(page)
        number, per = int(page or 0), int(request.url.params["perPage"])
        chunk = items[number * per : (number + 1) * per]
        pagination = {
            "totalRecords": 5,
            "filteredRecords": 5,
            "totalPages": 3,
            "currentPage": number,
            "perPage": per,
        }
        return httpx.Response(200, json={"items": chunk, "pagination": pagination})

    c = FluenceClient(
        SecretStr("k"), base_url="http://fluence.test", generation="B", transport=httpx.MockTransport(handler)
    )
    assert [k["id"] for k in c.paginate("/v1/ssh_keys", gen="B", per_page=2)] == [i["id"] for i in items]
    assert asked == [None, "1", "2"]
