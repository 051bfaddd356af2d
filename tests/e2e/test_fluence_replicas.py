"""Fluence serving replicas against the fake Fluence API, both API generations: ``--replicas 2`` puts two gateway
VMs in two datacenters (generation A: two countries; generation B: clusters of two ``dcId``), publishes the same
verified bundle to both (each with its own pinned certificate and admin key) and moves the alias on both;
``depin fluence status`` shows both healthy; ``depin publish --target fluence`` again (no ``--replicas``: as many
as recorded) reuses both; ``--replicas 1`` deletes the second. Refusals before anything is created: too few datacenters, a total above
the price cap. A create that fails for the second replica leaves no VM of that call behind.

The fake gives each VM a loopback address of its own (127.0.0.1, 127.0.0.2, …), so both gateways listen on
the same port, as on two machines.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account.signers.local import LocalAccount
from typer.testing import CliRunner

from depin_core.errors import ConfigError, PermanentError
from depin_core.tls import client_context
from pipelines.cli.serve import run_invoke
from serving.fluence import NoOffer
from serving.fluence.state import StateStore
from serving.fluence.vms import VM_PREFIX
from tests.e2e.test_fluence import cli, cli_env, live_vms, publisher_for, settings_for
from tests.support.fakes.fluence import FakeFluence

TWO_DCS = [("FR", "PAR"), ("DE", "FRA")]


@pytest.fixture(params=["A", "B"])
def fake2(request: pytest.FixtureRequest) -> Iterator[FakeFluence]:
    """A fake Fluence account offering two datacenters."""
    with FakeFluence(request.param, step_s=0.05, datacenters=TWO_DCS) as f:
        yield f


def where(vm: dict[str, Any]) -> str:
    """The datacenter the fake put ``vm`` in."""
    dc = vm["datacenter"]
    return str(dc.get("id") or dc["countryCode"])


def invoke(url: str, pem: str, ref: str, rows: list[Any]) -> dict[str, Any]:
    r = httpx.post(
        f"{url}/v1/functions/{ref}/invoke", json={"inputs": rows}, timeout=60, verify=client_context(pem)
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


@pytest.mark.e2e
def test_two_replicas_in_two_datacenters_publish_status_rerun_shrink(
    fake2: FakeFluence,
    range_artifact: Path,
    publisher: LocalAccount,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = fake2
    settings = settings_for(tmp_path, replicas=2)
    store = StateStore(settings.state_dir)
    with publisher_for(fake, publisher, settings) as pub:
        result = pub.publish(range_artifact, "range", alias="prod")

    vms = sorted(live_vms(fake), key=lambda v: v["name"])
    assert [v["name"] for v in vms] == [VM_PREFIX + "t1", VM_PREFIX + "t1-r1"]
    assert len({where(v) for v in vms}) == 2  # no two replicas in one datacenter
    assert all(v["gateway_alive"] for v in vms)
    deps = store.replicas("t1")
    assert [d.replica for d in deps] == [0, 1] and [d.vm_id for d in deps] == [v["id"] for v in vms]
    assert len({d.datacenter for d in deps}) == 2 and all(d.country in ("FR", "DE") for d in deps)
    urls = [d.url for d in deps]
    assert result.urls == urls and result.target == urls[0] and len(set(urls)) == 2
    # each replica: its own admin key and certificate; the key's sha256 only went to its own VM
    keys = [store.admin_key(d.key).get_secret_value() for d in deps]  # type: ignore[union-attr]
    pems = [store.tls_cert(d.key) or "" for d in deps]
    assert len(set(keys)) == 2 and len(set(pems)) == 2
    assert vms[0]["env"]["DEPIN_GATEWAY_ADMIN_KEY_HASHES"] != vms[1]["env"]["DEPIN_GATEWAY_ADMIN_KEY_HASHES"]
    # the version and the alias on both: invoke each URL, pinned to its own certificate
    rows = httpx.get(f"{urls[0]}/v1/functions/range", timeout=10, verify=client_context(pems[0])).json()[
        "manifest"
    ]["example"]
    for url, pem in zip(urls, pems, strict=True):
        doc = invoke(url, pem, "range@prod", rows)
        assert doc["version"] == result.version and len(doc["outputs"]) == len(rows)
    with pytest.raises(httpx.ConnectError):  # replica 1 does not accept replica 0's certificate
        httpx.get(f"{urls[1]}/readyz", timeout=5, verify=client_context(pems[0]))
    assert all(p.version == result.version for d in store.replicas("t1") for p in d.published)

    # depin fluence status: both replicas, their datacenters, healthy, the version
    shown = cli(fake, settings, "status")
    rows_shown = shown["deployments"]
    assert [(d["replica"], d["url"]) for d in rows_shown] == [(0, urls[0]), (1, urls[1])]
    assert all(d["ready"] and d["readyz_ms"] is not None for d in rows_shown)
    assert {d["country"] for d in rows_shown} == {"FR", "DE"} and all(d["location"] for d in rows_shown)
    assert all(d["latest_version"] == f"range@{result.version}" for d in rows_shown)
    assert not shown["untracked"]

    # depin publish --target fluence again, no --replicas (as many as recorded): both reused, the alias moves on both
    from pipelines.cli import app

    for name, value in cli_env(fake, settings).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DEPIN_FLUENCE_REPLICAS", raising=False)
    monkeypatch.setenv("DEPIN_PUBLISHER_KEY", publisher.key.hex())
    args = ["publish", "--model", str(range_artifact), "--name", "range", "--target", "fluence", "--json"]
    ran = CliRunner().invoke(app, [*args, "--alias", "canary"])
    assert ran.exit_code == 0, ran.output
    again = json.loads(ran.stdout.strip().splitlines()[-1])
    assert again["urls"] == urls and not again["created"] and again["version"] == result.version
    assert [r["vm_id"] for r in again["fluence"]["replicas"]] == [v["id"] for v in vms]
    assert sorted(v["id"] for v in live_vms(fake)) == sorted(v["id"] for v in vms)
    for url, pem in zip(urls, pems, strict=True):
        assert invoke(url, pem, "range@canary", rows[:1])["version"] == result.version
    # depin invoke --target fluence: the first healthy replica (replica 0)
    doc = run_invoke(ref="range@canary", data=json.dumps(rows[:1]), target="fluence", request_id=None)
    assert doc["version"] == result.version

    # --replicas 1: replica 1's VM (and its gateway) deleted, replica 0 kept
    ran = CliRunner().invoke(app, [*args, "--alias", "prod", "--replicas", "1"])
    assert ran.exit_code == 0, ran.output
    single = json.loads(ran.stdout.strip().splitlines()[-1])
    assert single["urls"] == [urls[0]] and not single["created"]
    assert [v["id"] for v in live_vms(fake)] == [vms[0]["id"]]
    assert fake.vm(vms[1]["id"])["ended"] and not fake.vm(vms[1]["id"])["gateway_alive"]
    assert [d.replica for d in store.replicas("t1")] == [0]
    assert not store.key_path("t1.r1").exists() and not store.tls_cert_path("t1.r1").exists()
    if fake.generation == "B":
        assert fake.vm(vms[1]["id"])["security_group"] is None

    gone = cli(fake, settings, "down")
    assert [d["vm_ids"] for d in gone["deleted"] if d["vm_ids"]] == [[vms[0]["id"]]]
    assert live_vms(fake) == [] and fake.live_gateways() == 0 and store.replicas("t1") == []


def nothing_created(fake: FakeFluence, store: StateStore) -> None:
    assert fake.vms() == [] and store.replicas("t1") == []
    assert not any(r["method"] == "POST" and r["path"] in ("/vms/v3", "/v2/vms") for r in fake.requests)


@pytest.mark.e2e
@pytest.mark.parametrize("generation", ["A", "B"])
def test_too_few_datacenters_or_over_the_cap_creates_nothing(
    generation: str, range_artifact: Path, publisher: LocalAccount, tmp_path: Path
) -> None:
    with FakeFluence(generation, step_s=0.05) as fake:  # one datacenter
        settings = settings_for(tmp_path, replicas=2)
        store = StateStore(settings.state_dir)
        with publisher_for(fake, publisher, settings) as pub, pytest.raises(ConfigError) as exc:
            pub.publish(range_artifact, "range")
        message = str(exc.value)
        assert "--replicas 2" in message and "only 1" in message and "nothing was created" in message
        nothing_created(fake, store)
    with FakeFluence(generation, step_s=0.05, datacenters=TWO_DCS) as fake:
        one_vm = 2.4352 if generation == "A" else (0.05 + 0.0025 + 0.005) * 24  # the fake's prices
        settings = settings_for(tmp_path, replicas=2, max_usd_per_day=one_vm * 1.5)
        with publisher_for(fake, publisher, settings) as pub, pytest.raises(ConfigError) as exc:
            pub.publish(range_artifact, "range")
        assert "2 Fluence gateway VMs" in str(exc.value) and "DEPIN_FLUENCE_MAX_USD_PER_DAY" in str(exc.value)
        nothing_created(fake, store)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("generation", "failure"), [("A", "create_refused"), ("B", "create_refused"), ("B", "vm_failed")]
)
def test_a_failing_replica_leaves_no_vm_of_that_call(
    generation: str, failure: str, range_artifact: Path, publisher: LocalAccount, tmp_path: Path
) -> None:
    """Replica 1's create is refused (capacity gone after the estimate) — replica 0, created by the same call,
    is deleted; or replica 0's VM fails while replica 1 comes up — both deleted."""
    with FakeFluence(generation, step_s=0.05, datacenters=TWO_DCS) as fake:
        settings = settings_for(tmp_path, replicas=2)
        store = StateStore(settings.state_dir)
        if failure == "create_refused":
            fake.creates_left = 1
        else:
            fake.fail_next = "failed"
        expected: type[Exception] = NoOffer if failure == "create_refused" else PermanentError
        with publisher_for(fake, publisher, settings) as pub, pytest.raises(expected):
            pub.publish(range_artifact, "range")
        made = fake.vms()
        assert len(made) == (1 if failure == "create_refused" else 2)
        assert live_vms(fake) == [] and fake.live_gateways() == 0
        assert store.replicas("t1") == []
        assert not list(settings.state_dir.glob("t1*"))  # no key or certificate left either
