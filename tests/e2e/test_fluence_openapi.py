"""The generation-B publish → status → down flow speaks Fluence's PUBLISHED API: every request the Fluence client
sends and every answer the fake Fluence API gives is validated with openapi-core against Fluence's OpenAPI
document v0.10.0 (read from ``<repo>/../shared/reference``; skipped when absent, failed when ``CI`` is set).

The exchanges are recorded below the client (an httpx transport), so what is checked is what went over the
wire: parameters, bodies, the API-key header, statuses; properties the document does not define fail too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eth_account.signers.local import LocalAccount

from depin_core.net import free_port
from serving.fluence import FluenceClient
from serving.fluence.publisher import FluencePublisher
from serving.fluence.settings import FluenceSettings
from tests.support.fakes.fluence import FakeFluence
from tests.support.fluence_openapi import (
    RecordingTransport,
    exchange_problems,
    operation_of,
    spec_or_skip,
)

# what the flow must have exercised (method, path template of the document)
FLOW_OPERATIONS = {
    ("GET", "/v2/vms"),  # generation detection (authenticated) and reconcile-by-name
    ("GET", "/v1/clusters"),
    ("GET", "/v1/datacenters"),  # where each cluster's dcId is (replicas: one datacenter each)
    ("GET", "/v1/configurations/virtual_machines"),
    ("POST", "/v1/prices/cost"),
    ("GET", "/v1/storages/default_images"),
    ("GET", "/v1/ssh_keys"),
    ("POST", "/v1/ssh_keys"),
    ("POST", "/v2/vms"),
    ("GET", "/v2/vms/{vm_id}"),
    ("GET", "/v1/security_groups"),
    ("POST", "/v1/security_groups"),
    ("GET", "/v2/vms/{vm_id}/interfaces"),
    ("PATCH", "/v2/vms/{vm_id}/interfaces/{interface_id}"),
    ("POST", "/v2/vms/{vm_id}/terminate"),
    ("POST", "/v1/security_groups/delete"),
}


@pytest.mark.e2e
def test_gen_b_publish_status_down_conforms_to_the_published_spec(
    range_artifact: Path, publisher: LocalAccount, tmp_path: Path
) -> None:
    spec = spec_or_skip()
    recorder = RecordingTransport()
    settings = FluenceSettings(
        target="spec",
        port=free_port(),
        state_dir=tmp_path / "fluence",
        poll_s=0.05,
        vm_timeout_s=30.0,
        ready_timeout_s=120.0,
    )
    with FakeFluence("B", step_s=0.05) as fake:
        client = FluenceClient(fake.api_key, base_url=fake.url, backoff_s=0.01, transport=recorder)
        options = {"retries": 3, "backoff_s": 0.05, "timeout": 60}
        with FluencePublisher(client, publisher, settings, own_client=True, gateway_options=options) as pub:
            result = pub.publish(range_artifact, "range", alias="prod")
            shown = pub.status()
            gone = pub.down()
        assert result.created and shown["deployments"][0]["ready"]
        assert gone["deleted"][0]["problems"] == [] and fake.live_gateways() == 0

    exchanges = recorder.exchanges
    assert exchanges, "the client made no Fluence call"
    uncovered = [
        str(ex) for ex in exchanges if operation_of(spec, ex.request.method, ex.request.url.path) is None
    ]
    assert uncovered == [], f"calls the published document does not have: {uncovered}"
    bad = {f"#{i} {ex}": exchange_problems(spec, ex) for i, ex in enumerate(exchanges)}
    bad = {k: v for k, v in bad.items() if v}
    assert bad == {}, json.dumps(bad, indent=1)[:6000]

    seen = set()
    for ex in exchanges:
        found = operation_of(spec, ex.request.method, ex.request.url.path)
        assert found is not None
        seen.add((ex.request.method, found[0]))
    assert seen >= FLOW_OPERATIONS, f"not exercised: {sorted(FLOW_OPERATIONS - seen)}"

    # the points of the issue, on the wire
    (create_sg,) = [
        ex for ex in exchanges if (ex.request.method, ex.request.url.path) == ("POST", "/v1/security_groups")
    ]
    body = json.loads(create_sg.request.content)
    assert isinstance(body["ingressRules"], list) and "egressRules" not in body  # arrays; egress: allow all
    (create_vm,) = [ex for ex in exchanges if (ex.request.method, ex.request.url.path) == ("POST", "/v2/vms")]
    os_image = json.loads(create_vm.request.content)["bootDisk"]["osImage"]
    assert os_image.startswith("https://") and os_image.endswith(".img")  # the image URL, not its id
    first = exchanges[0]
    assert (first.request.method, first.request.url.path) == ("GET", "/v2/vms")  # detection is authenticated
    assert not any(ex.request.url.path == "/v1/service/status" for ex in exchanges)
    assert all(ex.request.headers.get("x-api-key") == fake.api_key.get_secret_value() for ex in exchanges)
    vm_gets = [
        ex
        for ex in exchanges
        if ex.request.method == "GET"
        and ex.request.url.path.count("/") == 3
        and ex.response.status_code == 200
        and ex.request.url.path.startswith("/v2/vms/")
    ]
    assert vm_gets and all("expand[0]" in ex.request.url.params for ex in vm_gets)
    addresses = [(json.loads(ex.response.content).get("expanded") or {}).get("publicIp") for ex in vm_gets]
    assert any(a and a.get("address") for a in addresses)  # the expanded public IP carries the address


@pytest.mark.e2e
@pytest.mark.parametrize("failure", ["no_offer", "failed_vm", "insufficient_balance"])
def test_gen_b_failure_paths_conform_to_the_published_spec(
    failure: str, publisher: LocalAccount, tmp_path: Path
) -> None:
    """The refusals (422 ``{code, error}``) and the clean-up after a failed VM (terminate, security groups)
    conform too. No gateway starts, so an empty model directory does."""
    from depin_core.errors import DepinError
    from serving.fluence import InsufficientBalance, NoOffer
    from serving.fluence.errors import VmFailed

    spec = spec_or_skip()
    recorder = RecordingTransport()
    model = tmp_path / "model"
    model.mkdir()
    settings = FluenceSettings(target="spec", port=free_port(), state_dir=tmp_path / "fluence", poll_s=0.05)
    expected: type[DepinError] = {
        "no_offer": NoOffer,
        "failed_vm": VmFailed,
        "insufficient_balance": InsufficientBalance,
    }[failure]
    with FakeFluence("B", step_s=0.05) as fake:
        fake.no_offer = failure == "no_offer"
        fake.insufficient_balance = failure == "insufficient_balance"
        fake.fail_next = "failed" if failure == "failed_vm" else None
        client = FluenceClient(fake.api_key, base_url=fake.url, backoff_s=0.01, transport=recorder)
        with FluencePublisher(client, publisher, settings, own_client=True) as pub, pytest.raises(expected):
            pub.publish(model, "range")
        assert [v for v in fake.vms() if not v["ended"]] == []
    statuses = {ex.response.status_code for ex in recorder.exchanges}
    assert (422 in statuses) == (failure != "failed_vm")
    if failure == "failed_vm":
        assert any(ex.request.url.path.endswith("/terminate") for ex in recorder.exchanges)
    bad = {f"#{i} {ex}": exchange_problems(spec, ex) for i, ex in enumerate(recorder.exchanges)}
    bad = {k: v for k, v in bad.items() if v}
    assert bad == {}, json.dumps(bad, indent=1)[:6000]
