"""`depin emulator` as a user runs it: flags, credentials file, a served API, a clean Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

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
        for _ in range(100):
            try:
                health = httpx.get(doc["auth_url"] + "/healthz", timeout=1).json()
                break
            except httpx.HTTPError:
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
