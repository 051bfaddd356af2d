"""Secrets stay where they belong, end to end with real processes on loopback, twice:

- the CLI as a user runs it: DIMO emulator → ``depin ingest`` → ``depin train`` on a worker agent (TLS,
  pinned) → ``depin publish`` to a gateway (HTTPS, pinned, admin key) → ``depin invoke``;
- the ``train_and_publish`` flow as Prefect runs it: the same stages, training on a machine rented from the
  Vast.ai fake (after io.net had no capacity), so the provider API keys and the per-node token and TLS key the
  client made are in play too.

With known values for every secret (DIMO private key, agent tokens, node TLS key, admin key, provider API keys,
publisher signing key), every CLI output, the console, the agents' and the gateway's logs, the Prefect logs,
artifacts, flow-run parameters and stored results, the Prefect database and every file the run left (datasets,
model, bundle, registry, state, the agents' data directories) are searched: no hit outside the files meant to
hold them, and those are mode 0600."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from eth_account.signers.local import LocalAccount

from connectors.dimo.emulator.server import EmulatorProcess
from connectors.dimo.emulator.state import EmulatorConfig
from depin_core import tls as tlslib
from depin_core.tls import NodeCertificate, client_context, make_certificate
from gpu_jobs.agent.process import AgentProcess
from gpu_jobs.providers import base
from serving._auth import hash_api_key
from serving.bundle import load_publisher_account
from serving.server import GatewayProcess
from serving.settings import GatewaySettings
from tests.support.flow_fleet import FLEET, FLEET_END, RANGE_HP, SIGNALS, SINCE, UNTIL
from tests.support.gpu_jobs import ENV

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


def _scan(roots: list[Path], found: dict[str, str], holders: set[Path]) -> int:
    """Every file under ``roots`` holds none of ``found``'s values, except ``holders`` (which must be 0600);
    returns how many files were searched."""
    scanned = 0
    for root in roots:
        for f in (p for p in root.rglob("*") if p.is_file()):
            if f in holders:
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, f"{f} holds a secret but is not 0600"
                continue
            scanned += 1
            data = f.read_bytes()
            leaked = [name for name, value in found.items() if value.encode() in data]
            assert not leaked, f"{leaked} found in {f}"
    return scanned


@dataclass
class HttpsGateway:
    settings: GatewaySettings
    admin_key_file: Path
    cert: NodeCertificate
    cert_file: Path
    publisher: LocalAccount


def _https_gateway(tmp_path: Path, work: Path, admin_key: str, holders: set[Path]) -> HttpsGateway:
    """Settings of an HTTPS gateway with ``admin_key`` (written to a 0600 file) trusting the publisher key the
    CLI and flows create under ``work``; both secret files are added to ``holders``."""
    publisher = load_publisher_account(key_file=work / ".depin/keys/publisher.key")  # created, 0600
    holders.add(work / ".depin/keys/publisher.key")
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
    return HttpsGateway(settings, key_file, cert, cert_file, publisher)


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

    gw_setup = _https_gateway(tmp_path, work, admin_key, holders)
    settings, key_file, cert, cert_file = (
        gw_setup.settings,
        gw_setup.admin_key_file,
        gw_setup.cert,
        gw_setup.cert_file,
    )
    publisher_key = gw_setup.publisher.key.hex().removeprefix("0x")
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
    scanned = _scan([work, tmp_path / "agent", tmp_path / "registry"], found, holders)
    assert scanned > 20  # datasets, the model, the bundle, the registry, the job's state


# ------------------------------------------------------------------------------------------- the Prefect flow


@pytest.fixture(scope="module")
def prefect_backend() -> Iterator[None]:
    """The session's one Prefect test server (started here if no other test started it)."""
    from tests.support.prefect_harness import prefect_session

    with prefect_session():
        yield


@contextlib.contextmanager
def _log_lines() -> Iterator[list[str]]:
    """Every log record of this process while the block runs, formatted (message, exception and all): a
    handler on the root logger and on Prefect's, which do not propagate. (Prefect's console handler writes to
    the stream it was configured with, possibly another test's capture, so the console alone would miss them.)"""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    keep = Keep(logging.DEBUG)
    keep.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger(), logging.getLogger("prefect")]
    for logger in loggers:
        logger.addHandler(keep)
    try:
        yield lines
    finally:
        for logger in loggers:
            logger.removeHandler(keep)


def _prefect_records() -> tuple[list[str], list[str], list[str]]:
    """Every log message, artifact and flow run (parameters, state message) the Prefect server holds."""
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)  # the run's last log batches reach the server before we read
    with get_client(sync_client=True) as client:
        logs = [log.message for log in client.read_logs()]
        artifacts = [json.dumps(a.model_dump(mode="json")) for a in client.read_artifacts()]
        runs = [json.dumps(r.model_dump(mode="json")) for r in client.read_flow_runs()]
    return logs, artifacts, runs


def _prefect_files() -> list[Path]:
    """Where the Prefect server keeps its state: PREFECT_HOME (results, local storage) and the database."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    db_url = settings.server.database.connection_url.get_secret_value()  # type: ignore[union-attr]
    db = Path(db_url.split(":///", 1)[1])
    assert db.is_file(), db_url
    return [Path(settings.home), db.parent]


def test_no_secret_leaves_a_prefect_run_on_a_rented_machine(
    prefect_backend: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from pipelines import train_and_publish
    from pipelines.params import (
        DEFAULT_EMULATOR_CREDENTIALS,
        IngestParams,
        PublishParams,
        TrainAndPublishParams,
        TrainParams,
    )
    from tests.support.fakes.ionet import FakeIonet
    from tests.support.fakes.vast import FakeVast

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for var in list(os.environ):
        if var.startswith("DEPIN_"):
            monkeypatch.delenv(var)
    vast_key, ionet_key = "vast-secret-" + secrets.token_hex(16), "ionet-secret-" + secrets.token_hex(16)
    admin_key = "admin-secret-" + secrets.token_hex(16)
    holders: set[Path] = set()
    node_logs: list[str] = []

    class Node(AgentProcess):
        """A rented machine's agent (the TLS material the client made reaches it through the provider's env);
        its log is kept for the search."""

        def close(self) -> None:
            self.stop()
            node_logs.append(self.log_text())
            super().close()

    gw_setup = _https_gateway(
        tmp_path, work, admin_key, holders
    )  # the publisher key is what the flow signs with
    settings, key_file, cert_file = gw_setup.settings, gw_setup.admin_key_file, gw_setup.cert_file
    with (
        _log_lines() as log_lines,
        EmulatorProcess(EmulatorConfig(**FLEET, end=FLEET_END)) as emu,  # type: ignore[arg-type]
        FakeVast(tmp_path / "vast", api_key=vast_key, agent_factory=lambda d, t: Node(d, t, env=ENV)) as vast,
        FakeIonet(tmp_path / "ionet", api_key=ionet_key, agent_factory=None) as ionet,
        GatewayProcess(settings) as gw,
    ):
        ionet.no_capacity = True  # asked first (its key in use), then Vast.ai rents the machine
        DEFAULT_EMULATOR_CREDENTIALS.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(emu.credentials_path, DEFAULT_EMULATOR_CREDENTIALS)
        DEFAULT_EMULATOR_CREDENTIALS.chmod(0o600)
        holders.add(work / DEFAULT_EMULATOR_CREDENTIALS)
        dimo_key = json.loads(DEFAULT_EMULATOR_CREDENTIALS.read_text())["private_key"]
        for var, value in {
            "DEPIN_VAST_API_KEY": vast_key, "DEPIN_VAST_URL": vast.base_url,
            "DEPIN_IONET_API_KEY": ionet_key, "DEPIN_IONET_URL": ionet.base_url,
        }.items():  # fmt: skip
            monkeypatch.setenv(var, value)
        result = train_and_publish(
            TrainAndPublishParams(
                ingest=IngestParams(since=SINCE, until=UNTIL, signals=SIGNALS, rate_limit_per_s=0),
                train=TrainParams(hyperparameters=RANGE_HP, runners=["ionet", "vast"]),
                publish=PublishParams(target=gw.base_url, admin_key_file=key_file, tls_cert=cert_file),
            )
        )
        gateway_log = gw.log_text()
    assert result.function_url.startswith(gw.base_url) and result.function_version
    asked, rented = result.train.attempts  # type: ignore[union-attr]
    assert (
        asked["runner"] == "ionet" and "no offer" in asked["reason"] and ionet.calls
    )  # its key was accepted
    assert rented["runner"] == "vast" and vast.launches == 1 and vast.destroyed
    (ask,) = vast.asks
    node_env: dict[str, str] = ask["env"]
    node_tls_key = tlslib.from_env(base.TLS_KEY_ENV, dict(node_env), "PRIVATE KEY")
    assert node_tls_key is not None

    found = {
        "dimo private key": dimo_key, "admin key": admin_key, "publisher key": gw_setup.publisher.key.hex()[2:],
        "vast api key": vast_key, "ionet api key": ionet_key, "node token": node_env[base.TOKEN_ENV],
    }  # fmt: skip
    # the node's private key: each line of its base64 body (64 characters), and each provider env chunk
    key_lines = [ln for ln in node_tls_key.splitlines() if not ln.startswith("-----")]
    found |= {f"node TLS key line {i}": ln for i, ln in enumerate(key_lines) if len(ln) >= 32}
    found |= {k: v for k, v in node_env.items() if k.startswith(base.TLS_KEY_ENV)}
    assert all(len(v) >= 16 for v in found.values())

    logs, artifacts, runs = _prefect_records()
    assert any("vast" in m for m in logs) and any("train-and-publish" in a for a in artifacts)
    console = capfd.readouterr()  # what reached this process's stdout/stderr
    # every log line of this process (Prefect's run loggers and ours), formatted as the console shows them
    assert any("Finished in state Completed" in line for line in log_lines)
    for texts, where in [
        (logs, "Prefect log"), (artifacts, "Prefect artifact"), (runs, "Prefect flow run"),
        ([console.out, console.err], "console"), (log_lines, "log line"), (node_logs, "rented node's agent log"), ([gateway_log], "gateway log"),
    ]:  # fmt: skip
        assert texts
        for text in texts:
            assert not _hits(text, found), f"{_hits(text, found)} in a {where}: {text[:300]}"
    node_key_files = list(
        (tmp_path / "vast").rglob("tls/tls-key.pem")
    )  # the key the node's agent serves with
    assert len(node_key_files) == 1
    holders |= set(node_key_files)
    scanned = _scan([work, tmp_path / "vast", tmp_path / "registry", *_prefect_files()], found, holders)
    assert scanned > 20
