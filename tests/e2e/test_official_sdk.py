"""Compatibility: DIMO's official Python SDK (dimo-python-sdk 1.8.0) works unchanged against the emulator.

The SDK pins eth-account 0.13.4, so it lives in its own venv (``<repo>/.venv-dimo-sdk``, created on first
use and reused while valid); ``sdk_script.py`` runs there against an emulator child process. When the env var
CI is set, an SDK that cannot be installed fails the test; without CI an unreachable package index skips it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.dimo.emulator.server import EmulatorProcess
from connectors.dimo.emulator.state import EmulatorConfig
from connectors.dimo.privileges import decode_sacd_permissions
from connectors.dimo.settings import VEHICLE_NFT_PROD
from tests.support.client_venvs import DIMO_SDK, IndexUnreachable, InstallError, obtain

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).with_name("sdk_script.py")


def test_sdk_install_failure_fails_under_ci_and_skips_only_without(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable() -> Path:
        raise IndexUnreachable("package index unreachable: Network is unreachable")

    def hangs() -> Path:
        raise subprocess.TimeoutExpired(["pip", "install"], 480)

    def broken() -> Path:
        raise InstallError("pip install failed: resolver conflict")

    monkeypatch.setenv("CI", "true")
    for ensure in (unreachable, hangs, broken):
        with pytest.raises(pytest.fail.Exception):
            obtain(DIMO_SDK, ensure)
    monkeypatch.delenv("CI")
    for ensure in (unreachable, hangs):
        with pytest.raises(pytest.skip.Exception, match="set CI to make this a failure"):
            obtain(DIMO_SDK, ensure)
    with pytest.raises(pytest.fail.Exception, match="resolver conflict"):
        obtain(DIMO_SDK, broken)


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorProcess]:
    with EmulatorProcess(EmulatorConfig(vehicles=4, days=2, seed=7)) as emu:
        yield emu


def _privileged_ids(emu: EmulatorProcess) -> list[int]:
    """The license's vehicles as our own client sees them (plain httpx, not the SDK)."""
    q = """query($lic: Address!) { vehicles(first: 100, filterBy: {privileged: $lic}) { nodes { tokenId } } }"""
    r = httpx.post(
        emu.credentials["identity_url"],
        json={"query": q, "variables": {"lic": emu.credentials["client_id"]}},
        timeout=10,
    )
    r.raise_for_status()
    return [n["tokenId"] for n in r.json()["data"]["vehicles"]["nodes"]]


def test_official_sdk_end_to_end(emulator: EmulatorProcess) -> None:
    sdk_python = obtain(
        DIMO_SDK
    )  # in the test body: an install failure under CI is a FAILED test, not an error
    proc = subprocess.run(
        [str(sdk_python), str(SCRIPT), str(emulator.credentials_path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    client_id = emulator.credentials["client_id"]

    # Auth: the SDK signed the challenge and got a developer JWT for the license
    dev = out["dev_jwt"]
    assert dev["token_type"] == "bearer" and dev["expires_in"] == dev["lifetime"] > 0
    assert dev["ethereum_address"] == client_id == dev["aud"]

    # Identity: the same vehicles our own client sees, newest token id first
    expected = _privileged_ids(emulator)
    assert out["count"] == 4
    assert expected and out["privileged"]["ids"] == expected == sorted(expected, reverse=True)
    assert out["privileged"]["totalCount"] == len(expected)
    token_id = out["token_id"]
    assert token_id == expected[0]
    mine = [s for s in out["sacds"] if s["grantee"].lower() == client_id.lower()]
    assert len(mine) == 1
    granted = decode_sacd_permissions(mine[0]["permissions"])
    assert 1 in granted and set(granted) <= set(range(1, 9))

    # Token exchange: privileges decoded from the SACD by the SDK, prod NFT address accepted
    vj = out["vehicle_jwt"]
    assert vj["token_id"] == str(token_id) and vj["privilege_ids"] == granted
    assert vj["sub"] == client_id and vj["aud"] == ["dimo.zone"] and vj["lifetime"] == 600
    assert vj["asset"] == f"did:erc721:137:{VEHICLE_NFT_PROD}:{token_id}"

    # Telemetry: real values in plausible ranges
    assert isinstance(out["available"], list) and "speed" in out["available"]
    latest = out["latest"]
    assert 0 <= latest["speed"]["value"] <= 300
    assert latest["powertrainTransmissionTravelledDistance"]["value"] > 0
    if latest["exteriorAirTemperature"] is not None:
        assert -60 <= latest["exteriorAirTemperature"]["value"] <= 70
    assert latest["powertrainType"]["value"] in {"COMBUSTION", "HYBRID", "ELECTRIC"}
    datetime.fromisoformat(latest["speed"]["timestamp"].replace("Z", "+00:00"))

    daily = out["daily_avg_speed"]
    assert daily and all(b["avgSpeed"] is None or 0 <= b["avgSpeed"] <= 250 for b in daily)
    assert any(b["avgSpeed"] for b in daily)
    stamps = [b["timestamp"] for b in daily]
    assert stamps == sorted(stamps)

    assert out["signals_errors"] is None
    buckets = out["signals_6h"]
    assert len(buckets) >= 4
    assert all(b["maxSpeed"] is None or 0 <= b["maxSpeed"] <= 300 for b in buckets)
    assert max(b["maxSpeed"] or 0 for b in buckets) > 5  # it drove at some point in three days
    odo = [b["odo"] for b in buckets if b["odo"] is not None]
    assert odo and odo == sorted(odo)  # the odometer never runs backwards

    # The SDK's VIN query, then current-schema fields (VC validity, dataSummary, signalsSnapshot) via its raw query
    assert isinstance(out["vin"], str) and len(out["vin"]) == 17
    assert out["current_schema_errors"] is None
    current = out["current_schema"]
    assert current["vinVCLatest"]["validFrom"] < current["vinVCLatest"]["validTo"]
    summary = current["dataSummary"]
    assert summary["availableSignals"] == [s["name"] for s in summary["signalDataSummary"]]
    assert set(out["available"]) == set(summary["availableSignals"])
    assert all(s["firstSeen"] <= s["lastSeen"] for s in summary["signalDataSummary"])
    snapshot = {s["name"] for s in current["signalsSnapshot"]["signals"]}
    assert "speed" in snapshot and snapshot <= set(summary["availableSignals"]) | {
        "currentLocationApproximateCoordinates"
    }
    assert current["signalsSnapshot"]["lastSeen"] == max(s["lastSeen"] for s in summary["signalDataSummary"])
