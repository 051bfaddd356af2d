"""Child processes: stop one politely, then firmly; run a local server as a child with a ready-file handshake."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Self

import httpx

from depin_core.errors import DepinError


def stop_process(
    proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None, *, timeout: float = 10.0
) -> None:
    """SIGTERM ``proc`` and wait up to ``timeout`` s, then SIGKILL; a no-op when it already exited."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class ServerProcess:
    """A server in a child process that writes ``{"url", ...}`` to ``ready_path`` once listening; its output
    goes to ``log_path`` in a temp directory of its own. Subclasses build the command and call ``_launch``."""

    def __init__(self, name: str, *, startup_timeout: float, stop_timeout: float = 10.0) -> None:
        self.name = name
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix=f"depin-{name}-")
        self.ready_path = Path(self._tmp.name) / "ready.json"
        self.log_path = Path(self._tmp.name) / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.ready: dict[str, Any] = {}

    def _launch(
        self,
        cmd: list[str],
        env: dict[str, str],
        checks: list[tuple[str, str]],
        *,
        headers: dict[str, str] | None = None,
        timeout: float = 2.0,
        verify: Any = True,
    ) -> None:
        """Start ``cmd`` and wait (``startup_timeout`` in all) until each ``(path, what)`` of ``checks``
        answers 200 in turn; ``what`` names it in the timeout error. Stops the child on any failure.
        ``verify``: httpx's (an ``ssl.SSLContext`` pinning the child's certificate)."""
        self.ready_path.unlink(missing_ok=True)
        self.url, self.ready = "", {}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}
            )
        deadline = time.monotonic() + self.startup_timeout
        try:
            for path, what in checks:
                self._wait_ok(deadline, path, what, headers, timeout, verify)
        except BaseException:
            self.stop()
            raise

    def _wait_ok(
        self,
        deadline: float,
        path: str,
        what: str,
        headers: dict[str, str] | None,
        timeout: float,
        verify: Any = True,
    ) -> None:
        assert self.proc is not None
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DepinError(
                    f"{self.name} exited with code {self.proc.returncode}: {self.log_text()[-3000:]}"
                )
            if not self.url and self.ready_path.exists():
                self.ready = json.loads(self.ready_path.read_text())
                self.url = self.ready["url"]
            if self.url:
                try:
                    r = httpx.get(f"{self.url}{path}", headers=headers, timeout=timeout, verify=verify)
                    if r.status_code == 200:
                        return
                    last = r.text[:500]
                except httpx.HTTPError as exc:
                    last = repr(exc)
            time.sleep(0.05)
        raise DepinError(
            f"{what} within {self.startup_timeout:.0f}s ({last}); log: {self.log_text()[-2000:]}"
        )

    def log_text(self) -> str:
        """What the child wrote to stdout/stderr so far."""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def stop(self) -> None:
        """SIGTERM the child (graceful), SIGKILL after ``stop_timeout``."""
        stop_process(self.proc, timeout=self.stop_timeout)

    def close(self) -> None:
        """Stop the child and remove its temp directory (log included)."""
        self.stop()
        self._tmp.cleanup()

    def start(self) -> Self:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
