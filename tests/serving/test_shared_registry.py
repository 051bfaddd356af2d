"""A function registry on object storage shared by several gateways (serving.shared_registry, serving.replica),
on a real S3-compatible server (moto, own process): replicas converge, concurrent writers from two processes
both land, a snapshot never names an incomplete bundle, damaged or untrusted bundles are refused and reported
(and repaired by publishing again), errors name the setting, and the gateway's readiness waits for a sync.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account.signers.local import LocalAccount

from depin_core.errors import ConfigError, PermanentError, TransientError
from depin_core.net import free_port
from serving._runtime import default_load_predictor
from serving.bundle import Bundle, pack_bundle
from serving.errors import NoHistory, NotFound
from serving.gateway import Gateway
from serving.object_store import ObjectStore
from serving.registry import Registry
from serving.replica import Replica
from serving.settings import GatewaySettings
from serving.shared_registry import SharedRegistry, bundle_key, log_key
from tests.support.gateway import ADMIN_HASH, ADMIN_KEY, serving
from tests.support.s3 import ACCESS_KEY, REGION, SECRET_KEY, S3Server
from tests.support.serving import MakeBundle

REPO = Path(__file__).resolve().parents[2]
ADMIN = {"X-API-Key": ADMIN_KEY}


async def until(pred: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def store_settings(server: S3Server, url: str, **kw: Any) -> GatewaySettings:
    base: dict[str, Any] = {
        "registry_url": url,
        "s3_endpoint_url": server.url,
        "s3_region": REGION,
        "s3_access_key_id": ACCESS_KEY,
        "s3_secret_access_key": SECRET_KEY,
        "s3_allow_http": True,
        "poll_interval_s": 0.05,
    }
    return GatewaySettings(**{**base, **kw})


@pytest.fixture
def url(s3_server: S3Server) -> str:
    return f"s3://{s3_server.new_bucket()}/registry"


@pytest.fixture
def replicas(
    s3_server: S3Server, url: str, tmp_path: Path, publisher: LocalAccount
) -> Callable[[str], Replica]:
    """``replicas(label)``: a new replica of ``url`` with its own empty cache directory."""

    def make(label: str, trusted: list[str] | None = None) -> Replica:
        registry = Registry(tmp_path / f"cache-{label}", trusted=trusted or [publisher.address])
        return Replica.from_settings(store_settings(s3_server, url), registry)

    return make


def publish(replica: Replica, bundle: Bundle, *, move_latest: bool = True) -> bool:
    """What a gateway does with an upload: verify + install in its cache, then publish to the store."""
    replica.registry.add(bundle.path, move_latest=False)
    return replica.publish(
        replica.registry.bundle(bundle.manifest.name, bundle.manifest.version), move_latest=move_latest
    )


def test_changes_through_one_replica_reach_another_and_a_fresh_cache(
    replicas: Callable[..., Replica], make_bundle: MakeBundle, range_artifact: Path
) -> None:
    v1 = make_bundle(range_artifact, "shared-fn")
    v2 = make_bundle(range_artifact, "shared-fn", max_batch_size=64)
    a, b = replicas("a"), replicas("b")
    assert b.sync() is False and b.revision == 0 and b.registry.functions() == []

    assert publish(a, v1) is True and publish(a, v1) is False  # idempotent
    assert a.revision == 1 and a.registry.aliases("shared-fn") == {"latest": {v1.version: 1.0}}
    assert b.sync() is True and b.revision == 1
    assert b.registry.bundle("shared-fn", v1.version).manifest == v1.manifest  # installed and verified
    assert b.registry.aliases("shared-fn") == {"latest": {v1.version: 1.0}}

    publish(b, v2)  # through b: latest moves, a gets it on its next sync
    assert b.set_alias("shared-fn", "prod", v1.version) == {}
    assert a.sync() is True
    assert a.registry.aliases("shared-fn") == {"latest": {v2.version: 1.0}, "prod": {v1.version: 1.0}}
    assert a.registry.version_ids("shared-fn") == [v1.version, v2.version]

    assert a.set_alias("shared-fn", "prod", {v1.version: 3, v2.version: 1}) == {v1.version: 1.0}
    assert b.rollback("shared-fn", "prod") == {v1.version: 1.0}
    with pytest.raises(NoHistory):
        a.rollback("shared-fn", "prod")
    with pytest.raises(NotFound):
        a.set_alias("shared-fn", "prod", "0123456789abcdef")
    assert a.sync() and a.registry.aliases("shared-fn")["prod"] == {v1.version: 1.0}

    fresh = replicas("fresh")  # an empty cache rebuilds the whole registry from the store
    assert fresh.sync() is True and fresh.revision == a.revision == b.revision == 5
    assert (
        fresh.registry.aliases("shared-fn")
        == a.registry.aliases("shared-fn")
        == b.registry.aliases("shared-fn")
    )
    assert fresh.registry.history("shared-fn", "latest") == [{v1.version: 1.0}]


WRITER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from serving.object_store import ObjectStore
    from serving.settings import GatewaySettings
    from serving.shared_registry import SharedRegistry

    settings, label, version, go = GatewaySettings.model_validate_json(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
    shared = SharedRegistry(ObjectStore.from_settings(settings))
    shared.head()
    end = time.monotonic() + 60
    while not go.exists():  # both writers start together
        assert time.monotonic() < end
        time.sleep(0.001)
    for k in range(8):
        shared.set_alias("race", f"{label}-{k}", version)
        shared.set_alias("race", "both", version)  # the same alias, moved by both writers
    print("done")
    """
)


def test_concurrent_writers_in_two_processes_both_land(
    s3_server: S3Server,
    url: str,
    replicas: Callable[..., Replica],
    make_bundle: MakeBundle,
    range_artifact: Path,
    tmp_path: Path,
) -> None:
    bundle = make_bundle(range_artifact, "race")
    a = replicas("a")
    publish(a, bundle)
    settings = store_settings(s3_server, url)
    # the credentials go by environment (a JSON dump of the settings masks the secret)
    doc = settings.model_dump(mode="json") | {"s3_secret_access_key": None, "s3_access_key_id": None}
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    }
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, json.dumps(doc), label, bundle.version, str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for label in ("w1", "w2")
    ]
    go.touch()
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0 and out.strip() == "done", err[-3000:]
    head = SharedRegistry(ObjectStore.from_settings(settings)).head()
    aliases = head.functions["race"].state.aliases
    assert {f"{w}-{k}" for w in ("w1", "w2") for k in range(8)} <= set(aliases)  # no lost update
    assert aliases["both"] == {bundle.version: 1.0}
    # every change got its own revision: 1 publish + 2 x 8 new aliases + the first move of "both"
    assert head.revision == 1 + 16 + 1
    keys = s3_server.keys(url.split("/")[2], "registry/log/")
    assert keys == [f"registry/{log_key(r)}" for r in range(1, head.revision + 1)]
    assert a.sync() and a.registry.aliases("race") == aliases


def test_a_snapshot_never_names_a_bundle_before_it_is_complete(
    s3_server: S3Server,
    url: str,
    replicas: Callable[..., Replica],
    make_bundle: MakeBundle,
    range_artifact: Path,
    anomaly_artifact: Path,
) -> None:
    bundles = [make_bundle(range_artifact, "seen", max_batch_size=n) for n in (8, 16, 32, 64)]
    bundles.append(make_bundle(anomaly_artifact, "seen-too"))
    writer = replicas("writer")
    reader = SharedRegistry(ObjectStore.from_settings(store_settings(s3_server, url)))
    seen: dict[str, int] = {}
    failures: list[str] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set() or len(seen) < len(bundles):
            snap = reader.head()
            for name, fn in snap.functions.items():
                for version, ref in fn.bundles.items():
                    try:  # named ⇒ all its bytes are there, matching the recorded sha256
                        seen[version] = len(reader.fetch_bundle(name, version, ref))
                    except PermanentError as exc:
                        failures.append(str(exc))
            if failures:
                return

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for b in bundles:
            publish(writer, b)
    finally:
        done.set()
        thread.join(120)
    assert not failures, failures[:3]
    assert seen == {b.version: len(pack_bundle(b.path)) for b in bundles}


def test_a_damaged_bundle_is_refused_reported_and_repaired(
    s3_server: S3Server,
    url: str,
    replicas: Callable[..., Replica],
    make_bundle: MakeBundle,
    range_artifact: Path,
) -> None:
    v1 = make_bundle(range_artifact, "fragile")
    v2 = make_bundle(range_artifact, "fragile", max_batch_size=99)
    a, b = replicas("a"), replicas("b")
    publish(a, v1)
    assert b.sync()
    publish(a, v2)
    ref = a.shared.head().functions["fragile"].bundles[v2.version]
    bucket, key = url.split("/")[2], f"registry/{bundle_key('fragile', v2.version, ref['sha256'])}"
    data = bytearray(pack_bundle(v2.path))
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the stored object
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=bytes(data))

    b.sync()  # v2 refused: b keeps serving v1 as latest, and says why
    assert b.registry.version_ids("fragile") == [v1.version]
    assert b.registry.aliases("fragile") == {"latest": {v1.version: 1.0}}
    assert (
        "damaged" in b.refused[f"fragile@{v2.version}"]
        and "publish fragile@" in b.refused[f"fragile@{v2.version}"]
    )
    assert b.status()["refused"] == b.refused and b.problems() == {}

    publish(a, v2)  # publishing it again replaces the damaged object and makes a new revision
    assert b.sync() and b.refused == {}
    assert b.registry.aliases("fragile") == {"latest": {v2.version: 1.0}}
    assert b.registry.bundle("fragile", v2.version).manifest == v2.manifest


def test_an_untrusted_bundle_is_refused_by_a_stricter_replica(
    replicas: Callable[..., Replica],
    make_bundle: MakeBundle,
    range_artifact: Path,
    other_publisher: LocalAccount,
    publisher: LocalAccount,
) -> None:
    theirs = make_bundle(range_artifact, "strict", account=other_publisher)
    lax = replicas("lax", trusted=[publisher.address, other_publisher.address])
    strict = replicas("strict")
    publish(lax, theirs)
    strict.sync()
    assert strict.registry.functions() == [] and strict.revision == 1
    assert f"publisher {other_publisher.address} is not trusted" in strict.refused[f"strict@{theirs.version}"]


def test_store_errors_name_the_setting_and_never_the_secret(
    s3_server: S3Server, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="DEPIN_GATEWAY_REGISTRY_URL"):
        GatewaySettings(registry_url="https://bucket/x")
    with pytest.raises(ConfigError, match="DEPIN_GATEWAY_S3_ALLOW_HTTP"):
        ObjectStore.from_settings(store_settings(s3_server, url, s3_allow_http=False))
    with pytest.raises(ConfigError, match=r"does not exist.*DEPIN_GATEWAY_REGISTRY_URL") as e:
        ObjectStore.from_settings(store_settings(s3_server, "s3://no-such-bucket-here/x")).check()
    assert SECRET_KEY not in str(e.value)
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TransientError, match=r"unreachable.*DEPIN_GATEWAY_S3_ENDPOINT_URL"):
        SharedRegistry(
            ObjectStore.from_settings(store_settings(s3_server, url, s3_endpoint_url=closed))
        ).head()
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    settings = store_settings(s3_server, url, s3_access_key_id=None, s3_secret_access_key=None)
    with pytest.raises(ConfigError, match=r"no S3 credentials.*DEPIN_GATEWAY_S3_ACCESS_KEY_ID"):
        ObjectStore.from_settings(settings).check()


def test_a_cache_directory_belongs_to_one_registry(
    s3_server: S3Server, url: str, tmp_path: Path, publisher: LocalAccount, range_bundle: Bundle
) -> None:
    local = Registry(tmp_path / "local", trusted=[publisher.address])
    local.add(range_bundle.path)
    with pytest.raises(ConfigError, match="holds a local registry"):
        Replica.from_settings(store_settings(s3_server, url), local)
    cache = Registry(tmp_path / "cache", trusted=[publisher.address])
    Replica.from_settings(store_settings(s3_server, url), cache)
    with pytest.raises(ConfigError, match="is the cache of"):
        Replica.from_settings(store_settings(s3_server, url + "-other"), cache)


async def test_gateway_is_ready_only_once_synced_and_reports_the_sync(
    s3_server: S3Server,
    url: str,
    tmp_path: Path,
    publisher: LocalAccount,
    range_bundle: Bundle,
    caplog: pytest.LogCaptureFixture,
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    settings = store_settings(
        s3_server,
        url,
        registry_dir=tmp_path / "down",
        trusted_publishers=[publisher.address],
        s3_endpoint_url=closed,
    )
    gateway = Gateway(settings)
    caplog.set_level(logging.WARNING)
    async with gateway.running():
        transport = httpx.ASGITransport(app=gateway.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            assert gateway.replica is not None
            replica = gateway.replica
            await until(lambda: replica.error is not None, "the first sync to fail")
            r = await client.get("/readyz")
            assert r.status_code == 503 and "not synced" in r.json()["problems"]["registry"]
            assert "unreachable" in r.json()["registry"]["error"]
            assert "depin_gateway_registry_revision -1.0" in (await client.get("/metrics")).text
    assert SECRET_KEY not in caplog.text and "sync failed" in caplog.text

    settings = store_settings(
        s3_server,
        url,
        registry_dir=tmp_path / "up",
        trusted_publishers=[publisher.address],
        admin_key_hashes=[ADMIN_HASH],
    )
    async with serving(settings) as (gateway, client):
        r = await client.get("/readyz")
        assert r.status_code == 200 and r.json()["registry"]["revision"] == 0
        assert r.json()["registry"]["synced_age_s"] >= 0
        put = await client.put(
            f"/v1/functions/{range_bundle.manifest.name}/versions/{range_bundle.version}",
            content=pack_bundle(range_bundle.path),
            headers=ADMIN,
        )
        assert put.status_code == 201, put.text
        assert (await client.get("/readyz")).json()["registry"]["revision"] == 1
        assert "depin_gateway_registry_revision 1.0" in (await client.get("/metrics")).text
        r = await client.post(
            f"/v1/functions/{range_bundle.manifest.name}/invoke",
            json={"inputs": range_bundle.manifest.example},
        )
        assert r.status_code == 200 and r.json()["version"] == range_bundle.version
    head = SharedRegistry(ObjectStore.from_settings(settings)).head()  # it went to the store, not just here
    assert head.functions[range_bundle.manifest.name].state.aliases == {"latest": {range_bundle.version: 1.0}}


async def test_admin_calls_through_a_gateway_go_to_the_store(
    s3_server: S3Server,
    url: str,
    tmp_path: Path,
    publisher: LocalAccount,
    range_bundle: Bundle,
    make_bundle: MakeBundle,
    range_artifact: Path,
    replicas: Callable[..., Replica],
) -> None:
    broken = make_bundle(range_artifact, "range-fn", max_batch_size=7)

    def load(bundle: Bundle, device: str) -> Any:
        if bundle.manifest.max_batch_size == 7:
            raise RuntimeError("simulated: the weights do not fit this machine")
        return default_load_predictor(bundle, device)

    settings = store_settings(
        s3_server,
        url,
        registry_dir=tmp_path / "gw",
        trusted_publishers=[publisher.address],
        admin_key_hashes=[ADMIN_HASH],
    )
    v1 = range_bundle.version
    async with serving(settings, load_predictor=load) as (_, client):
        for bundle, status in ((range_bundle, 201), (broken, 422)):
            r = await client.put(
                f"/v1/functions/range-fn/versions/{bundle.version}",
                content=pack_bundle(bundle.path),
                headers=ADMIN,
            )
            assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == "load_failed" and "simulated" in r.json()["error"]["message"]
        r = await client.put("/v1/functions/range-fn/aliases/prod", json={"version": v1}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["previous"] == {}
        r = await client.post("/v1/functions/range-fn/aliases/prod/rollback", headers=ADMIN)
        assert r.status_code == 409 and r.json()["error"]["code"] == "no_history"
    other = replicas("other")  # the store holds both versions, the broken one stored but never aliased
    other.sync()
    assert other.registry.version_ids("range-fn") == [v1, broken.version]
    assert other.registry.aliases("range-fn") == {"latest": {v1: 1.0}, "prod": {v1: 1.0}}
