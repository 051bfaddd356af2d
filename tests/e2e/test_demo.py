"""``depin demo`` (what ``make demo`` runs) as a user runs it, in a fresh project directory: emulator →
train_and_publish → gateway → one invocation, the JSON summary on stdout and on disk, nothing left running."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipelines.stack.demo import FLEET, FUNCTION
from tests.support.up_stack import DEPIN, clean_env, last_json, ports_free

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_depin_demo_end_to_end(tmp_path: Path) -> None:
    run = subprocess.run(
        [*DEPIN, "demo", "--json"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=280
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert len(run.stdout.strip().splitlines()) == 1  # stdout holds only the JSON line
    summary = last_json(run.stdout)
    assert json.loads((tmp_path / ".depin/demo/summary.json").read_text()) == summary

    assert summary["vehicles"] == FLEET["vehicles"] and summary["rows"] > 100_000
    assert summary["metrics"]["mae"] < summary["baseline"]["baseline_mae"]
    assert summary["function_url"].startswith("http://127.0.0.1:")
    assert summary["function_url"].endswith(f"/v1/functions/{FUNCTION}@prod/invoke")
    invoked = summary["invoke_result"]
    assert invoked["function"] == FUNCTION and len(invoked["outputs"]) == len(invoked["inputs"]) >= 1
    assert all("kwh_per_100km" in row for row in invoked["outputs"])
    stages = summary["stage_seconds"]
    assert {"start_services", "ingest", "train", "publish", "train_and_publish", "invoke", "total"} <= set(
        stages
    )
    assert "demo done" in run.stderr

    # the emulator, gateway and Prefect server it started are gone
    ui = summary["prefect_api"].removesuffix("/api")
    gateway = summary["function_url"].split("/v1/")[0]
    assert ports_free({"ui": ui, "gateway": gateway}) == []
