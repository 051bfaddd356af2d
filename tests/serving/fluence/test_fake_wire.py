"""The fake Fluence API and the client against Fluence's published OpenAPI document (v0.10.0), unit level:

- the conformance checker itself catches what it must (a checker that passes everything proves nothing);
- the fake's request rules (``tests/support/fakes/fluence_wire.py``) accept and refuse what the document does;
- every exchange of a generation-B client session against the fake (no gateway) conforms, errors included.

The document is read from ``<repo>/../shared/reference`` (skipped when absent, failed when ``CI`` is set).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from serving.fluence import FluenceClient, FluenceRefused
from serving.fluence._gen_b import tcp_ingress
from tests.support.fakes.fluence import DEFAULT_IMAGES, FakeFluence
from tests.support.fakes.fluence_wire import body_problem
from tests.support.fluence_openapi import (
    Exchange,
    RecordingTransport,
    body_problems,
    exchange_problems,
    operation_of,
    spec_or_skip,
)

PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test@depin"
C = "3f2b8c1e-5d4a-4e7b-9c6f-1a2b3c4d5e6f"  # a fixed uuid4: test ids must be the same in every process (xdist)
RULE = {
    "type": "ipv4",
    "protocolKind": {"tcp": {"ports": {"exact": {"value": 22}}}},
    "remote": {"address": "0.0.0.0/0"},
}
DISK = {"clusterId": C, "name": "boot", "storageType": "NVME", "volumeGb": 25, "replicated": False}


@pytest.fixture(scope="module")
def spec() -> Any:
    return spec_or_skip()


def exchange(method: str, path: str, status: int, answer: Any, body: Any = None) -> Exchange:
    headers = {"X-API-KEY": "k", "Authorization": "X-API-KEY k"}
    request = httpx.Request(method, f"http://fluence.test{path}", json=body, headers=headers)
    content = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
    response = httpx.Response(status, content=content, headers={"content-type": "application/json"})
    return Exchange(request, response)


def group(**changes: Any) -> dict[str, Any]:
    doc = {
        "id": C,
        "userId": C,
        "clusterId": C,
        "vpcId": C,
        "name": "g",
        "status": "ready",
        "ingressRules": {"type": "allow", "rules": [RULE]},
        "egressRules": {"type": "allowAll"},
        "attachedTo": [],
        "createdAt": "2026-01-01T00:00:00Z",
    }
    return {**doc, **changes}


# ---- the checker ---------------------------------------------------------------------------------------------------
def test_checker_passes_conforming_and_catches_non_conforming_exchanges(spec: Any) -> None:
    ok = [
        exchange("GET", "/v1/clusters", 200, {"items": [{"id": C, "name": "c", "dcId": C}]}),
        exchange(
            "POST", "/v1/security_groups", 200, group(), {"clusterId": C, "name": "g", "ingressRules": [RULE]}
        ),
        exchange("POST", "/v1/security_groups/delete", 200, [group(status="removed")], {"ids": [C]}),
        exchange("POST", f"/v2/vms/{C}/terminate", 404, {"code": "not_found", "error": "VM not found"}),
    ]
    for ex in ok:
        assert exchange_problems(spec, ex) == [], str(ex)
    bad = {
        "rules object in a create": exchange(
            "POST",
            "/v1/security_groups",
            200,
            group(),
            {"clusterId": C, "name": "g", "ingressRules": {"type": "allow", "rules": [RULE]}},
        ),
        "bare cluster list": exchange("GET", "/v1/clusters", 200, [{"id": C, "name": "c", "dc_id": C}]),
        "empty delete answer": exchange("POST", "/v1/security_groups/delete", 200, b"", {"ids": [C]}),
        "undeclared request field": exchange(
            "POST", "/v1/security_groups/delete", 200, [], {"ids": [C], "force": True}
        ),
        "undeclared answer field": exchange(
            "GET", "/v1/clusters", 200, {"items": [{"id": C, "name": "c", "dcId": C, "x": 1}]}
        ),
        "not an ErrorBody": exchange("POST", f"/v2/vms/{C}/terminate", 406, {"error": "not allowed"}),
        "no X-API-KEY on a JWT-only operation": Exchange(
            httpx.Request("GET", "http://fluence.test/v1/ssh_keys", headers={"Authorization": "X-API-KEY k"}),
            httpx.Response(
                200,
                json={
                    "items": [],
                    "pagination": {
                        "totalRecords": 0,
                        "filteredRecords": 0,
                        "totalPages": 0,
                        "currentPage": 1,
                        "perPage": 10,
                    },
                },
            ),
        ),
    }
    for what, ex in bad.items():
        assert exchange_problems(spec, ex), what
    with pytest.raises(LookupError):  # generation A is not in the document
        exchange_problems(spec, exchange("GET", "/vms/v3", 200, []))
    assert operation_of(spec, "POST", f"/v2/vms/{C}/terminate") is not None


# ---- the fake's rules vs the document ------------------------------------------------------------------------------
VM = {
    "clusterId": C,
    "name": "vm",
    "configurationId": C,
    "bootDisk": {**DISK, "osImage": DEFAULT_IMAGES[0]["downloadUrl"]},
}
CASES: list[tuple[str, str, Any]] = [
    ("POST", "/v1/security_groups", {"clusterId": C, "name": "g", "ingressRules": tcp_ingress([22, 8787])}),
    ("POST", "/v1/security_groups", {"clusterId": C, "name": "g", "ingressRules": None, "egressRules": []}),
    (
        "POST",
        "/v1/security_groups",
        {"clusterId": C, "name": "g", "ingressRules": {"type": "allow", "rules": [RULE]}},
    ),
    ("POST", "/v1/security_groups", {"clusterId": C, "name": "g", "egressRules": {"type": "allowAll"}}),
    (
        "POST",
        "/v1/security_groups",
        {"clusterId": C, "name": "g", "ingressRules": [{**RULE, "remote": None}]},
    ),
    ("POST", "/v1/security_groups", {"clusterId": C, "name": "g", "ingressRules": [{**RULE, "type": "tcp"}]}),
    (
        "POST",
        "/v1/security_groups",
        {
            "clusterId": C,
            "name": "g",
            "ingressRules": [{**RULE, "protocolKind": {"tcp": {"ports": {"exact": {"value": "22"}}}}}],
        },
    ),
    ("POST", "/v1/security_groups", {"name": "g"}),
    ("POST", "/v2/vms", VM),
    (
        "POST",
        "/v2/vms",
        {**VM, "bootDisk": C, "publicIp": {"clusterId": C, "name": "ip", "addressType": "V4"}},
    ),
    ("POST", "/v2/vms", {**VM, "bootDisk": "disk-1"}),
    ("POST", "/v2/vms", {**VM, "bootDisk": {**DISK, "storageType": "HDD"}}),
    ("POST", "/v2/vms", {**VM, "publicIp": {"clusterId": C, "name": "ip", "addressType": "V6"}}),
    ("POST", "/v2/vms", {**VM, "cloudInit": {"userData": 5}}),
    ("POST", "/v2/vms", {**VM, "sshKeys": ["not-a-uuid"]}),
    ("POST", "/v2/vms", {k: v for k, v in VM.items() if k != "name"}),
    ("PATCH", f"/v2/vms/{C}/interfaces/{C}", {"securityGroupId": C}),
    ("PATCH", f"/v2/vms/{C}/interfaces/{C}", {"securityGroupId": None}),
    ("PATCH", f"/v2/vms/{C}/interfaces/{C}", {"securityGroupId": "sg-1"}),
    ("POST", "/v1/security_groups/delete", {"ids": [C]}),
    ("POST", "/v1/security_groups/delete", {"ids": ["sg-1"]}),
    ("POST", "/v1/security_groups/delete", {}),
    ("POST", "/v1/ssh_keys", {"name": "k", "publicKey": PUB}),
    ("POST", "/v1/ssh_keys", {"name": "k"}),
    (
        "POST",
        "/v1/prices/cost",
        {"resources": [{"vm": {"resource_id": {"clusterId": C, "vmConfigurationId": C}}}], "secs": 3600},
    ),
    ("POST", "/v1/prices/cost", {"resources": [{"vm": {"resource_id": {"clusterId": C}}}]}),
    (
        "POST",
        "/v1/prices/cost",
        {
            "resources": [
                {"storage": {"resource_id": {"clusterId": C, "storageType": "NVME", "replicated": False}}}
            ]
        },
    ),
]


@pytest.mark.parametrize(("method", "path", "body"), CASES)
def test_fake_rules_agree_with_the_document(spec: Any, method: str, path: str, body: Any) -> None:
    route = operation_of(spec, method, path)
    assert route is not None
    spec_says = body_problems(spec, method, path, body, undeclared_ok=True)
    fake_says = body_problem(method, route[0], body)
    assert (fake_says is None) == (spec_says == []), f"fake: {fake_says}; document: {spec_says}"


# ---- a client session against the fake ----------------------------------------------------------------------------
@pytest.fixture
def fake_b() -> Iterator[FakeFluence]:
    with FakeFluence("B", step_s=0.05) as fake:
        yield fake


def test_gen_b_client_session_conforms(spec: Any, fake_b: FakeFluence) -> None:
    recorder = RecordingTransport()
    with FluenceClient(fake_b.api_key, base_url=fake_b.url, transport=recorder, retries=0) as c:
        assert c.generation == "B"
        cluster, config = c.b.clusters()[0], c.b.configurations()[0]
        image = c.b.default_images()[0]
        assert c.b.vm_hourly_usd(cluster.id, config.id, volume_gb=25) > 0
        key = c.b.ensure_ssh_key("depin", PUB)
        disk = c.b.boot_disk(cluster.id, "gw", os_image=image.download_url)
        vm = c.b.create_vm(
            cluster_id=cluster.id, name="gw", configuration_id=config.id, boot_disk=disk, ssh_key_ids=[key.id]
        )
        sg = c.b.create_security_group(cluster_id=cluster.id, name="gw", tcp_ports=[22, 8787])
        (iface,) = c.b.interfaces(vm.id)
        c.b.attach_security_group(vm.id, iface.id, sg.id)
        assert c.b.security_groups()[0].attached_to == [iface.id]
        with pytest.raises(FluenceRefused):  # attached to a live VM: 409, an ErrorBody
            c.b.delete_security_group(sg.id)
        assert c.b.get_vm(vm.id).public_ip_id
        assert [v.id for v in c.b.find("gw")] == [vm.id]
        c.b.terminate(vm.id)
        c.b.terminate(vm.id)  # 406 then a GET: not an error
        c.b.delete_security_group(sg.id)
        c.b.delete_security_group(sg.id)  # 404: not an error
        # the fake refuses what the document refuses, with the document's error shape
        with pytest.raises(FluenceRefused) as info:
            body = {
                "clusterId": cluster.id,
                "name": "x",
                "ingressRules": {"type": "allow", "rules": tcp_ingress([22])},
            }
            c.request("POST", "/v1/security_groups", gen="B", json=body)
        assert info.value.status == 400 and info.value.code == "bad_request"
        assert info.value.api_message.startswith("ingressRules")
    bad = {str(ex): exchange_problems(spec, ex) for ex in recorder.exchanges}
    # the deliberately wrong request above is the one non-conforming REQUEST; its answer conforms
    wrong = [k for k, v in bad.items() if v]
    assert len(wrong) == 1 and wrong[0].startswith("POST /v1/security_groups → 400"), json.dumps(
        bad, indent=1
    )
    assert all(p.startswith("request:") for p in bad[wrong[0]])


def test_gen_b_older_snapshot_lists_are_read(fake_b: FakeFluence) -> None:
    """Bare lists and ``dc_id`` (the 0.8.210 snapshot) parse as well as ``{"items"}`` and ``dcId``."""
    with FluenceClient(fake_b.api_key, base_url=fake_b.url, generation="B") as c:
        current = (c.b.clusters(), c.b.configurations(), c.b.default_images())
        fake_b.legacy_lists = True
        legacy = (c.b.clusters(), c.b.configurations(), c.b.default_images())
    assert current == legacy and current[0][0].dc_id == fake_b.cluster["dcId"]
    assert isinstance(httpx.get(f"{fake_b.url}/v1/storages/default_images").json(), list)


def test_boot_disk_takes_an_image_url_not_an_id() -> None:
    from depin_core.errors import ConfigError
    from serving.fluence._gen_b import V2Cluster

    with pytest.raises(ConfigError, match="image URL"):
        V2Cluster.boot_disk(C, "gw", os_image=DEFAULT_IMAGES[0]["id"])
    assert V2Cluster.boot_disk(C, "gw", os_image=DEFAULT_IMAGES[0]["downloadUrl"])["osImage"].endswith(".img")
