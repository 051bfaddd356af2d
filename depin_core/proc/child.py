"""``Child``: one command as a child process, output to a log file, optionally in a process group of its
own (then stopped with its whole group and every descendant that left it), optionally pinned to a CPU.

Linux details (no-ops elsewhere): a child may get SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), and
descendants are found through ``/proc``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from depin_core.proc.tree import descendants, stop_process, stop_tree

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None


def _before_exec(die_with_parent: bool, cpu: int | None) -> Callable[[], None] | None:
    """What the forked child runs before exec (None: nothing): only system calls, no locks taken."""
    if not die_with_parent and cpu is None:
        return None

    def run() -> None:
        if die_with_parent and _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if cpu is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {cpu})  # before exec: every thread and child it makes inherits the pin

    return run


class Child:
    """``cmd`` as a child process; stdout and stderr go to ``log_path`` (appended). ``env``: its whole
    environment (default: ours). ``new_session``: it leads a process group of its own, and ``stop`` ends that
    group and the descendants that started sessions of their own; otherwise ``stop`` ends the child alone.
    ``cpu``: pin it (and what it starts) to that CPU, where the OS allows."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        *,
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        new_session: bool = True,
        cpu: int | None = None,
    ) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.new_session = new_session
        self.cpu = cpu
        self.proc: subprocess.Popen[bytes] | None = None
        self._seen: set[int] = set()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, *, die_with_parent: bool = True) -> Child:
        """Start the child; with ``die_with_parent`` it gets SIGTERM when this process dies."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=self.new_session,
                preexec_fn=_before_exec(die_with_parent, self.cpu),
            )
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def remember_descendants(self) -> None:
        """Note the child's current descendants, so they can be stopped even after their parent exits."""
        if self.running():
            self._seen |= descendants(self.pid)

    def log_tail(self, chars: int = 3000) -> str:
        """The last ``chars`` characters of the log ("" if there is none)."""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def stop(self, grace_s: float = 10.0) -> list[int]:
        """SIGTERM the child (with ``new_session``: its group and its known descendants too), SIGKILL what is
        left after ``grace_s``; returns the pids that needed SIGKILL."""
        if self.proc is None:
            return []
        if not self.new_session:
            pid = self.proc.pid
            return [pid] if stop_process(self.proc, timeout=grace_s) else []
        self.remember_descendants()
        pgids = {self.pid}
        for pid in self._seen:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                pgids.add(os.getpgid(pid))
        pgids.discard(os.getpgrp())  # never signal our own group
        killed = stop_tree(pgids, self._seen | {self.pid}, grace_s=grace_s)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        return killed
