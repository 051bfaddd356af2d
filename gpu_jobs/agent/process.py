"""``AgentProcess``: the worker agent in a child process on a free loopback port (tests, benchmarks, fakes).

>>> with AgentProcess(tmp / "agent", token) as agent:
...     httpx.get(f"{agent.url}/v1/health", headers={"Authorization": f"Bearer {token}"})

``stop()`` is a graceful SIGTERM (the agent cancels its jobs and waits for their workers; SIGKILL after
``stop_timeout``); ``kill()`` simulates a lost node: SIGKILL to the agent and to every job worker's process group
at once. The token reaches the child through ``$DEPIN_AGENT_TOKEN``, never its command line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

from pydantic import SecretStr

from depin_core.proc import ServerProcess
from gpu_jobs.agent._auth import TOKEN_ENV


class AgentProcess(ServerProcess):
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
        super().__init__("agent", startup_timeout=startup_timeout, stop_timeout=stop_timeout)
        self.data_dir = Path(data_dir)
        self._token = token if isinstance(token, SecretStr) else SecretStr(token)
        self.host, self.port = host, port
        self.env = dict(env or {})
        self.max_parallel = max_parallel
        self.max_blob_bytes = max_blob_bytes

    def __repr__(self) -> str:
        return f"AgentProcess(url={self.url!r}, data_dir={str(self.data_dir)!r}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> AgentProcess:
        """Start the child and wait (up to ``startup_timeout``) for its health route."""
        cmd = [
            sys.executable, "-m", "gpu_jobs.agent", "--host", self.host, "--port", str(self.port),
            "--data-dir", str(self.data_dir), "--ready-file", str(self.ready_path),
            "--max-parallel", str(self.max_parallel),
        ]  # fmt: skip
        if self.max_blob_bytes is not None:
            cmd += ["--max-blob-gb", repr(self.max_blob_bytes / 2**30)]
        token = self._token.get_secret_value()
        self._launch(
            cmd,
            {**self.env, TOKEN_ENV: token},
            [("/v1/health", "agent not healthy")],
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
        )
        return self

    def worker_pids(self) -> list[int]:
        """The pids of the agent's live child processes (its job workers)."""
        return children(self.proc.pid) if self.proc is not None and self.proc.poll() is None else []

    def stop(self) -> None:
        """SIGTERM: the agent cancels its jobs, waits for their workers and exits (SIGKILL after the timeout)."""
        super().stop()

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
