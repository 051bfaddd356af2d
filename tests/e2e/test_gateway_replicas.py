"""Two `depin serve` gateways, each with its own cache directory, on one registry kept on an S3-compatible
server (moto, own process): a version published through one is served by both; an alias moved through the
other reaches the first; and while both answer a continuous stream of invokes during that move, every answer
comes from the old or the new version — never an error — and, per gateway, never goes back once it changed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account.signers.local import LocalAccount

from serving._auth import new_admin_key
from serving.bundle import Bundle, pack_bundle
from tests.e2e.test_publish import DepinServe, clean_env, depin, wait_for
from tests.support.s3 import ACCESS_KEY, REGION, SECRET_KEY, S3Server
from tests.support.serving import MakeBundle

pytestmark = pytest.mark.e2e

ADMIN_KEY, ADMIN_HASH = new_admin_key()
ADMIN = {"X-API-Key": ADMIN_KEY}
NAME = "replicated"


def store_env(s3_server: S3Server, publisher: LocalAccount) -> dict[str, str]:
    return {
        "DEPIN_GATEWAY_S3_ENDPOINT_URL": s3_server.url,
        "DEPIN_GATEWAY_S3_REGION": REGION,
        "DEPIN_GATEWAY_S3_ACCESS_KEY_ID": ACCESS_KEY,
        "DEPIN_GATEWAY_S3_SECRET_ACCESS_KEY": SECRET_KEY,
        "DEPIN_GATEWAY_S3_ALLOW_HTTP": "true",
        "DEPIN_GATEWAY_TRUSTED_PUBLISHERS": publisher.address,
        "DEPIN_GATEWAY_ADMIN_KEY_HASHES": ADMIN_HASH,
    }


@pytest.fixture
def gateways(
    s3_server: S3Server, tmp_path: Path, publisher: LocalAccount
) -> Iterator[tuple[DepinServe, DepinServe]]:
    url = f"s3://{s3_server.new_bucket()}/functions"
    env = {**store_env(s3_server, publisher), "DEPIN_GATEWAY_REGISTRY_URL": url}
    a = DepinServe(tmp_path, tmp_path / "cache-a", env=env)
    b = DepinServe(tmp_path, tmp_path / "cache-b", env=env)
    with ThreadPoolExecutor(2) as pool:
        started = list(pool.map(lambda g: g.start(), (a, b)))
    try:
        for g in started:
            assert g.info["registry_url"] == url
            wait_for(lambda g=g: httpx.get(f"{g.url}/readyz").status_code == 200, "a synced, ready gateway")
        yield a, b
    finally:
        for g in (a, b):
            g.stop()
        for g in (a, b):
            assert SECRET_KEY not in g.stderr()


def served(url: str, ref: str, body: dict[str, Any]) -> str | None:
    """The version answering ``ref`` on the gateway at ``url`` (None while it serves nothing there)."""
    r = httpx.post(f"{url}/v1/functions/{ref}/invoke", json=body, timeout=30)
    return r.json()["version"] if r.status_code == 200 else None


def test_replicas_share_publishes_and_alias_moves(
    gateways: tuple[DepinServe, DepinServe], make_bundle: MakeBundle, range_artifact: Path
) -> None:
    a, b = gateways
    v1, v2 = (make_bundle(range_artifact, NAME, max_batch_size=n) for n in (128, 256))
    body = {"inputs": v1.manifest.example}

    def put(gw: DepinServe, bundle: Bundle) -> None:
        r = httpx.put(
            f"{gw.url}/v1/functions/{NAME}/versions/{bundle.version}",
            content=pack_bundle(bundle.path),
            headers=ADMIN,
            timeout=60,
        )
        assert r.status_code == 201, r.text

    def move(gw: DepinServe, alias: str, version: str) -> None:
        r = httpx.put(
            f"{gw.url}/v1/functions/{NAME}/aliases/{alias}", json={"version": version}, headers=ADMIN
        )
        assert r.status_code == 200 and r.json()["target"] == {version: 1.0}, r.text

    # a publish through A is served by both (A at once: its admin call returns once it serves it)
    put(a, v1)
    assert served(a.url, NAME, body) == v1.version
    wait_for(lambda: served(b.url, NAME, body) == v1.version, "B to serve the version published through A")
    put(a, v2)
    move(a, "prod", v1.version)
    wait_for(lambda: served(b.url, f"{NAME}@prod", body) == v1.version, "B to serve prod -> v1")
    wait_for(lambda: served(b.url, NAME, body) == v2.version, "B to serve latest -> v2")

    # an alias moved through B reaches A, while both answer a continuous stream of invokes
    answers: dict[str, list[tuple[int, str | None]]] = {a.url: [], b.url: []}
    stop = threading.Event()

    def stream(url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set():
                r = client.post(f"/v1/functions/{NAME}@prod/invoke", json=body)
                answers[url].append((r.status_code, r.headers.get("x-depin-version")))

    threads = [threading.Thread(target=stream, args=(url,)) for url in answers]
    for t in threads:
        t.start()
    try:
        wait_for(
            lambda: all(len(v) >= 5 for v in answers.values()), "invokes on both gateways before the move"
        )
        move(b, "prod", v2.version)
        for url in answers:  # then each keeps answering with v2
            wait_for(
                lambda url=url: answers[url][-5:] == [(200, v2.version)] * 5, f"{url} to serve prod -> v2"
            )
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    for url, got in answers.items():
        assert {status for status, _ in got} == {200}, (url, [g for g in got if g[0] != 200][:5])
        versions = [v for _, v in got]
        assert set(versions) == {v1.version, v2.version}, url
        switch = versions.index(v2.version)
        assert versions[switch:] == [v2.version] * (len(versions) - switch), f"{url} went back to v1"
    ready = httpx.get(f"{a.url}/readyz").json()
    assert ready["registry"]["revision"] == 4 and ready["functions"][NAME]["prod"] == {v2.version: 1.0}


def test_serve_checks_the_bucket_before_it_starts(
    s3_server: S3Server, tmp_path: Path, publisher: LocalAccount
) -> None:
    proc = depin(
        "serve",
        "--port",
        "0",
        "--registry",
        str(tmp_path / "cache"),
        "--registry-url",
        "s3://no-such-bucket-anywhere/functions",
        cwd=tmp_path,
        env=clean_env(**store_env(s3_server, publisher)),
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    text = " ".join((proc.stderr + proc.stdout).split())  # the message, whatever the terminal width
    assert "'no-such-bucket-anywhere' does not exist" in text and "DEPIN_GATEWAY_REGISTRY_URL" in text
    assert SECRET_KEY not in proc.stderr + proc.stdout
