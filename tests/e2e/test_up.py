"""``depin up`` / ``depin down`` as a user runs them: a real Prefect server, emulator, gateway and served
deployments on free loopback ports; Ctrl-C (foreground) and ``depin down`` (background) stop every process,
flow runs included, and free the ports."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from depin_core.errors import ConfigError
from depin_core.proc import Child, alive
from pipelines.stack.up import STATE_FILE, _check_port, real_dimo_configured
from tests.support.up_stack import DEPIN, clean_env, depin, last_json, ports_free, survivors, tree, up_args

pytestmark = pytest.mark.e2e


def _check_services(doc: dict, cwd: Path) -> None:
    """Every URL answers; the UI talks to this server's API; the limit and deployments exist."""
    assert httpx.get(f"{doc['api']}/health", timeout=5).status_code == 200
    assert httpx.get(doc["ui"], timeout=5).status_code == 200
    assert httpx.get(f"{doc['ui']}/ui-settings", timeout=5).json()["api_url"] == doc["api"]
    assert httpx.get(f"{doc['gateway']}/healthz", timeout=5).status_code == 200
    assert httpx.get(f"{doc['emulator']}/healthz", timeout=5).status_code == 200
    limit = httpx.get(f"{doc['api']}/v2/concurrency_limits/dimo-api", timeout=5).json()
    assert limit["limit"] >= 1
    served = httpx.post(f"{doc['api']}/deployments/filter", json={}, timeout=5).json()
    assert len(served) == len(doc["deployments"]) >= 1
    state = json.loads((cwd / STATE_FILE).read_text())
    assert state["ready"] and state["urls"]["ui"] == doc["ui"]
    assert set(state["children"]) == {"prefect-server", "emulator", "gateway", "deployments"}
    assert (cwd / ".depin/emulator/credentials.json").exists()  # where the flows look by default


def _start_run(doc: dict, flow: str) -> str:
    """Create a run of ``flow``'s first served deployment through the API; returns its id."""
    name = next(d for d in doc["deployments"] if d.startswith(f"{flow}/"))
    dep = httpx.get(f"{doc['api']}/deployments/name/{name}", timeout=5).json()
    run = httpx.post(f"{doc['api']}/deployments/{dep['id']}/create_flow_run", json={}, timeout=10).json()
    return run["id"]


def _wait_state(doc: dict, run_id: str, states: set[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = httpx.get(f"{doc['api']}/flow_runs/{run_id}", timeout=5).json()["state"]["type"]
        if state in states:
            return state
        time.sleep(0.5)
    return state


def _read_json_line(proc: subprocess.Popen[str], timeout: float) -> dict:
    """The first stdout line of ``proc`` that is a JSON object (the ``--json`` ready line)."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"depin up printed no ready line (exit code {proc.poll()})")


def test_up_foreground_ctrl_c_stops_everything(tmp_path: Path) -> None:
    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        proc = subprocess.Popen(
            [*DEPIN, *up_args(), "--json"],
            cwd=tmp_path,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        doc = _read_json_line(proc, timeout=240)
        _check_services(doc, tmp_path)
        # a flow run in flight: the runner starts it in a session of its own, Ctrl-C must still stop it
        run_id = _start_run(doc, "train-and-publish")
        state = _wait_state(doc, run_id, {"RUNNING", "COMPLETED", "FAILED", "CRASHED"})
        pids = tree(proc.pid)  # read from /proc now; the supervisor notes descendants again when it stops
        services = json.loads((tmp_path / STATE_FILE).read_text())["children"]
        assert len(services) == 4 and {c["pid"] for c in services.values()} <= pids
        if state == "RUNNING":  # supervisor + 4 services + the flow run's process
            assert len(pids) >= 6, pids
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0, err.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "depin up: stopped" in err.read_text()
    assert survivors(pids) == []
    assert ports_free(doc) == []
    assert not (tmp_path / STATE_FILE).exists()


def test_up_background_and_down(tmp_path: Path) -> None:
    started = depin(*up_args(), "--background", "--json", cwd=tmp_path)
    assert started.returncode == 0, started.stderr[-3000:]
    doc = last_json(started.stdout)
    try:
        assert doc["background"] is True
        assert os.getsid(doc["pid"]) == doc["pid"]  # detached: a session of its own
        _check_services(doc, tmp_path)
        pids = tree(doc["pid"])

        again = depin(*up_args(), "--json", cwd=tmp_path, timeout=60)
        assert again.returncode == 2
        assert "already runs here" in again.stderr and "depin down" in again.stderr
    finally:
        stopped = depin("down", "--json", cwd=tmp_path, timeout=120)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    result = last_json(stopped.stdout)
    assert result["stopped"] is True and result["pid"] == doc["pid"]
    assert survivors(pids) == []
    assert ports_free(doc) == []
    assert not (tmp_path / STATE_FILE).exists()

    nothing = depin("down", "--json", cwd=tmp_path, timeout=60)
    assert nothing.returncode == 0 and last_json(nothing.stdout)["stopped"] is False


def test_up_no_serve_leaves_the_deployments_to_workers(tmp_path: Path) -> None:
    """``--no-serve``: the server, emulator and gateway start, but no process of ours serves a deployment (so
    workers of a pool, ``depin deploy --pool``, are the only ones that take runs)."""
    started = depin(*up_args(), "--no-serve", "--background", "--json", cwd=tmp_path)
    assert started.returncode == 0, started.stderr[-3000:]
    doc = last_json(started.stdout)
    try:
        assert doc["deployments"] == []
        listed = httpx.post(f"{doc['api']}/deployments/filter", json={"limit": 10}, timeout=10)
        assert listed.status_code == 200 and listed.json() == []
        assert httpx.get(f"{doc['gateway']}/healthz", timeout=10).status_code == 200
        state = json.loads((tmp_path / STATE_FILE).read_text())
        assert "deployments" not in state["children"] and "gateway" in state["children"]
    finally:
        stopped = depin("down", "--json", cwd=tmp_path, timeout=120)
    assert stopped.returncode == 0, stopped.stderr[-3000:]


def test_child_stop_kills_group_and_escaped_descendants(tmp_path: Path) -> None:
    """A service that ignores SIGTERM and has a grandchild in a new session (like a flow run): both die."""
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "subprocess.Popen([sys.executable, '-c', 'import signal,time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'], start_new_session=True)\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    child = Child(
        "stubborn",
        [sys.executable, "-c", script],
        log_path=tmp_path / "log",
        env=dict(os.environ),
        cwd=tmp_path,
    )
    child.start()
    deadline = time.monotonic() + 30
    while "ready" not in child.log_tail() and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = tree(child.pid)
    assert len(pids) == 2
    killed = child.stop(grace_s=0.5)
    assert sorted(killed) == sorted(pids)
    assert not any(alive(p) for p in pids)


def test_port_in_use_is_a_clear_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"--gateway-port 127.0.0.1:{port} is in use"):
            _check_port("127.0.0.1", port, "--gateway-port")


def test_real_dimo_configured_skips_the_emulator() -> None:
    assert not real_dimo_configured({})
    assert not real_dimo_configured({"DEPIN_DIMO_ENV": "emulator"})
    assert real_dimo_configured({"DEPIN_DIMO_ENV": "production"})
    assert real_dimo_configured({"DEPIN_DIMO_CLIENT_ID": "0x" + "1" * 40})
