"""``ServerProcess``: a local server as a child, started through :class:`Child`, ready once it has written its
ready file and its health routes answer."""

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
from depin_core.proc.child import Child


class ServerProcess:
    """A server in a child process that writes a JSON document with ``ready_key`` (its base URL) to
    ``ready_path`` once listening; its output goes to ``log_path`` in a temp directory of its own.
    ``new_session``: the child leads a process group of its own and stops with it; ``cpu``: pin it to that
    CPU. Subclasses build the command and call ``_launch``."""

    def __init__(
        self,
        name: str,
        *,
        startup_timeout: float,
        stop_timeout: float = 10.0,
        ready_key: str = "url",
        new_session: bool = False,
        cpu: int | None = None,
    ) -> None:
        self.name = name
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.ready_key = ready_key
        self.new_session = new_session
        self.cpu = cpu
        self._tmp = tempfile.TemporaryDirectory(prefix=f"depin-{name.replace(' ', '-')}-")
        self.ready_path = Path(self._tmp.name) / "ready.json"
        self.log_path = Path(self._tmp.name) / f"{name.replace(' ', '-')}.log"
        self.child: Child | None = None
        self.url = ""
        self.ready: dict[str, Any] = {}

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """The child's ``Popen`` (None before ``start``)."""
        return self.child.proc if self.child is not None else None

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
        """Start ``cmd`` (our environment plus ``env``) and wait (``startup_timeout`` in all) for its ready
        file, then until each ``(path, what)`` of ``checks`` answers 200 in turn; ``what`` names it in the
        timeout error. Stops the child on any failure. ``verify``: httpx's (an ``ssl.SSLContext`` pinning the
        child's certificate)."""
        self.ready_path.unlink(missing_ok=True)
        self.url, self.ready = "", {}
        self.child = Child(
            self.name,
            cmd,
            log_path=self.log_path,
            env={**os.environ, **env},
            new_session=self.new_session,
            cpu=self.cpu,
        ).start(die_with_parent=False)
        deadline = time.monotonic() + self.startup_timeout
        try:
            waits: list[tuple[str | None, str]] = [*checks] or [(None, f"{self.name} wrote no ready file")]
            for path, what in waits:
                self._wait_ok(deadline, path, what, headers, timeout, verify)
        except BaseException:
            self.stop()
            raise

    def _wait_ok(
        self,
        deadline: float,
        path: str | None,
        what: str,
        headers: dict[str, str] | None,
        timeout: float,
        verify: Any = True,
    ) -> None:
        """Wait for the ready file, then (unless ``path`` is None) for ``path`` to answer 200."""
        proc = self.proc
        assert proc is not None
        last = ""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DepinError(f"{self.name} exited with code {proc.returncode}: {self.log_text()[-3000:]}")
            if not self.url and self.ready_path.exists():
                self.ready = json.loads(self.ready_path.read_text())
                self.url = self.ready[self.ready_key]
            if self.url and path is None:
                return
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
        """SIGTERM the child (graceful; with ``new_session`` its whole group), SIGKILL after ``stop_timeout``."""
        if self.child is not None:
            self.child.stop(grace_s=self.stop_timeout)

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
