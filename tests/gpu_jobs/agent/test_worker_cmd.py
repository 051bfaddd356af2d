"""``depin worker serve`` (``pipelines._worker_cmd.serve``, run through typer as the CLI will)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.gpu_jobs.agent.helpers import TOKEN, auth

pytestmark = pytest.mark.e2e
RUN = "import typer; from pipelines._worker_cmd import serve; typer.run(serve)"


def test_serve_prints_its_url_and_serves(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = {k: v for k, v in os.environ.items() if k != "DEPIN_AGENT_TOKEN"}
    cmd = [sys.executable, "-c", RUN, "--port", "0", "--data-dir", str(tmp_path / "agent"), "--json",
           "--token-file", str(token_file), "--ready-file", str(tmp_path / "ready.json")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        doc = json.loads(line)
        assert doc["url"].startswith("http://127.0.0.1:") and doc["pid"] == proc.pid
        assert doc["data_dir"] == str((tmp_path / "agent").resolve())
        assert json.loads((tmp_path / "ready.json").read_text())["url"] == doc["url"]
        r = httpx.get(f"{doc['url']}/v1/health", headers=auth(), timeout=30)
        assert r.status_code == 200 and r.json()["jobs_running"] == 0
        assert httpx.get(f"{doc['url']}/v1/health", timeout=30).status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert "depin worker agent" in err and TOKEN not in err


def test_serve_without_a_token_fails_with_a_hint(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DEPIN_AGENT_TOKEN"}
    code = f"{RUN.removesuffix('typer.run(serve)')}from depin_core.errors import ConfigError\n"
    code += "try:\n    typer.run(serve)\nexcept ConfigError as e:\n    print(e)\n    raise SystemExit(2)"
    p = subprocess.run(
        [sys.executable, "-c", code, "--data-dir", str(tmp_path / "a")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and "DEPIN_AGENT_TOKEN" in p.stdout
