"""Publishing end to end, with real processes on loopback: `depin serve` + `depin publish` + `depin invoke`
as a user runs them; GatewayPublisher against a running gateway (verified upload, refusals); and a hot swap
under concurrent load — new version + alias move, weighted split, rollback, and a local publish picked up by
polling — with zero failed requests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account.signers.local import LocalAccount
from pydantic import SecretStr

from depin_core.errors import TransientError
from depin_core.tls import client_context, make_certificate
from serving._auth import hash_api_key, new_admin_key
from serving.bundle import (
    build_bundle,
    canonical_json,
    content_version,
    load_publisher_account,
    recover_publisher,
    sign_manifest,
)
from serving.client import GatewayClient, GatewayRefused
from serving.publish import GatewayPublisher, LocalPublisher, PublishResult
from serving.registry import Registry
from serving.server import GatewayProcess
from serving.settings import GatewaySettings

pytestmark = pytest.mark.e2e

ADMIN_KEY, ADMIN_HASH = new_admin_key()


# ------------------------------------------------------------------------------------------------------- CLI


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without depin settings (so the user's own cannot leak in), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEPIN_GATEWAY_", "DEPIN_PUBLISHER_"))}
    env.pop("DEPIN_ADMIN_KEY", None)
    return {**env, **extra}


DEPIN = [sys.executable, "-m", "pipelines.cli"]


def depin(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DEPIN, *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
        env=env or clean_env(),
    )


def last_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass
class DepinServe:
    """`depin serve --port 0 --json` as a child process; ``info`` is its JSON line (url, port, …)."""

    cwd: Path
    registry: Path
    proc: subprocess.Popen[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    stderr_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> DepinServe:
        self.stderr_path = self.cwd / f"serve-{time.monotonic_ns()}.err"
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                [*DEPIN, "serve", "--port", "0", "--registry", str(self.registry), "--json"],
                cwd=self.cwd,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=clean_env(DEPIN_GATEWAY_POLL_INTERVAL_S="0.1", **self.env),
            )
        line = self._read_line(deadline=time.monotonic() + 120)
        self.info = json.loads(line)
        return self

    def _read_line(self, deadline: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(max(0.0, deadline - time.monotonic()))
        if not result or not result[0].strip():
            self.stop()
            raise AssertionError(f"depin serve printed no JSON line; stderr: {self.stderr()[-3000:]}")
        return result[0]

    @property
    def url(self) -> str:
        return self.info["url"]

    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> DepinServe:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def wait_for(fn: Any, what: str, timeout: float = 60.0) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_serve_publish_invoke_cli(range_artifact: Path, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    with DepinServe(tmp_path, registry) as server:
        # first start: a key was generated, shown once on stderr, saved 0600; only its digest is kept
        key_file, keys_file = registry / "admin.key", registry / "admin_keys.sha256"
        key = key_file.read_text().strip()
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert key in server.stderr() and server.stderr().count(key) == 1
        assert hash_api_key(key) in keys_file.read_text() and key not in keys_file.read_text()
        assert server.info["url"].startswith("http://127.0.0.1:") and server.info["port"] > 0
        local_address = load_publisher_account(key_file=tmp_path / ".depin/keys/publisher.key").address
        assert server.info["trusted_publishers"] == [local_address]  # the local publisher key, by default

        # depin publish --target local → the running gateway picks it up by polling the registry
        published = last_json(
            depin(
                "publish", "--model", str(range_artifact), "--name", "range", "--alias", "prod",
                "--registry", str(registry), "--json", cwd=tmp_path,
            )
        )  # fmt: skip
        v1 = published["version"]
        assert published["name"] == "range" and published["publisher"] == local_address
        assert published["target"] == f"local:{registry.resolve()}"
        assert published["aliases"] == {"latest": {v1: 1.0}, "prod": {v1: 1.0}}
        assert published["moved"] == ["latest", "prod"]

        manifest = wait_for(
            lambda: httpx.get(f"{server.url}/v1/functions/range", timeout=10).json().get("manifest"),
            "the gateway to pick up the local publish",
        )
        rows = manifest["example"]
        r = wait_for(served_by(server.url, rows), "range@prod to answer")
        assert r.headers["x-depin-version"] == v1 and len(r.json()["outputs"]) == len(rows)

        # depin invoke: a row file, and the same answer as over HTTP
        (tmp_path / "rows.json").write_text(json.dumps({"inputs": rows}))
        invoked = last_json(
            depin(
                "invoke", "range@prod", "--data", "@rows.json", "--target", server.url, "--json", cwd=tmp_path
            )
        )
        assert invoked["version"] == v1 and invoked["outputs"] == r.json()["outputs"]
        one = last_json(
            depin(
                "invoke",
                "range",
                "--data",
                json.dumps(rows[0]),
                "--target",
                server.url,
                "--json",
                cwd=tmp_path,
            )
        )
        assert one["outputs"] == r.json()["outputs"][:1]
        bad = depin(
            "invoke",
            "range",
            "--data",
            json.dumps({**rows[0], "km": -1}),
            "--target",
            server.url,
            cwd=tmp_path,
        )
        assert bad.returncode == 2 and "inputs[0].km" in bad.stderr and "Traceback" not in bad.stderr
        planned = last_json(
            depin(
                "invoke", "range@prod", "--data", json.dumps({"plan": {"km": 40, "mean_speed": 60}}),
                "--target", server.url, "--json", cwd=tmp_path,
            )
        )  # fmt: skip
        assert len(planned["outputs"]) == 1
        assert planned["assumed"]["hours_per_100km"] == pytest.approx(100 / 60, abs=1e-4)  # sent rounded
        missing = depin("invoke", "nope", "--data", "{}", "--target", server.url, cwd=tmp_path)
        assert missing.returncode == 2 and "'nope' not found" in missing.stderr

        # depin publish --target URL: the admin key comes from <registry>/admin.key by default
        remote = last_json(
            depin(
                "publish", "--model", str(range_artifact), "--name", "range", "--alias", "canary",
                "--max-batch-size", "512", "--target", server.url, "--registry", str(registry), "--json",
                cwd=tmp_path,
            )
        )  # fmt: skip
        v2 = remote["version"]
        assert v2 != v1 and remote["target"] == server.url and remote["moved"] == ["canary", "latest"]
        assert remote["aliases"]["prod"] == {v1: 1.0} and remote["aliases"]["canary"] == {v2: 1.0}
        assert (
            httpx.post(f"{server.url}/v1/functions/range@canary/invoke", json={"inputs": rows}).json()[
                "version"
            ]
            == v2
        )

        (tmp_path / "wrong.key").write_text("dgk_not-the-key\n")
        refused = depin(
            "publish", "--model", str(range_artifact), "--name", "range", "--target", server.url,
            "--admin-key-file", str(tmp_path / "wrong.key"), cwd=tmp_path,
        )  # fmt: skip
        assert refused.returncode == 2, refused.stderr
        assert "403" in refused.stderr and "admin key is wrong" in refused.stderr
        assert "dgk_not-the-key" not in refused.stderr
        first_log = server.stderr()

    # a restart keeps the key and never shows it again
    with DepinServe(tmp_path, registry) as again:
        assert key_file.read_text().strip() == key
        assert key not in again.stderr() and str(key_file) in again.stderr()
        r = wait_for(served_by(again.url, rows), "the restarted gateway to serve range@prod")
        assert r.json()["version"] == v1
    assert first_log.count(key) == 1


def test_serve_over_https_with_a_pinned_certificate(range_artifact: Path, tmp_path: Path) -> None:
    cert = make_certificate()
    cert_file, key_file = cert.write(tmp_path / "tls")
    tls_env = {"DEPIN_GATEWAY_TLS_CERT_FILE": str(cert_file), "DEPIN_GATEWAY_TLS_KEY_FILE": str(key_file)}
    registry = tmp_path / "registry"
    with DepinServe(tmp_path, registry, env=tls_env) as server:
        assert server.url.startswith("https://127.0.0.1:")
        assert server.info["tls_fingerprint"] == cert.fingerprint
        publish = ["publish", "--model", str(range_artifact), "--name", "range", "--alias", "prod"]
        where = ["--target", server.url, "--registry", str(registry), "--json"]
        unpinned = depin(*publish, *where, cwd=tmp_path)  # a self-signed certificate: not trusted by default
        assert unpinned.returncode != 0 and "not trusted" in unpinned.stderr, unpinned.stderr
        done = last_json(depin(*publish, *where, "--tls-cert", str(cert_file), cwd=tmp_path))
        assert done["target"] == server.url and done["moved"] == ["latest", "prod"]
        rows = httpx.get(f"{server.url}/v1/functions/range", verify=client_context(cert.cert_pem)).json()[
            "manifest"
        ]["example"]
        invoked = last_json(
            depin(
                "invoke", "range@prod", "--data", json.dumps(rows), "--target", server.url,
                "--tls-cert", str(cert_file), "--json", cwd=tmp_path,
            )
        )  # fmt: skip
        assert invoked["version"] == done["version"] and len(invoked["outputs"]) == len(rows)
        # a worker host pins it through its environment instead (DEPIN_GATEWAY_CERT: the PEM text)
        pinned = clean_env(DEPIN_GATEWAY_CERT=cert.cert_pem)
        again = last_json(depin(*publish, *where, cwd=tmp_path, env=pinned))
        assert again["version"] == done["version"] and again["created"] is False
        other = clean_env(DEPIN_GATEWAY_CERT=make_certificate().cert_pem)
        refused = depin(*publish, *where, cwd=tmp_path, env=other)
        assert refused.returncode == 2 and "other than the pinned one" in refused.stderr, refused.stderr
        garbled = depin(*publish, *where, cwd=tmp_path, env=clean_env(DEPIN_GATEWAY_CERT="not a pem"))
        assert garbled.returncode == 2 and "DEPIN_GATEWAY_CERT must hold a PEM certificate" in garbled.stderr


def test_cli_publish_smoke_calls_the_version_before_moving_the_alias(
    range_artifact: Path, tmp_path: Path
) -> None:
    """`depin publish` invokes the new version with its manifest's example before it moves the alias: a
    version whose example fails is stored, but the alias stays on the version that works — locally (the
    smoke call fails) and on a gateway (which refuses to serve it)."""
    account = load_publisher_account(key_file=tmp_path / ".depin/keys/publisher.key")  # the CLI's key
    registry = tmp_path / "registry"
    publish = ["publish", "--name", "range", "--alias", "prod", "--registry", str(registry)]
    good = last_json(depin(*publish, "--model", str(range_artifact), "--json", cwd=tmp_path))
    assert good["moved"] == ["latest", "prod"]
    assert good["function_url"] == "http://127.0.0.1:8787/v1/functions/range@prod/invoke"

    bad = build_bundle(range_artifact, tmp_path / "bad", name="range", account=account)
    manifest = json.loads((bad.path / "manifest.json").read_bytes())
    manifest["example"] = [{**manifest["example"][0], "km": -1}]  # valid JSON, refused by the model
    manifest["version"] = content_version(manifest)
    data = canonical_json(manifest)
    (bad.path / "manifest.json").write_bytes(data)
    (bad.path / "signature.json").write_bytes(canonical_json(sign_manifest(data, account)))

    local = depin(*publish, "--model", str(bad.path), cwd=tmp_path)
    assert local.returncode == 2 and "Traceback" not in local.stderr, local.stderr
    assert f"smoke call of range@{manifest['version']} failed" in local.stderr
    assert "inputs[0].km" in local.stderr and "alias prod was not moved" in local.stderr
    reg = Registry(registry, trusted=None)
    assert reg.aliases("range")["prod"] == {good["version"]: 1.0}
    assert manifest["version"] in reg.version_ids("range")  # stored, never aliased

    with DepinServe(tmp_path, tmp_path / "gw-registry") as server:
        remote = [*publish, "--target", server.url, "--registry", str(tmp_path / "gw-registry")]
        first = last_json(depin(*remote, "--model", str(range_artifact), "--json", cwd=tmp_path))
        assert first["function_url"] == f"{server.url}/v1/functions/range@prod/invoke"
        refused = depin(*remote, "--model", str(bad.path), cwd=tmp_path)
        assert refused.returncode == 2 and "inputs[0].km" in refused.stderr, refused.stderr
        aliases = httpx.get(f"{server.url}/v1/functions/range", timeout=10).json()["aliases"]
        assert aliases["prod"] == {first["version"]: 1.0}


def served_by(url: str, rows: list[dict[str, Any]]) -> Any:
    def call() -> httpx.Response | None:
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.post(f"{url}/v1/functions/range@prod/invoke", json={"inputs": rows}, timeout=10)
            return r if r.status_code == 200 else None
        return None

    return call


# ------------------------------------------------------------------------------------------ GatewayPublisher


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, publisher: LocalAccount) -> Iterator[GatewayProcess]:
    settings = GatewaySettings(
        registry_dir=tmp_path_factory.mktemp("publish-registry"),
        trusted_publishers=[publisher.address],
        admin_key_hashes=[ADMIN_HASH],
        poll_interval_s=0.1,
    )
    with GatewayProcess(settings) as gw:
        yield gw


def test_gateway_publisher(
    gateway: GatewayProcess, range_artifact: Path, publisher: LocalAccount, other_publisher: LocalAccount
) -> None:
    with GatewayPublisher(gateway.base_url, SecretStr(ADMIN_KEY), publisher, max_batch_size=300) as pub:
        result = pub.publish(range_artifact, "verified", alias="prod")
        again = pub.publish(range_artifact, "verified", alias="prod")  # idempotent
    assert isinstance(result, PublishResult) and result.created and result.moved == ["latest", "prod"]
    assert result.publisher == publisher.address and result.target == gateway.base_url
    assert again.version == result.version and not again.created and again.moved == []
    # anyone can check what was published and by whom
    with GatewayClient(gateway.base_url) as client:
        manifest = client.manifest_bytes("verified", result.version)
        signature = client.signature("verified", result.version)
        info = client.function("verified")
    assert hashlib.sha256(manifest).hexdigest() == result.manifest_sha256
    assert recover_publisher(manifest, signature) == publisher.address == info["versions"][0]["publisher"]
    assert info["aliases"]["prod"] == {result.version: 1.0}

    with (
        GatewayPublisher(gateway.base_url, SecretStr("dgk_wrong"), publisher) as wrong,
        pytest.raises(GatewayRefused) as refused,
    ):
        wrong.publish(range_artifact, "verified", alias="prod")
    assert refused.value.status == 403 and "admin key is wrong" in str(refused.value)
    assert "dgk_wrong" not in str(refused.value)

    with (
        GatewayPublisher(
            gateway.base_url, SecretStr(ADMIN_KEY), other_publisher, max_batch_size=301
        ) as foreign,
        pytest.raises(GatewayRefused) as untrusted,
    ):
        foreign.publish(range_artifact, "verified")
    assert untrusted.value.code == "untrusted_publisher" and "TRUSTED_PUBLISHERS" in str(untrusted.value)
    assert [v["version"] for v in GatewayClient(gateway.base_url).function("verified")["versions"]] == [
        result.version
    ]

    with pytest.raises(TransientError, match="gave up after 2 attempts"):
        GatewayPublisher(
            "http://127.0.0.1:9", SecretStr(ADMIN_KEY), publisher, retries=1, backoff_s=0.01
        ).publish(range_artifact, "verified")


# -------------------------------------------------------------------------------------------------- hot swap


@dataclass
class Load:
    """Clients invoking ``url`` continuously from threads; every answer is recorded (start, end, status,
    version or error)."""

    url: str
    body: dict[str, Any]
    clients: int = 6
    records: list[tuple[float, float, int, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    r = client.post(
                        self.url, json=self.body, headers={"X-Request-Id": f"{rng.getrandbits(64):x}"}
                    )
                    version = r.headers.get("x-depin-version", "") if r.status_code == 200 else r.text[:200]
                    self.records.append((t0, time.monotonic(), r.status_code, version))
                except httpx.HTTPError as exc:
                    self.records.append((t0, time.monotonic(), 0, repr(exc)))

    def __enter__(self) -> Load:
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.clients)
        ]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def since(self, t: float) -> list[str]:
        """Versions answered to requests sent after monotonic time ``t``."""
        return [v for t0, _, status, v in list(self.records) if t0 > t and status == 200]

    def wait_requests_after(self, t: float, n: int = 30) -> list[str]:
        """The versions of the first ≥ ``n`` answers to requests sent after ``t`` (waits for them)."""

        def enough() -> list[str] | None:
            got = self.since(t)
            return got if len(got) >= n else None

        return wait_for(enough, f"{n} requests after the change")


def test_hot_swap_under_load(
    gateway: GatewayProcess, range_artifact: Path, publisher: LocalAccount, tmp_path: Path
) -> None:
    key = SecretStr(ADMIN_KEY)
    v1 = GatewayPublisher(gateway.base_url, key, publisher, max_batch_size=1024).publish(
        range_artifact, "swap", alias="prod"
    )
    rows = GatewayClient(gateway.base_url).function("swap")["manifest"]["example"]
    with Load(f"{gateway.base_url}/v1/functions/swap@prod/invoke", {"inputs": rows}) as load:
        assert set(load.wait_requests_after(0.0)) == {v1.version}

        # a new version published through the admin API, alias moved to it
        v2 = GatewayPublisher(gateway.base_url, key, publisher, max_batch_size=512).publish(
            range_artifact, "swap", alias="prod"
        )
        moved = time.monotonic()
        assert v2.version != v1.version and "prod" in v2.moved
        assert set(load.wait_requests_after(moved)) == {v2.version}

        # a weighted split (sticky by X-Request-Id; random ids → both versions answer)
        with GatewayClient(gateway.base_url, admin_key=key) as admin:
            split = admin.set_alias("swap", "prod", {v1.version: 0.5, v2.version: 0.5})
            assert split["target"] == {v1.version: 0.5, v2.version: 0.5}
            t_split = time.monotonic()
            assert set(load.wait_requests_after(t_split, 200)) == {v1.version, v2.version}

            # rollback restores the previous target (v2 alone)
            assert admin.rollback("swap", "prod")["target"] == {v2.version: 1.0}
            t_rollback = time.monotonic()
            assert set(load.wait_requests_after(t_rollback)) == {v2.version}

        # a local publish into the gateway's registry directory, picked up by polling
        v3 = LocalPublisher(gateway.settings.registry_dir, publisher, max_batch_size=256).publish(
            range_artifact, "swap", alias="prod"
        )
        first_v3 = wait_for(
            lambda: next((t1 for _, t1, s, v in list(load.records) if v == v3.version), None),
            "v3 to be served",
        )
        assert set(load.wait_requests_after(first_v3)) == {v3.version}

    records = load.records
    failed = [r for r in records if r[2] != 200]
    assert not failed, f"{len(failed)} of {len(records)} requests failed: {failed[:5]}"
    assert {r[3] for r in records} <= {v1.version, v2.version, v3.version}
    assert len(records) > 300
