"""The worker bootstraps, run for real: the Vast on-start script and the io.net entrypoint + args (each as the
provider sends it, run by the fake when it launches the instance) and ``depin worker script``. Each pip-installs
this checkout's wheel (file:// URL) into a stand-in PyTorch image (``tests.support.node_image``) with its own
HOME, and the agent it starts must answer ``/v1/health`` with its token, over HTTPS with the certificate the
client made for the node and pinned (a rented node), or its own self-signed one (``depin worker script``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from depin_core import tls
from depin_core.errors import TransientError
from gpu_jobs.providers import Bootstrap, pick_offer, worker_name
from gpu_jobs.providers.ionet import IonetProvider
from gpu_jobs.providers.vast import VastProvider
from serving.fluence import bootstrap as fluence_boot
from tests.support.fakes.ionet import FakeIonet
from tests.support.fakes.vast import FakeVast
from tests.support.node_image import Machine, ScriptAgent
from tests.support.providers import JOB_ID, make_spec

TOKEN = "bootstrap-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def sh_n(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True, timeout=30)


def cli_script(*args: str) -> str:
    """What ``depin worker script … --json`` prints (its ``script``), run as a user runs it."""
    r = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "worker", "script", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])["script"]


def assert_installed_from_the_wheel(machine: Machine) -> None:
    """pip installed the wheel into the node's Python, and the agent runs from there (not this checkout)."""
    (site,) = machine.bin.parent.glob("lib/python3*/site-packages")
    (dist,) = site.glob("depin_pipeline-*.dist-info")
    assert json.loads((dist / "direct_url.json").read_text())["url"].startswith("file://")
    assert (site / "gpu_jobs" / "agent").is_dir() and (machine.bin / "depin").exists()
    assert "Successfully installed depin-pipeline" in machine.log()
    # what the bootstrap printed it installed
    assert "installed: depin-pipeline\nversion: " in machine.log_path.read_text()


def test_every_generated_script_is_valid_sh(wheel_req: str) -> None:
    b = Bootstrap(token=SecretStr(TOKEN), package=wheel_req, data_dir="/srv/depin agent's data", port=8911)
    env = fluence_boot.gateway_env(port=8787, admin_key_hash="a" * 64, trusted_publishers=["0x" + "1" * 40])
    scripts = {
        "vast on-start": b.script(background=True),
        "io.net entrypoint args": b.script(),
        "depin worker script": cli_script("--package", wheel_req, "--port", "8911"),
        "fluence": fluence_boot.bootstrap_script(env, wheel_req),
        "fluence, no torch index": fluence_boot.bootstrap_script(env, wheel_req, torch_index=None),
    }
    for what, script in scripts.items():
        r = sh_n(script)
        assert r.returncode == 0, f"{what}: {r.stderr}"
        assert TOKEN not in script
    assert sh_n("if true; then echo\n").returncode != 0  # the check can fail


def test_the_script_refuses_to_run_without_the_token(tmp_path: Path, wheel_req: str) -> None:
    machine = Machine(tmp_path / "node")
    proc = machine.run(["/bin/sh", "-c", Bootstrap(token=SecretStr(TOKEN), package=wheel_req).script()], {})
    try:
        assert proc.wait(timeout=60) == 64
        assert "DEPIN_AGENT_TOKEN is not set" in machine.log()
        assert not list(machine.bin.parent.glob("lib/python3*/site-packages/depin_pipeline-*"))
    finally:
        machine.stop()


def test_depin_worker_script_runs_the_agent(tmp_path: Path, wheel_req: str) -> None:
    """The printed script, run with ``sh`` and the token in the environment; its ``--port`` default is used
    (no ``DEPIN_AGENT_PORT``), the agent stays in the foreground (``exec``)."""
    machine = Machine(tmp_path / "gpunet-node")
    script = cli_script("--package", wheel_req, "--port", str(machine.port))
    path = machine.root / "bootstrap.sh"
    path.write_text(script)
    machine.run(["sh", str(path)], {"DEPIN_AGENT_TOKEN": TOKEN}, unset=("DEPIN_AGENT_PORT",))
    try:
        health = machine.wait_health(TOKEN)  # over HTTPS, pinned to the certificate kept in its data dir
        assert health["jobs_running"] == 0 and "torch" in health
        assert machine.url.startswith("https://") and machine.verify is not None
        assert httpx.get(f"{machine.url}/v1/health", timeout=10, verify=machine.verify).status_code == 401
        assert machine.proc is not None and machine.proc.poll() is None  # exec: the agent is the process
        assert_installed_from_the_wheel(machine)
        print(f"\n[bootstrap timing] depin worker script: agent ready {machine.ready_s:.1f} s after start")
    finally:
        machine.stop()
    assert machine.proc.poll() is not None


@pytest.mark.e2e
def test_vast_instance_runs_its_on_start_script(tmp_path: Path, wheel_req: str) -> None:
    with (
        FakeVast(tmp_path) as fake,
        VastProvider(SecretStr(fake.api_key), fake.base_url, poll_s=0.05) as vast,
    ):
        offer = pick_offer(vast, make_spec(), max_usd_per_hour=1.0)
        bootstrap = Bootstrap(token=SecretStr(TOKEN), package=wheel_req)
        worker = vast.launch(offer, bootstrap, name=worker_name(JOB_ID, 1))
        try:
            ready = vast.wait_ready(worker, timeout_s=300)
            assert ready.url.startswith("https://") and ready.tls_cert
            pinned = tls.client_context(ready.tls_cert)  # the node serves the certificate made for it
            assert httpx.get(f"{ready.url}/v1/health", headers=AUTH, verify=pinned).status_code == 200
            assert httpx.get(f"{ready.url}/v1/health", timeout=10, verify=pinned).status_code == 401
            agent = fake.pool.agent(worker.instance_id)
            assert isinstance(agent, ScriptAgent) and agent.machine is not None
            row = fake.instances[int(worker.instance_id)]
            assert agent.argv == ["/bin/sh", "-c", row["onstart"]] and TOKEN not in row["onstart"]
            key = bootstrap.env()["DEPIN_AGENT_TLS_KEY"]  # the node's private key: env only, never logged
            assert key not in row["onstart"] and key not in agent.machine.log()
            # an on-start script must return: it did (exit 0) while the agent it started keeps running
            assert agent.machine.proc is not None and agent.machine.proc.poll() == 0
            assert agent.proc is not None and agent.proc.poll() is None
            assert_installed_from_the_wheel(agent.machine)
            print(f"\n[bootstrap timing] vast on-start: agent ready {agent.machine.ready_s:.1f} s after boot")
        finally:
            vast.destroy(worker)
        assert agent.proc.poll() is not None  # destroy stopped the backgrounded agent too
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{ready.url}/v1/health", headers=AUTH, timeout=5, verify=pinned)


@pytest.mark.e2e
def test_ionet_container_runs_its_entrypoint_and_args(tmp_path: Path, wheel_req: str) -> None:
    with (
        FakeIonet(tmp_path) as fake,
        IonetProvider(SecretStr(fake.api_key), fake.base_url, poll_s=0.05, margin_s=0) as ionet,
    ):
        offer = pick_offer(ionet, make_spec(gpu_count=1, min_vram_gb=16), max_usd_per_hour=4.0)
        bootstrap = Bootstrap(token=SecretStr(TOKEN), package=wheel_req)
        worker = ionet.launch(offer, bootstrap, name=worker_name(JOB_ID, 1))
        try:
            ready = ionet.wait_ready(worker, timeout_s=300)
            assert ready.url.startswith("https://") and ready.tls_cert == bootstrap.tls_cert
            pinned = tls.client_context(bootstrap.tls_cert or "")
            assert httpx.get(f"{ready.url}/v1/health", headers=AUTH, verify=pinned).status_code == 200
            agent = fake.pool.agent(worker.instance_id)
            assert isinstance(agent, ScriptAgent) and agent.machine is not None
            cc = fake.deploy_bodies[-1]["container_config"]
            assert agent.argv == [*cc["entrypoint"], *cc["args"]] and TOKEN not in json.dumps(agent.argv)
            assert agent.machine.proc is not None and agent.machine.proc.poll() is None  # exec'd agent
            assert_installed_from_the_wheel(agent.machine)
            print(
                f"\n[bootstrap timing] io.net entrypoint: agent ready {agent.machine.ready_s:.1f} s after boot"
            )
        finally:
            ionet.destroy(worker)
        assert agent.proc.poll() is not None


@pytest.mark.e2e
def test_a_bootstrap_that_cannot_install_fails_the_instance(tmp_path: Path) -> None:
    """pip cannot install the package (no such version on the node's index): the script exits non-zero, the
    instance ends up exited with the reason, and waiting for it fails instead of hanging."""
    with (
        FakeVast(tmp_path) as fake,
        VastProvider(SecretStr(fake.api_key), fake.base_url, poll_s=0.05) as vast,
    ):
        offer = pick_offer(vast, make_spec(), max_usd_per_hour=1.0)
        bootstrap = Bootstrap(token=SecretStr(TOKEN), package="depin-pipeline==9.9.9")
        worker = vast.launch(offer, bootstrap, name=worker_name(JOB_ID, 1))
        try:
            with pytest.raises(TransientError):
                vast.wait_ready(worker, timeout_s=300)
            row = fake.instances[int(worker.instance_id)]
            assert row["actual_status"] == "exited" and "agent failed to start" in row["status_msg"]
            agent = fake.pool.agent(worker.instance_id)
            assert isinstance(agent, ScriptAgent) and agent.machine is not None
            assert "No matching distribution found for depin-pipeline==9.9.9" in agent.machine.log()
        finally:
            vast.destroy(worker)
