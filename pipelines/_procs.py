"""Child services for ``depin up``: each in its own process group, output to a log file, stopped with its
whole group and with every descendant that left the group (a flow run or job may start a session of its own).

Linux details (no-ops elsewhere): a child gets SIGTERM if its parent dies (``PR_SET_PDEATHSIG``), and
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
import time
from collections.abc import Iterable
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None


def _die_with_parent() -> None:  # runs in the forked child, before exec
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (index 0 = state), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot): with the pid, an identity that survives
    pid reuse. None if the process is gone or on a system without ``/proc``."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def alive(pid: int, started: int | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, if ``started`` is given, is still the same process."""
    fields = _stat_fields(pid)
    if fields is None:
        if sys.platform == "linux":
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return fields[0] != "Z" and (started is None or int(fields[19]) == started)


def descendants(pid: int) -> set[int]:
    """Every living descendant of ``pid`` (children, grandchildren, …), read from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is left (zombies of reaped-later leaders count as gone)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    if Path("/proc").is_dir():  # killpg(0) also succeeds for a group made only of zombies
        for entry in Path("/proc").iterdir():
            fields = _stat_fields(int(entry.name)) if entry.name.isdigit() else None
            if fields and int(fields[2]) == pgid and fields[0] != "Z":
                return True
        return False
    return True


def stop_tree(pgids: Iterable[int], pids: Iterable[int], *, grace_s: float = 10.0) -> list[int]:
    """SIGTERM the process groups ``pgids`` and the processes ``pids``, wait up to ``grace_s``, then SIGKILL
    whatever is left. Returns the pids that had to be killed."""
    pgids, pids = set(pgids), set(pids)
    for pgid in pgids:
        _signal_group(pgid, signal.SIGTERM)
    _signal_pids(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not any(group_alive(g) for g in pgids) and not any(alive(p) for p in pids):
            return []
        time.sleep(0.1)
    left = sorted(p for p in pids if alive(p))
    for pgid in pgids:
        _signal_group(pgid, signal.SIGKILL)
    _signal_pids(left, signal.SIGKILL)
    # SIGKILL is delivered asynchronously: return only once the killed processes are really gone (bounded)
    deadline = time.monotonic() + 5.0
    while any(alive(p) for p in left) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


class Child:
    """One service as a child process in a new session (its own process group); stdout and stderr go to
    ``log_path``. ``stop`` terminates the group and the descendants that started new sessions."""

    def __init__(self, name: str, cmd: list[str], *, log_path: Path, env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
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
                start_new_session=True,
                preexec_fn=_die_with_parent if die_with_parent else None,  # only prctl, before exec
            )
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def remember_descendants(self) -> None:
        """Note the child's current descendants, so they can be stopped even after their parent exits."""
        if self.running():
            self._seen |= descendants(self.pid)

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def stop(self, grace_s: float = 10.0) -> list[int]:
        """Stop the child, its group and its known descendants; returns the pids that needed SIGKILL."""
        if self.proc is None:
            return []
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
