"""The Fluence gateway bootstrap, run for real as root on a stand-in VM (``tests.support.vm``), as the
publisher sends it through the fake Fluence API (``FakeFluence.run_bootstrap``): generation B's cloud-init user
data (checked by cloud-init's own schema validator, then applied: write_files + runcmd), generation A's script
over real SSH on the stdin of ``sudo -n sh -s``. The gateway the script installs (this checkout's wheel and every
dependency, with uv) must answer ``/readyz``, take the published function and serve it."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from eth_account.signers.local import LocalAccount

from depin_core.net import free_port
from depin_core.tls import client_context, make_certificate
from serving.fluence import FluenceClient
from serving.fluence import bootstrap as boot
from serving.fluence.publisher import FluencePublisher
from serving.fluence.settings import FluenceSettings
from serving.fluence.state import StateStore
from tests.support import vm as vms
from tests.support.ci import require
from tests.support.fakes.fluence import FakeFluence

ADMIN_KEY = "gateway-admin-key-for-the-bootstrap-test"
PUBLISHER = "0x" + "ab" * 20


def gateway_env(port: int) -> dict[str, str]:
    """The settings the publisher gives a VM (the gateway on 0.0.0.0 — the VM's own network — at ``port``)."""
    return boot.gateway_env(
        port=port,
        admin_key_hash=hashlib.sha256(ADMIN_KEY.encode()).hexdigest(),
        trusted_publishers=[PUBLISHER],
    )


@pytest.fixture(params=["A", "B"])
def fake(request: pytest.FixtureRequest) -> Iterator[FakeFluence]:
    """The fake Fluence API whose VMs run the bootstrap they get (``run_bootstrap``)."""
    require(vms.unavailable())
    with FakeFluence(request.param, step_s=0.05, gateway_startup_timeout_s=600) as f:
        f.run_bootstrap = True
        yield f


def schema_check(path: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("cloud-init")
    require(
        None if exe else "cloud-init is not installed (apt-get install --no-install-recommends cloud-init)"
    )
    return subprocess.run([str(exe), "schema", "-c", str(path)], capture_output=True, text=True, timeout=120)


def test_the_user_data_passes_cloud_inits_schema(tmp_path: Path, wheel_req: str) -> None:
    for package in (wheel_req, "depin-pipeline==0.1.0"):
        path = tmp_path / "user-data"
        user_data = boot.cloud_init(gateway_env(8787), package, tls=make_certificate(("depin-gw-x",), ()))
        assert len(user_data.encode()) <= boot.MAX_USER_DATA
        path.write_text(user_data)
        r = schema_check(path)
        assert r.returncode == 0 and "Valid cloud-config" in r.stdout, r.stdout + r.stderr
    doc = yaml.safe_load(path.read_text())
    doc["write_files"][0]["permissions"] = 0o600  # an int where cloud-init wants an octal string
    path.write_text("#cloud-config\n" + yaml.safe_dump(doc))
    r = schema_check(path)
    assert r.returncode != 0 and "permissions" in r.stdout + r.stderr


def _gateway_pid(vm: vms.Vm) -> int:
    return int((vm.state / f"{boot.UNIT}.pid").read_text())


def _check_the_vm(vm: vms.Vm, env: dict[str, str], url: str, admin_key: str, pem: str) -> None:
    env_file = vm.file(boot.ENV_PATH)
    assert env_file.stat().st_mode & 0o777 == 0o600 and boot.parse_env(env_file.read_text()) == env
    assert env["DEPIN_GATEWAY_HOST"] == "0.0.0.0" and admin_key not in env_file.read_text()
    unit = vm.file(f"/etc/systemd/system/{boot.UNIT}").read_text()
    assert f"EnvironmentFile={boot.ENV_PATH}" in unit and "User=depin" in unit
    passwd = vm.file("/etc/passwd").read_text()
    uid = next(int(line.split(":")[2]) for line in passwd.splitlines() if line.startswith("depin:"))
    status = Path(f"/proc/{_gateway_pid(vm)}/status").read_text()
    assert f"Uid:\t{uid}\t" in status  # the unit's User=
    assert (vm.state / "systemctl.log").read_text().split()[-2:] == ["restart", boot.UNIT]
    assert (vm.file(boot.VENV_DIR) / "bin" / "depin").exists()
    printed = vm.log_path.read_text(errors="replace")  # the bootstrap says what it installed, uv pinned
    assert f"installed with uv {boot.UV_VERSION}" in printed and "  package: depin-pipeline" in printed
    # the gateway serves HTTPS with the certificate it was handed; its key is the service user's alone
    cert, key = vm.file(boot.TLS_CERT_PATH), vm.file(boot.TLS_KEY_PATH)
    assert cert.read_text() == pem and key.stat().st_mode & 0o777 == 0o600 and key.stat().st_uid == uid
    assert url.startswith("https://")
    pinned = client_context(pem)
    assert httpx.get(f"{url}/readyz", timeout=10, verify=pinned).status_code == 200
    # the admin API takes the key whose sha256 the env file holds, and no other
    alias = f"{url}/v1/functions/nothing/aliases/prod"
    assert httpx.put(alias, json={"version": "1"}, timeout=10, verify=pinned).status_code == 401
    r = httpx.put(alias, json={"version": "1"}, headers={"X-API-Key": admin_key}, timeout=10, verify=pinned)
    assert r.status_code not in (401, 403), r.text


@pytest.mark.e2e
@pytest.mark.slow
def test_publish_boots_the_vm_from_its_bootstrap(
    fake: FakeFluence, wheel_req: str, range_artifact: Path, publisher: LocalAccount, tmp_path: Path
) -> None:
    settings = FluenceSettings(
        target="boot",
        port=free_port(),
        state_dir=tmp_path / "fluence",
        package=wheel_req,  # the publisher's default torch_index stays in the script
        poll_s=0.05,
        vm_timeout_s=60.0,
        bootstrap_timeout_s=600.0,
        ready_timeout_s=600.0,
    )
    client = FluenceClient(fake.api_key, base_url=fake.url, backoff_s=0.01)
    gateway_options = {"retries": 3, "backoff_s": 0.05, "timeout": 120}
    with FluencePublisher(
        client,
        publisher,
        settings,
        ssh_port_for=fake.ssh_port,
        own_client=True,
        gateway_options=gateway_options,
    ) as pub:
        result = pub.publish(range_artifact, "range", alias="prod")
    (snap,) = [v for v in fake.vms() if not v["ended"]]
    machine = fake._vm(snap["id"]).gateway.machine  # the stand-in VM the bootstrap ran on
    env = snap["env"]
    admin_key = StateStore(settings.state_dir).admin_key("boot").get_secret_value()  # type: ignore[union-attr]
    pem = StateStore(settings.state_dir).tls_cert("boot") or ""
    _check_the_vm(machine, env, result.target, admin_key, pem)
    if fake.generation == "B":  # the user data as the publisher sent it: cloud-init's schema, the script
        r = schema_check(machine.root / "user-data")
        assert r.returncode == 0 and "Valid cloud-config" in r.stdout, r.stdout + r.stderr
        script = machine.file(boot.SCRIPT_PATH)
        assert script.stat().st_mode & 0o777 == 0o755
        assert script.read_text() == boot.bootstrap_script(env, wheel_req)
    how = "cloud-init" if fake.generation == "B" else "sh -s"
    assert f"bootstrap ran in a VM stand-in ({how})" in snap["log"]
    print(
        f"\n[bootstrap timing] fluence gen {fake.generation}: gateway ready {machine.ready_s:.1f} s after boot"
    )

    # the published function is served by the gateway the bootstrap installed
    pinned = client_context(pem)
    rows = httpx.get(f"{result.target}/v1/functions/range", timeout=10, verify=pinned).json()["manifest"][
        "example"
    ]
    r = httpx.post(
        f"{result.target}/v1/functions/range@prod/invoke", json={"inputs": rows}, timeout=120, verify=pinned
    )
    assert r.status_code == 200 and len(r.json()["outputs"]) == len(rows), r.text

    if fake.generation == "A":  # idempotent: run again with a new setting; the unit restarts with it
        old_pid = _gateway_pid(machine)
        env2 = {**env, "DEPIN_GATEWAY_MAX_WAIT_MS": "5"}
        again = machine.run(["sh", "-s"], stdin=boot.bootstrap_script(env2, wheel_req).encode())
        assert again.wait(timeout=600) == 0, machine.log()
        assert _gateway_pid(machine) != old_pid
        machine.wait_ready(result.target, verify=pinned)
        _check_the_vm(machine, env2, result.target, admin_key, pem)
    pid = _gateway_pid(machine)
    fake.stop()
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
