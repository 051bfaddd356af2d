"""`depin emulator` as a user runs it: flags, credentials file, a served API, a clean Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e


def test_depin_emulator_serves_and_stops_on_ctrl_c(tmp_path) -> None:
    creds = tmp_path / "creds.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "emulator",
            "--port",
            "0",
            "--vehicles",
            "3",
            "--days",
            "1",
            "--cmap",
            "--credentials-out",
            str(creds),
            "--ground-truth-out",
            str(tmp_path / "truth"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not creds.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        doc = json.loads(creds.read_text())
        assert set(doc) == {
            "client_id",
            "domain",
            "private_key",
            "auth_url",
            "token_exchange_url",
            "identity_url",
            "telemetry_url",
        }
        assert doc["auth_url"].startswith("http://127.0.0.1:")
        assert (creds.stat().st_mode & 0o777) == 0o600
        deadline = time.monotonic() + 60
        while True:  # the emulator may still be starting to listen on a busy machine
            try:
                health = httpx.get(doc["auth_url"] + "/healthz", timeout=10).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None, "the emulator never answered"
                time.sleep(0.05)
        assert health["vehicles"] == 3 + 3  # simulated + the three bundled CMAP recordings
        assert (tmp_path / "truth" / "vehicles.parquet").exists() and (
            tmp_path / "truth" / "faults.parquet"
        ).exists()
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "DIMO emulator" in err and doc["private_key"] not in err


def test_depin_emulator_rejects_bad_flags(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "emulator", "--port", "0", "--faults", "bogus=1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "faults: unknown kind 'bogus'" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "emulator", "--port", "0", "--vehicles", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--vehicles" in proc.stderr


@contextmanager
def _depin_emulator(tmp_path: Path, *flags: str) -> Iterator[dict[str, str]]:
    """``depin emulator --port 0 <flags>`` until its credentials file appears; always stopped."""
    creds = tmp_path / "creds.json"
    cmd = [sys.executable, "-m", "pipelines.cli", "emulator", "--port", "0", "--credentials-out", str(creds)]
    proc = subprocess.Popen([*cmd, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not creds.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert creds.exists(), (
            proc.stderr.read() if proc.poll() is not None and proc.stderr else "no credentials"
        )
        doc = json.loads(creds.read_text())
        for _ in range(100):
            try:
                httpx.get(doc["auth_url"] + "/healthz", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        yield doc
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)


def test_depin_emulator_rate_limit_flag(tmp_path) -> None:
    # 0.001 requests/s: a bucket of one request that takes 1000 s to refill, so the second request is refused
    # however slow this machine is.
    with _depin_emulator(tmp_path, "--vehicles", "2", "--days", "0.1", "--rate-limit", "0.001") as doc:
        q = {"query": "{ vehicles(first: 1) { totalCount } }"}
        first = httpx.post(doc["identity_url"], json=q, timeout=10)
        second = httpx.post(doc["identity_url"], json=q, timeout=10)
        other_service = httpx.post(doc["telemetry_url"], json={"query": "{ __typename }"}, timeout=10)
        health = httpx.get(doc["auth_url"] + "/healthz", timeout=10)
    assert first.status_code == 200 and first.json()["data"]["vehicles"]["totalCount"] == 2
    assert second.status_code == 429 and "429 Too Many Requests" in second.text
    assert 990 <= int(second.headers["retry-after"]) <= 1000
    assert other_service.status_code == 200 and health.status_code == 200  # per service; health is exempt


async def test_depin_emulator_legacy_exchange_and_idle_flags(tmp_path) -> None:
    from connectors.dimo.client import DimoClient
    from connectors.dimo.settings import DimoSettings

    flags = ("--vehicles", "4", "--days", "1", "--idle-fraction", "0.5", "--exchange-legacy-only")
    with _depin_emulator(tmp_path, *flags):
        settings = DimoSettings.from_credentials_file(tmp_path / "creds.json", rate_limit_per_s=0)
        async with DimoClient(settings) as client:
            vehicles = await client.discover_vehicles()
            available = {v.token_id: await client.available_signals(v) for v in vehicles}
            assert client.vehicle_tokens.legacy_body  # the current body was refused, the legacy one worked
    assert len(vehicles) == 4
    assert sum(not names for names in available.values()) == 1  # the idle vehicle that never reported
