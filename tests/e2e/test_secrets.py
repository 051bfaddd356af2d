"""Secrets stay where they belong, end to end with real processes on loopback and the CLI as a user runs it:
DIMO emulator → ``depin ingest`` → ``depin train`` on a worker agent (TLS, pinned) → ``depin publish`` to a
gateway (HTTPS, pinned, admin key) → ``depin invoke``. With known values for the DIMO private key, the agent
token, the gateway admin key and the publisher's signing key, every CLI output, the agent's and the gateway's
logs and every file the run left (datasets, model, bundle, registry, state, the agent's data directory) are
searched: no hit outside the files meant to hold them, and those are mode 0600."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from connectors.dimo.emulator.server import EmulatorProcess
from connectors.dimo.emulator.state import EmulatorConfig
from depin_core.tls import client_context, make_certificate
from gpu_jobs.agent.process import AgentProcess
from serving._auth import hash_api_key
from serving.bundle import load_publisher_account
from serving.server import GatewayProcess
from serving.settings import GatewaySettings
from tests.flows.conftest import FLEET, FLEET_END, RANGE_HP, SIGNALS, SINCE, UNTIL
from tests.gpu_jobs.support import ENV

pytestmark = pytest.mark.e2e

DEPIN = [sys.executable, "-m", "pipelines.cli"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPIN_")}
    return {**env, **ENV, **extra}


def _run(*args: str, cwd: Path, env: dict[str, str], outputs: list[str]) -> dict[str, object]:
    r = subprocess.run([*DEPIN, *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env)
    outputs += [r.stdout, r.stderr]
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _hits(text: str, found: dict[str, str]) -> list[str]:
    return [name for name, value in found.items() if value in text]


def test_no_secret_leaves_the_files_meant_to_hold_it(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    agent_token = "agent-secret-" + secrets.token_hex(16)
    admin_key = "admin-secret-" + secrets.token_hex(16)
    outputs: list[str] = []
    holders: set[Path] = set()  # the files meant to hold a secret

    with EmulatorProcess(EmulatorConfig(**FLEET, end=FLEET_END)) as emu:  # type: ignore[arg-type]
        creds = work / ".depin" / "dimo-credentials.json"
        creds.parent.mkdir(parents=True)
        shutil.copy(emu.credentials_path, creds)
        creds.chmod(0o600)
        holders.add(creds)
        dimo_key = json.loads(creds.read_text())["private_key"]
        _run(
            "ingest", "--since", SINCE, "--until", UNTIL, "--signals", ",".join(SIGNALS),
            "--out", "data/telemetry", "--credentials", str(creds), "--json",
            cwd=work, env=_env(), outputs=outputs,
        )  # fmt: skip

    with AgentProcess(tmp_path / "agent", agent_token, env=ENV) as agent:
        trained = _run(
            "train", "--dataset", "data/telemetry", "--model", "range", "--out", "models/range",
            "--runner", f"agent:{agent.url}", *(a for k, v in RANGE_HP.items() for a in ("--param", f"{k}={v}")), "--json",
            cwd=work, outputs=outputs,
            env=_env(DEPIN_AGENT_TOKEN=agent_token, DEPIN_AGENT_TLS_FINGERPRINT=agent.fingerprint or ""),
        )  # fmt: skip
        assert trained["state"] == "SUCCEEDED"
        agent_log = agent.log_text()
    assert trained["attempts"][0]["runner"].startswith("agent:")  # type: ignore[index]

    publisher = load_publisher_account(key_file=work / ".depin/keys/publisher.key")  # created, 0600
    holders.add(work / ".depin/keys/publisher.key")
    publisher_key = publisher.key.hex().removeprefix("0x")
    key_file = work / "admin.key"
    key_file.write_text(admin_key + "\n")
    key_file.chmod(0o600)
    holders.add(key_file)
    cert = make_certificate()
    cert_file, tls_key = cert.write(tmp_path / "tls")
    settings = GatewaySettings(
        registry_dir=tmp_path / "registry",
        trusted_publishers=[publisher.address],
        admin_key_hashes=[hash_api_key(admin_key)],
        poll_interval_s=0.1,
        tls_cert_file=cert_file,
        tls_key_file=tls_key,
    )
    with GatewayProcess(settings) as gw:
        assert gw.base_url.startswith("https://")
        _run(
            "publish", "--model", "models/range", "--name", "range", "--alias", "prod", "--target", gw.base_url,
            "--admin-key-file", str(key_file), "--tls-cert", str(cert_file), "--json",
            cwd=work, env=_env(), outputs=outputs,
        )  # fmt: skip
        served = httpx.get(
            f"{gw.base_url}/v1/functions/range", verify=client_context(cert.cert_pem), timeout=30
        )
        example = served.json()["manifest"]["example"]
        invoked = _run(
            "invoke", "range@prod", "--data", json.dumps(example), "--target", gw.base_url,
            "--tls-cert", str(cert_file), "--json", cwd=work, env=_env(), outputs=outputs,
        )  # fmt: skip
        assert len(invoked["outputs"]) == len(example)  # type: ignore[arg-type]
        gateway_log = gw.log_text()

    found = {"dimo private key": dimo_key, "agent token": agent_token, "admin key": admin_key}
    found["publisher key"] = publisher_key
    assert all(len(v) >= 16 for v in found.values())
    held = b"".join(f.read_bytes() for f in holders)  # the search finds what is there
    assert all(found[n].encode() in held for n in ("dimo private key", "admin key", "publisher key"))
    for text, where in [
        *((o, "CLI output") for o in outputs),
        (agent_log, "agent log"),
        (gateway_log, "gateway log"),
    ]:
        assert not _hits(text, found), f"{_hits(text, found)} in the {where}"
    scanned = 0
    for root in (work, tmp_path / "agent", tmp_path / "registry"):
        for f in (p for p in root.rglob("*") if p.is_file()):
            if f in holders:
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, f"{f} holds a secret but is not 0600"
                continue
            scanned += 1
            data = f.read_bytes()
            leaked = [name for name, value in found.items() if value.encode() in data]
            assert not leaked, f"{leaked} found in {f.relative_to(tmp_path)}"
    assert scanned > 20  # datasets, the model, the bundle, the registry, the job's state
