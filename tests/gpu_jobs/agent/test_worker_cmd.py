"""``depin worker serve`` (``pipelines.cli.worker.serve``, run through typer as the CLI will)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from depin_core import tls
from tests.gpu_jobs.agent.helpers import TOKEN, auth

pytestmark = pytest.mark.e2e
RUN = "import typer; from pipelines.cli.worker import serve; typer.run(serve)"


def _serve(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], dict[str, object]]:
    """``depin worker serve --json`` on a free port; the process and its JSON line."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPIN_AGENT_")}
    cmd = [sys.executable, "-c", RUN, "--port", "0", "--data-dir", str(tmp_path / "agent"), "--json",
           "--token-file", str(token_file), "--ready-file", str(tmp_path / "ready.json"), *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        return proc, json.loads(line)
    except ValueError:
        proc.kill()
        raise AssertionError(f"no JSON line: {line!r} {proc.communicate(timeout=30)[1][-2000:]}") from None


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    return proc.communicate(timeout=30)[1]


def test_serve_prints_its_https_url_and_fingerprint_and_serves(tmp_path: Path) -> None:
    proc, doc = _serve(tmp_path)
    try:
        url, fp = str(doc["url"]), str(doc["tls_fingerprint"])
        assert url.startswith("https://127.0.0.1:") and doc["pid"] == proc.pid
        assert doc["data_dir"] == str((tmp_path / "agent").resolve())
        assert json.loads((tmp_path / "ready.json").read_text())["url"] == url
        cert = tls.fetch_certificate(url, fp)  # what `depin worker register --fingerprint` pins
        pinned = tls.client_context(cert)
        r = httpx.get(f"{url}/v1/health", headers=auth(), timeout=30, verify=pinned)
        assert r.status_code == 200 and r.json()["jobs_running"] == 0
        assert httpx.get(f"{url}/v1/health", timeout=30, verify=pinned).status_code == 401
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{url}/v1/health", headers=auth(), timeout=30)  # system CAs do not know it
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(f"http://{url.removeprefix('https://')}/v1/health", timeout=30)  # no plain HTTP
    finally:
        err = _stop(proc)
    assert "depin worker agent" in err and fp in err and TOKEN not in err
    proc, again = _serve(tmp_path)  # a restart keeps the certificate its clients pinned
    _stop(proc)
    assert again["tls_fingerprint"] == fp


def test_serve_uses_the_certificate_it_is_given_or_plain_http_when_told(tmp_path: Path) -> None:
    made = tls.make_certificate()
    cert, key = made.write(tmp_path / "given")
    proc, doc = _serve(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        assert doc["tls_fingerprint"] == made.fingerprint
        r = httpx.get(
            f"{doc['url']}/v1/health", headers=auth(), timeout=30, verify=tls.client_context(made.cert_pem)
        )
        assert r.status_code == 200
    finally:
        _stop(proc)
    proc, doc = _serve(tmp_path / "plain", "--insecure-http")
    try:
        assert str(doc["url"]).startswith("http://127.0.0.1:") and doc["tls_fingerprint"] is None
        assert httpx.get(f"{doc['url']}/v1/health", headers=auth(), timeout=30).status_code == 200
    finally:
        _stop(proc)


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
