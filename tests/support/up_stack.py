"""Helpers for the ``depin up`` tests: run the CLI as a user does, in a project directory of its own, on free
loopback ports (never a developer's 4200/8787/8765)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from depin_core.net import free_port
from depin_core.proc import alive, descendants

DEPIN = [sys.executable, "-m", "pipelines.cli"]


def clean_env() -> dict[str, str]:
    """This environment without a Prefect server or DIMO account of the developer's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "DEPIN_DIMO_"))}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    return env


def up_args(*, vehicles: int = 3, days: float = 1.0, poll_s: int = 1) -> list[str]:
    """``depin up`` flags: free ports, a small fleet, a fast runner poll."""
    return [
        "up",
        "--port",
        str(free_port()),
        "--gateway-port",
        str(free_port()),
        "--emulator-port",
        str(free_port()),
        "--vehicles",
        str(vehicles),
        "--days",
        str(days),
        "--runner-poll-s",
        str(poll_s),
    ]


def depin(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``depin ARGS`` in ``cwd`` to completion."""
    return subprocess.run(
        [*DEPIN, *args], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )


def last_json(stdout: str) -> dict[str, Any]:
    """The ``--json`` document: the last stdout line."""
    return json.loads(stdout.strip().splitlines()[-1])


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def ports_free(doc: dict[str, Any]) -> list[int]:
    """The ports of ``doc``'s services that something still listens on or a server could not bind again
    (SO_REUSEADDR, as servers bind: connections left in TIME_WAIT do not count). Empty when all were freed."""
    busy = []
    for key in ("ui", "gateway", "emulator"):
        if doc.get(key):
            port = port_of(doc[key])
            with socket.socket() as probe:
                listening = probe.connect_ex(("127.0.0.1", port)) == 0
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    listening = True
            if listening:
                busy.append(port)
    return busy


def tree(pid: int) -> set[int]:
    """``pid`` and its living descendants."""
    return {pid, *descendants(pid)}


def survivors(pids: set[int]) -> list[str]:
    """The command lines of those ``pids`` still alive."""
    out = []
    for pid in sorted(pids):
        if alive(pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:200]
            except OSError:
                cmdline = b"?"
            out.append(f"{pid}: {cmdline!r}")
    return out
