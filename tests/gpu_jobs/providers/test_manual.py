"""ManualProvider (GPUnet / any host): the 0600 nodes file, offers from healthy nodes; and the `depin worker`
node commands (register / nodes / remove / quote / reap) run through a Typer app as the CLI mounts them."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import pytest
import typer
from pydantic import SecretStr
from typer.testing import CliRunner

from depin_core import tls
from depin_core.errors import ConfigError, TransientError
from depin_core.tls import PinMismatch
from gpu_jobs.agent.process import AgentProcess
from gpu_jobs.providers import ManualProvider, pick_offer, worker_name
from pipelines.cli import nodes as nodes_cmd
from tests.support.fakes.vast import FakeVast
from tests.support.providers import JOB_ID, TOKEN, make_bootstrap, make_spec

OTHER_TOKEN = "another-token-fedcba9876543210"


@pytest.fixture
def nodes_file(tmp_path: Path) -> Path:
    return tmp_path / ".depin" / "workers.json"


@pytest.fixture()
def agent(worker_agent: AgentProcess) -> AgentProcess:
    return worker_agent


def cli() -> typer.Typer:
    """`depin worker` as pipelines.cli.worker mounts these commands."""
    app = typer.Typer()
    commands = (nodes_cmd.register, nodes_cmd.nodes, nodes_cmd.remove, nodes_cmd.reap, nodes_cmd.quote,
                nodes_cmd.script)  # fmt: skip
    for fn in commands:
        app.command(fn.__name__)(fn)
    return app


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


FP = "ab" * 32
CERT = tls.make_certificate()


def test_register_list_remove_in_a_0600_file(nodes_file: Path) -> None:
    manual = ManualProvider(nodes_file)
    lab = "https://10.0.0.5:8900/"  # the certificate given: no connection made
    manual.register("lab-a", lab, SecretStr(TOKEN), gpu="RTX 4090", usd_per_hour=0.3, tls_cert=CERT.cert_pem)
    manual.register("gpunet-1", "http://127.0.0.1:8900", SecretStr(OTHER_TOKEN))  # loopback: http allowed
    assert stat.S_IMODE(nodes_file.stat().st_mode) == 0o600
    assert [n.name for n in manual.list()] == ["gpunet-1", "lab-a"]
    assert manual.get("lab-a").url == "https://10.0.0.5:8900"  # trailing slash dropped
    assert (
        manual.get("lab-a").tls_fingerprint == CERT.fingerprint
        and manual.get("lab-a").tls_cert == CERT.cert_pem
    )
    assert manual.by_url("https://10.0.0.5:8900/").name == "lab-a"
    # re-registering replaces, the file stays 0600, reprs never show tokens
    fp = CERT.fingerprint.upper()
    manual.register(
        "lab-a", "https://10.0.0.6:8900", SecretStr(TOKEN), tls_fingerprint=fp, tls_cert=CERT.cert_pem
    )
    with pytest.raises(ConfigError, match="not the tls_fingerprint given"):
        manual.register(
            "lab-a", "https://10.0.0.6:8900", SecretStr(TOKEN), tls_fingerprint=FP, tls_cert=CERT.cert_pem
        )
    assert manual.get("lab-a").url == "https://10.0.0.6:8900"
    assert stat.S_IMODE(nodes_file.stat().st_mode) == 0o600
    assert TOKEN not in repr(manual.list()) and OTHER_TOKEN not in str(manual.get("gpunet-1"))
    assert manual.remove("lab-a") is True and manual.remove("lab-a") is False
    assert [n.name for n in ManualProvider(nodes_file).list()] == ["gpunet-1"]


def test_register_rejects_bad_values_naming_the_field(nodes_file: Path) -> None:
    manual = ManualProvider(nodes_file)
    with pytest.raises(ConfigError, match="name"):
        manual.register("Bad Name!", "http://10.0.0.5:8900", SecretStr(TOKEN))
    with pytest.raises(ConfigError, match="url"):
        manual.register("ok", "ftp://10.0.0.5", SecretStr(TOKEN))
    with pytest.raises(ConfigError, match="plain HTTP to a remote machine"):
        manual.register("ok", "http://10.0.0.5:8900", SecretStr(TOKEN))
    with pytest.raises(ConfigError, match="--fingerprint"):
        manual.register("ok", "https://10.0.0.5:8900", SecretStr(TOKEN))
    with pytest.raises(ConfigError, match="64 hex digits"):
        manual.register("ok", "https://10.0.0.5:8900", SecretStr(TOKEN), tls_fingerprint="abc")
    with pytest.raises(ConfigError, match="token"):
        manual.register("ok", "http://127.0.0.1:8900", SecretStr("short"))
    with pytest.raises(ConfigError, match="not registered"):
        manual.get("ghost")
    assert not nodes_file.exists()


def test_an_entry_from_before_pinning_is_named_and_can_be_registered_again(nodes_file: Path) -> None:
    old = {"name": "lab-b", "url": "http://10.0.0.7:8900", "token": TOKEN, "usd_per_hour": 0.0}
    nodes_file.parent.mkdir(parents=True, exist_ok=True)
    nodes_file.write_text(json.dumps({"nodes": [old]}))
    manual = ManualProvider(nodes_file)
    with pytest.raises(ConfigError) as refused:
        manual.list()
    message = str(refused.value)
    assert "node 'lab-b'" in message and "plain HTTP to a remote machine" in message
    assert "depin worker register lab-b --url https://" in message and TOKEN not in message
    manual.register("lab-b", "https://10.0.0.7:8900", SecretStr(TOKEN), tls_cert=CERT.cert_pem)
    assert manual.get("lab-b").tls_fingerprint == CERT.fingerprint
    nodes_file.write_text(json.dumps({"nodes": [old]}))
    assert manual.remove("lab-b") is True and manual.list() == []


def test_unreachable_nodes_give_no_offers(nodes_file: Path) -> None:
    manual = ManualProvider(nodes_file, health_timeout_s=1, poll_s=0.05)
    manual.register("down", "http://127.0.0.1:9", SecretStr(TOKEN))
    assert manual.quote(make_spec(gpu_count=0)) == []
    assert manual.instances() == []


@pytest.mark.e2e
def test_healthy_node_is_an_offer_and_a_worker(nodes_file: Path, agent: AgentProcess) -> None:
    manual = ManualProvider(nodes_file, name="gpunet", poll_s=0.05)
    fp = agent.fingerprint
    manual.register("lab", agent.url, SecretStr(TOKEN), gpu="cpu box", usd_per_hour=0.05, tls_fingerprint=fp)
    assert manual.get("lab").tls_cert == agent.tls_cert  # read once at registration, kept in the file
    manual.register("wrong-token", agent.url, SecretStr(OTHER_TOKEN), tls_cert=agent.tls_cert)
    manual.register("down", "http://127.0.0.1:9", SecretStr(TOKEN))
    with pytest.raises(PinMismatch, match="not the pinned"):
        manual.register("impostor", agent.url, SecretStr(TOKEN), tls_fingerprint="cd" * 32)
    assert "impostor" not in [n.name for n in manual.list()]
    offers = manual.quote(make_spec(gpu_count=0))
    assert [o.offer_id for o in offers] == ["lab"]
    assert offers[0].provider == "gpunet" and offers[0].usd_per_hour == 0.05
    offer = pick_offer(manual, make_spec(gpu_count=0))
    worker = manual.launch(offer, make_bootstrap(), name=worker_name(JOB_ID, 1))
    assert worker.url == agent.url and worker.token.get_secret_value() == TOKEN
    assert worker.tls_cert == agent.tls_cert
    assert manual.wait_ready(worker, timeout_s=10) == worker
    manual.destroy(worker)  # nothing rented: the node keeps running
    assert agent.proc.poll() is None
    down = manual.launch(manual._offer(manual.get("down"), {}), make_bootstrap(), name=worker_name(JOB_ID, 2))
    with pytest.raises(TransientError, match="does not answer"):
        manual.wait_ready(down, timeout_s=0.2)


@pytest.mark.e2e
def test_cli_register_nodes_remove(tmp_path: Path, nodes_file: Path, agent: AgentProcess) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    bad_file = tmp_path / "bad-token"
    bad_file.write_text(OTHER_TOKEN)
    runner = CliRunner()
    app = cli()
    common = ["--nodes-file", str(nodes_file), "--json"]
    pin = ["--fingerprint", str(agent.fingerprint)]
    r = runner.invoke(app, ["register", "lab", "--url", agent.url, "--token-file", str(token_file), *common])
    assert isinstance(r.exception, ConfigError) and "--fingerprint" in str(r.exception)  # https needs a pin
    args = ["register", "lab", "--url", agent.url, "--token-file", str(token_file), *pin, *common]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    doc = last_json(r.stdout)
    assert doc["registered"] == "lab" and doc["healthy"] is True
    assert stat.S_IMODE(nodes_file.stat().st_mode) == 0o600
    saved = json.loads(nodes_file.read_text())["nodes"][0]
    assert saved["tls_fingerprint"] == agent.fingerprint and saved["tls_cert"] == agent.tls_cert
    args = ["register", "bad", "--url", agent.url, "--token-file", str(bad_file), *pin, *common]
    r = runner.invoke(app, args)
    assert isinstance(r.exception, ConfigError) and "refused the token" in str(r.exception)
    wrong = ["--fingerprint", "cd" * 32]
    args = ["register", "mitm", "--url", agent.url, "--token-file", str(token_file), *wrong, *common]
    r = runner.invoke(app, args)
    assert isinstance(r.exception, ConfigError) and "--fingerprint" in str(r.exception)
    assert "not the pinned" in str(r.exception) and TOKEN not in r.output
    args = ["register", "remote", "--url", "http://10.0.0.5:8900", "--token-file", str(token_file), *common]
    r = runner.invoke(app, args)
    assert isinstance(r.exception, ConfigError) and "--url" in str(r.exception)
    r = runner.invoke(app, ["nodes", *common])
    assert r.exit_code == 0, r.output
    (row,) = last_json(r.stdout)["nodes"]
    assert row["name"] == "lab" and row["healthy"] and row["jobs_running"] == 0
    assert TOKEN not in r.output
    r = runner.invoke(app, ["remove", "lab", *common])
    assert r.exit_code == 0 and last_json(r.stdout) == {"removed": "lab", "nodes_file": str(nodes_file)}
    r = runner.invoke(app, ["remove", "lab", *common])
    assert isinstance(r.exception, ConfigError)


def test_cli_quote_and_reap_against_the_vast_fake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    runner = CliRunner()
    app = cli()
    with FakeVast(tmp_path, agent_factory=None) as fake:
        monkeypatch.setenv("DEPIN_VAST_API_KEY", fake.api_key)
        monkeypatch.setenv("DEPIN_VAST_URL", fake.base_url)
        r = runner.invoke(app, ["quote", "--provider", "vast", "--gpus", "1", "--min-vram", "24", "--json"])
        assert r.exit_code == 0, r.output
        doc = last_json(r.stdout)
        assert doc["chosen"]["offer_id"] == "1002" and doc["count"] == 3
        r = runner.invoke(app, ["quote", "--provider", "vast", "--max-usd-per-hour", "0.1", "--json"])
        assert last_json(r.stdout)["chosen"] is None
        keep, leaked = worker_name(JOB_ID, 1), worker_name(JOB_ID, 2)
        fake.leak(keep)
        fake.leak(leaked)
        fake.leak("not-ours")
        r = runner.invoke(app, ["reap", "--provider", "vast", "--keep", keep, "--dry-run", "--json"])
        assert last_json(r.stdout)["would_destroy"] == [leaked] and len(fake.instances) == 3
        r = runner.invoke(app, ["reap", "--provider", "vast", "--keep", keep, "--json"])
        doc = last_json(r.stdout)
        assert doc["destroyed"] == [leaked] and doc["kept"] == [keep]
        assert sorted(i["label"] for i in fake.instances.values()) == sorted([keep, "not-ours"])
        assert fake.api_key not in r.output and fake.api_key not in caplog.text
        monkeypatch.delenv("DEPIN_VAST_API_KEY")
        r = runner.invoke(app, ["reap", "--provider", "vast"])
        assert isinstance(r.exception, ConfigError) and "DEPIN_VAST_API_KEY" in str(r.exception)


def test_cli_script_prints_the_bootstrap_and_writes_a_private_token(tmp_path: Path) -> None:
    runner = CliRunner()
    token_file = tmp_path / "keys" / "gpunet.token"
    r = runner.invoke(cli(), ["script", "--port", "8911", "--package", "depin-pipeline==0.1.0",
                              "--token-out", str(token_file)])  # fmt: skip
    assert r.exit_code == 0, r.output
    token = token_file.read_text().strip()
    assert len(token) >= 32 and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token not in r.output
    assert r.stdout.startswith("#!/bin/sh") and "PORT=${DEPIN_AGENT_PORT:-8911}" in r.stdout
    assert "depin-pipeline==0.1.0" in r.stdout
    r = runner.invoke(cli(), ["script", "--token-out", str(token_file)])
    assert (
        isinstance(r.exception, ConfigError) and token_file.read_text().strip() == token
    )  # never overwritten
