"""The fake Fluence API really runs the gateway a VM is bootstrapped with (design-6-7, "The gateway bootstrap
format"): generation B from the cloud-init user data, generation A over SSH (``sudo -n sh -s`` + the script on
stdin), GPU containers from their environment — and stops it on delete/terminate and at shutdown.

The bootstrap texts here are written by hand from the format (not by ``serving.fluence.bootstrap``), so these
tests pin the contract the publisher must meet."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator

import asyncssh
import httpx
import pytest

from depin_core.net import free_port
from serving.fluence import FluenceClient
from tests.support.fakes.fluence import DEFAULT_IMAGES, FakeFluence

ADMIN_KEY = "admin-key-for-the-fake-0123456789"
PUBLISHER = "0x" + "ab" * 20
IMAGE = DEFAULT_IMAGES[0]["downloadUrl"]


def env_lines(port: int) -> str:
    return (
        "DEPIN_GATEWAY_HOST=0.0.0.0\n"
        f"DEPIN_GATEWAY_PORT={port}\n"
        f"DEPIN_GATEWAY_ADMIN_KEY_HASHES={hashlib.sha256(ADMIN_KEY.encode()).hexdigest()}\n"
        f"DEPIN_GATEWAY_TRUSTED_PUBLISHERS={PUBLISHER}\n"
        "DEPIN_GATEWAY_REGISTRY_DIR=/var/lib/depin/registry\n"
    )


def script(port: int) -> str:
    return (
        "#!/bin/sh\nset -eu\nmkdir -p /etc/depin\n"
        f"cat > /etc/depin/gateway.env <<'DEPIN_ENV'\n{env_lines(port)}DEPIN_ENV\n"
        "chmod 600 /etc/depin/gateway.env\n# … install uv, pip install depin-pipeline, systemd unit …\n"
    )


def cloud_config(port: int, *, env_text: str | None = None) -> str:
    env_text = env_lines(port) if env_text is None else env_text
    indent = "".join(f"      {line}\n" for line in env_text.splitlines())
    body = "".join(f"      {line}\n" for line in script(port).splitlines())
    return (
        "#cloud-config\nwrite_files:\n"
        f"  - path: /etc/depin/gateway.env\n    permissions: '0600'\n    content: |\n{indent}"
        f"  - path: /usr/local/bin/depin-bootstrap\n    permissions: '0755'\n    content: |\n{body}"
        "runcmd:\n  - [/usr/local/bin/depin-bootstrap]\n"
    )


def admin_probe(url: str, key: str) -> int:
    """Status of an admin call with ``key``: 404 (unknown function) when the key is accepted, 403 when not."""
    r = httpx.put(f"{url}/v1/functions/nope/aliases/prod", json={"version": "1"}, headers={"X-API-Key": key})
    return r.status_code


def refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/healthz", timeout=2)
    except httpx.ConnectError:
        return True
    return False


def wait_for(pred, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.fixture
def fake_b() -> Iterator[FakeFluence]:
    with FakeFluence("B", step_s=0.1) as fake:
        yield fake


@pytest.fixture
def fake_a() -> Iterator[FakeFluence]:
    with FakeFluence("A", step_s=0.1) as fake:
        yield fake


def b_create(fake: FakeFluence, user_data: str, *, name: str = "depin-gw") -> str:
    c = FluenceClient(fake.api_key, base_url=fake.url, generation="B")
    cluster, config = c.b.clusters()[0], c.b.configurations()[0]
    return c.b.create_vm(
        cluster_id=cluster.id,
        name=name,
        configuration_id=config.id,
        boot_disk=c.b.boot_disk(cluster.id, name),
        cloud_init=user_data,
    ).id


@pytest.mark.e2e
def test_gen_b_cloud_init_starts_the_gateway_and_terminate_stops_it(fake_b: FakeFluence) -> None:
    port = free_port()
    vm_id = b_create(fake_b, cloud_config(port))
    url = fake_b.wait_gateway(vm_id)
    assert url == f"http://127.0.0.1:{port}"  # the requested port, on loopback
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert admin_probe(url, ADMIN_KEY) == 404 and admin_probe(url, "another-key-0123456789") == 403
    assert fake_b.vm(vm_id)["env"]["DEPIN_GATEWAY_TRUSTED_PUBLISHERS"] == PUBLISHER
    c = FluenceClient(fake_b.api_key, base_url=fake_b.url, generation="B")
    assert c.b.get_vm(vm_id).public_address == "127.0.0.1"
    c.b.terminate(vm_id)
    assert fake_b.live_gateways() == 0 and refused(url)


def test_gen_b_never_ready_and_bad_env_start_no_gateway(fake_b: FakeFluence) -> None:
    fake_b.fail_next = "never_ready"
    quiet = b_create(fake_b, cloud_config(free_port()), name="quiet")
    no_port = b_create(fake_b, cloud_config(0, env_text="DEPIN_GATEWAY_HOST=0.0.0.0\n"), name="no-port")
    not_cloud_config = b_create(fake_b, "#!/bin/sh\necho hi\n", name="script")
    c = FluenceClient(fake_b.api_key, base_url=fake_b.url, generation="B")
    for vm_id in (quiet, no_port, not_cloud_config):
        wait_for(lambda vm_id=vm_id: c.b.get_vm(vm_id).status == "launched")
    assert fake_b.vm(quiet)["env"] is not None and not fake_b.vm(quiet)["gateway_started"]
    assert "DEPIN_GATEWAY_PORT is missing" in fake_b.vm(no_port)["gateway_error"]
    assert not fake_b.vm(not_cloud_config)["gateway_started"]
    assert fake_b.live_gateways() == 0


async def _ssh(
    port: int, user: str, key: asyncssh.SSHKey, command: str, stdin: str = ""
) -> asyncssh.SSHCompletedProcess:
    async with asyncssh.connect(
        "127.0.0.1", port=port, username=user, client_keys=[key], known_hosts=None, agent_path=None
    ) as conn:
        return await conn.run(command, input=stdin, check=False, timeout=60)


@pytest.mark.e2e
def test_gen_a_ssh_bootstrap_starts_the_gateway(fake_a: FakeFluence) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    other = asyncssh.generate_private_key("ssh-ed25519")
    pub = key.export_public_key().decode().strip()
    port = free_port()
    c = FluenceClient(fake_a.api_key, base_url=fake_a.url, generation="A")
    vm_id = c.a.create(name="depin-gw", os_image=IMAGE, ssh_keys=[pub], open_ports=[22, port])[0].vm_id
    ssh_port = fake_a.ssh_port(vm_id)  # known before the VM is up (a real VM's is 22)
    assert ssh_port > 0
    wait_for(lambda: c.a.get(vm_id).ready and fake_a.vm(vm_id)["ssh_listening"])  # type: ignore[union-attr]
    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(_ssh(ssh_port, "ubuntu", other, "true"))
    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(_ssh(ssh_port, "root", key, "true"))
    as_user = asyncio.run(_ssh(ssh_port, "ubuntu", key, "sh -s", script(port)))
    assert as_user.exit_status != 0 and "Permission denied" in str(as_user.stderr)
    assert not fake_a.vm(vm_id)["gateway_started"]
    done = asyncio.run(_ssh(ssh_port, "ubuntu", key, "sudo -n sh -s", script(port)))
    assert done.exit_status == 0
    url = fake_a.wait_gateway(vm_id)
    assert url == f"http://127.0.0.1:{port}" and httpx.get(f"{url}/healthz").status_code == 200
    assert admin_probe(url, ADMIN_KEY) == 404
    # openPorts replaces the list: without 22 the SSH server goes away
    c.request(
        "PATCH",
        "/vms/v3",
        gen="A",
        json={"updates": [{"id": vm_id, "openPorts": [{"port": port, "protocol": "tcp"}]}]},
    )
    wait_for(lambda: fake_a.vm(vm_id)["open_ports"] == [{"port": port, "protocol": "tcp"}])

    def ssh_closed() -> bool:
        try:
            asyncio.run(_ssh(ssh_port, "ubuntu", key, "true"))
        except OSError:
            return True
        return False

    wait_for(ssh_closed)
    c.a.delete([vm_id])
    assert fake_a.live_gateways() == 0 and refused(url)


@pytest.mark.e2e
def test_gpu_container_runs_the_gateway_and_shutdown_stops_it() -> None:
    with FakeFluence("B", step_s=0.1) as fake:
        c = FluenceClient(fake.api_key, base_url=fake.url, generation="B")
        (plan,) = c.gpu.plans()
        env = dict(line.split("=", 1) for line in env_lines(8787).splitlines())
        iid = c.gpu.create(plan_id=plan.id, name="gw", image="ghcr.io/org/depin:1", ports=[8787], env=env)
        url = fake.wait_gateway(iid)
        inst = c.gpu.get(iid)
        assert url == f"http://127.0.0.1:{inst.external_port(8787)}"
        assert httpx.get(f"{url}/healthz").status_code == 200
        proc = fake._vm(iid).gateway.proc.proc  # type: ignore[union-attr]
        assert proc is not None and proc.poll() is None
    assert proc.poll() is not None  # stopping the fake stopped the gateway
    assert refused(url)
