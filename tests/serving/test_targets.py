"""The publish targets (``serving.targets``): one contract, run against each implementation — the local
registry directory, a real gateway process over its admin API, and the gateway on a Fluence VM (the fake
Fluence API really runs that gateway, over pinned TLS) — and ``publish_function``'s order: publish → smoke
call → alias move, with a failed smoke call leaving the alias where it was."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from pydantic import SecretStr

from depin_core.errors import ConfigError, PermanentError
from depin_core.net import free_port
from serving._auth import new_admin_key
from serving.bundle import canonical_json, content_version, sign_manifest
from serving.fluence import FluenceClient
from serving.fluence.publisher import FluencePublisher
from serving.fluence.settings import FluenceSettings
from serving.fluence.state import StateStore
from serving.fluence.target import FluenceTarget
from serving.server import GatewayProcess
from serving.settings import GatewaySettings
from serving.targets import GatewayTarget, LocalTarget, Target, publish_function
from tests.support.fakes.fluence import FakeFluence

ADMIN_KEY, ADMIN_HASH = new_admin_key()


@dataclass
class Opened:
    target: Target
    kind: str
    state: StateStore | None = None  # Fluence: the state directory


@pytest.fixture(params=["local", "gateway", "fluence"])
def opened(request: pytest.FixtureRequest, publisher: LocalAccount, tmp_path: Path) -> Iterator[Opened]:
    kind = request.param
    if kind == "local":
        with LocalTarget(tmp_path / "registry", publisher, url="http://127.0.0.1:9") as local:
            yield Opened(local, kind)
        return
    if kind == "gateway":
        settings = GatewaySettings(
            registry_dir=tmp_path / "gw-registry",
            trusted_publishers=[publisher.address],
            admin_key_hashes=[ADMIN_HASH],
            poll_interval_s=0.1,
        )
        with (
            GatewayProcess(settings) as gw,
            GatewayTarget(gw.base_url, publisher, admin_key=lambda: SecretStr(ADMIN_KEY)) as remote,
        ):
            yield Opened(remote, kind)
        return
    with FakeFluence("B", step_s=0.05) as fake:
        fluence_settings = FluenceSettings(
            target="t1",
            port=free_port(),
            state_dir=tmp_path / "fluence",
            poll_s=0.05,
            vm_timeout_s=30.0,
            ready_timeout_s=120.0,
        )

        def open_publisher() -> FluencePublisher:
            client = FluenceClient(fake.api_key, base_url=fake.url, backoff_s=0.01)
            options = {"retries": 3, "backoff_s": 0.05, "timeout": 60}
            return FluencePublisher(
                client, publisher, fluence_settings, own_client=True, gateway_options=options
            )

        store = StateStore(fluence_settings.state_dir)
        try:
            with FluenceTarget(store, "t1", open_publisher, retries=3, backoff_s=0.05) as fluence:
                yield Opened(fluence, kind, store)
        finally:
            with open_publisher() as pub:
                pub.down()


def test_every_target_keeps_the_contract(
    opened: Opened, range_artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = opened.target
    if opened.kind == "fluence":  # nothing is recorded before the first publish: no URL, a clear error
        with pytest.raises(ConfigError, match="no gateway VM recorded"):
            _ = target.url

    # publish: the version is served; only `latest` moved
    first = target.publish(range_artifact, "fn")
    assert isinstance(target, Target)  # (its properties answer once a VM is recorded)
    v = first.version
    assert first.created and first.target == target.where and first.moved == ["latest"]
    assert first.aliases == {"latest": {v: 1.0}}
    manifest = target.manifest("fn", v)
    assert manifest.name == "fn" and manifest.version == v and manifest.example
    rows = list(manifest.example)
    doc = target.invoke(f"fn@{v}", rows)
    assert doc["version"] == v and len(doc["outputs"]) == len(rows)
    assert {"kwh_per_100km", "range_km"} <= set(doc["outputs"][0])
    assert target.invoke("fn", rows[:1])["version"] == v  # latest
    # a request body of another form passes through every target: a plan answers what its engineered row does
    plan = {"km": 120, "mean_speed": 100, "air": -5, "soc": 50}
    planned = target.invoke(f"fn@{v}", {"plan": plan})
    assert planned["version"] == v and set(planned["assumed"]) >= {"hours_per_100km", "stop_share"}
    engineered = target.invoke(f"fn@{v}", [{**plan, **planned["assumed"]}])
    assert planned["outputs"] == engineered["outputs"] and planned["outputs"][0]["range_km"] > 0
    with pytest.raises(PermanentError):
        target.set_alias("fn", "prod", "0" * 16)  # not a version of fn
    assert "prod" not in target.aliases("fn")

    # a smoke call answering the wrong number of rows stops publish_function before the alias moves
    with monkeypatch.context() as patch:
        patch.setattr(
            target, "invoke", lambda ref, rows, **kw: {"function": "fn", "version": v, "outputs": []}
        )
        with pytest.raises(PermanentError, match=r"example rows gave 0 outputs"):
            publish_function(target, range_artifact, "fn", "prod")
    assert "prod" not in target.aliases("fn")
    # …and so does one answered by another version
    with monkeypatch.context() as patch:
        patch.setattr(target, "invoke", lambda ref, rows, **kw: {"version": "f" * 16, "outputs": rows})
        with pytest.raises(PermanentError, match="answered by version ffff"):
            publish_function(target, range_artifact, "fn", "prod")
    assert "prod" not in target.aliases("fn")

    # the whole path: publish (already there) → smoke call → alias
    done = publish_function(target, range_artifact, "fn", "prod")
    result = done.result
    assert result.version == v and not result.created and result.moved == ["prod"]
    assert result.aliases == {"latest": {v: 1.0}, "prod": {v: 1.0}} == target.aliases("fn")
    assert done.alias == "prod" and done.smoke_inputs == len(rows)
    assert len(done.smoke_outputs) == min(5, len(rows))
    assert done.function_url == f"{target.url}/v1/functions/fn@prod/invoke"
    assert done.manifest_url == f"{target.url}/v1/functions/fn/versions/{v}/manifest.json"
    assert target.invoke("fn@prod", rows[:1])["version"] == v
    if opened.kind == "fluence":  # the state file has the version and the aliases its publish moved
        assert opened.state is not None
        dep = opened.state.get("t1")
        assert dep is not None and target.url == dep.url and target.url.startswith("https://")
        assert target.details()["fluence"]["vm_id"] == dep.vm_id
        (item,) = dep.published
        assert (item.name, item.version, item.moved) == ("fn", v, ["prod"])
    else:
        assert target.details() == {}
    again = publish_function(target, range_artifact, "fn", "prod")
    assert again.result.version == v and again.result.moved == []
    bare = publish_function(target, range_artifact, "fn")  # no alias: the URL names the version
    assert bare.function_url.endswith(f"/v1/functions/fn@{v}/invoke") and bare.result.moved == []


def _with_example(bundle_dir: Path, account: LocalAccount, example: list[dict[str, Any]]) -> None:
    """Give the bundle another example (a new version), signed again by ``account``."""
    manifest = json.loads((bundle_dir / "manifest.json").read_bytes())
    manifest["example"] = example
    manifest["version"] = content_version(manifest)
    data = canonical_json(manifest)
    (bundle_dir / "manifest.json").write_bytes(data)
    (bundle_dir / "signature.json").write_bytes(canonical_json(sign_manifest(data, account)))


def test_a_version_whose_example_fails_never_gets_the_alias(
    range_bundle: Any, publisher: LocalAccount, tmp_path: Path
) -> None:
    """Locally nothing runs the example before the smoke call: the registry takes the version, the smoke call
    fails naming the field, and the alias stays on the good version."""
    with LocalTarget(tmp_path / "registry", publisher) as local:
        good = publish_function(local, range_bundle.path, "range-fn", "prod").result.version
        bad_example = [{**range_bundle.manifest.example[0], "km": -1}]
        _with_example(range_bundle.path, publisher, bad_example)
        with pytest.raises(PermanentError, match=r"inputs\[0\]\.km.* alias prod was not moved"):
            publish_function(local, range_bundle.path, "range-fn", "prod")
        assert local.aliases("range-fn")["prod"] == {good: 1.0}
        assert len(local.registry.version_ids("range-fn")) == 2  # stored, but not aliased
