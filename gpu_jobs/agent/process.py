"""``AgentProcess``: the worker agent in a child process on a free loopback port (tests, benchmarks, fakes).

>>> with AgentProcess(tmp / "agent", token) as agent:
...     httpx.get(f"{agent.url}/v1/health", headers={"Authorization": f"Bearer {token}"})

``stop()`` is a graceful SIGTERM (the agent cancels its jobs and waits for their workers; SIGKILL after
``stop_timeout``); ``kill()`` simulates a lost node: SIGKILL to the agent and to every job worker's process group
at once. The token reaches the child through ``$DEPIN_AGENT_TOKEN``, never its command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from depin_core.errors import DepinError
from depin_core.proc import stop_process
from gpu_jobs.agent._auth import TOKEN_ENV


class AgentProcess:
    """The agent as a child process; ``start`` returns once ``/v1/health`` answers 200 with the token."""

    def __init__(
        self,
        data_dir: Path | str,
        token: str | SecretStr,
        host: str = "127.0.0.1",
        port: int = 0,
        env: dict[str, str] | None = None,
        *,
        max_parallel: int = 1,
        max_blob_bytes: int | None = None,
        startup_timeout: float = 120.0,
        stop_timeout: float = 20.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self._token = token if isinstance(token, SecretStr) else SecretStr(token)
        self.host, self.port = host, port
        self.env = dict(env or {})
        self.max_parallel = max_parallel
        self.max_blob_bytes = max_blob_bytes
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="depin-agent-")
        self.ready_path = Path(self._tmp.name) / "ready.json"
        self.log_path = Path(self._tmp.name) / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def __repr__(self) -> str:
        return f"AgentProcess(url={self.url!r}, data_dir={str(self.data_dir)!r}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> AgentProcess:
        """Start the child and wait (up to ``startup_timeout``) for its health route."""
        self.ready_path.unlink(missing_ok=True)
        self.url = ""
        cmd = [
            sys.executable, "-m", "gpu_jobs.agent", "--host", self.host, "--port", str(self.port),
            "--data-dir", str(self.data_dir), "--ready-file", str(self.ready_path),
            "--max-parallel", str(self.max_parallel),
        ]  # fmt: skip
        if self.max_blob_bytes is not None:
            cmd += ["--max-blob-gb", repr(self.max_blob_bytes / 2**30)]
        env = {**os.environ, **self.env, TOKEN_ENV: self._token.get_secret_value()}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        try:
            self._wait_healthy(time.monotonic() + self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self, deadline: float) -> None:
        assert self.proc is not None
        last = ""
        headers = {"Authorization": f"Bearer {self._token.get_secret_value()}"}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DepinError(f"agent exited with code {self.proc.returncode}: {self.log_text()[-3000:]}")
            if not self.url and self.ready_path.exists():
                self.url = json.loads(self.ready_path.read_text())["url"]
            if self.url:
                try:
                    r = httpx.get(f"{self.url}/v1/health", headers=headers, timeout=5)
                    if r.status_code == 200:
                        return
                    last = r.text[:500]
                except httpx.HTTPError as exc:
                    last = repr(exc)
            time.sleep(0.05)
        raise DepinError(
            f"agent not healthy within {self.startup_timeout:.0f}s ({last}); log: {self.log_text()[-2000:]}"
        )

    def log_text(self) -> str:
        """What the child wrote to stdout/stderr so far."""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def worker_pids(self) -> list[int]:
        """The pids of the agent's live child processes (its job workers)."""
        return children(self.proc.pid) if self.proc is not None and self.proc.poll() is None else []

    def stop(self) -> None:
        """SIGTERM: the agent cancels its jobs, waits for their workers and exits (SIGKILL after the timeout)."""
        stop_process(self.proc, timeout=self.stop_timeout)

    def kill(self) -> None:
        """SIGKILL the agent and its job workers (with their process groups) at once: a lost node."""
        if self.proc is None or self.proc.poll() is not None:
            return
        workers = children(self.proc.pid)
        self.proc.send_signal(signal.SIGKILL)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)  # workers lead their own session / process group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        """Stop the child and remove its temp directory (log included)."""
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def children(pid: int) -> list[int]:
    """Live child pids of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    out: list[int] = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry.name))
    return sorted(out)
