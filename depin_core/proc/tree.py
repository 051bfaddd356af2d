"""Processes as the kernel sees them (Linux ``/proc``; fallbacks elsewhere): identity across pid reuse,
descendants, process groups, and stopping a whole tree politely, then firmly."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (index 0 = state), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _all_stats() -> dict[int, list[str]]:
    """pid → stat fields of every process (empty without ``/proc``)."""
    found: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))):
            found[int(entry.name)] = fields
    return found


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


def children(pid: int) -> list[int]:
    """The living (not zombie) child pids of ``pid``, sorted; empty without ``/proc``."""
    return sorted(p for p, fields in _all_stats().items() if int(fields[1]) == pid and fields[0] != "Z")


def descendants(pid: int) -> set[int]:
    """Every living descendant of ``pid`` (children, grandchildren, …), read from ``/proc``."""
    kids: dict[int, list[int]] = {}
    for child, fields in _all_stats().items():
        kids.setdefault(int(fields[1]), []).append(child)
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def status_kb(pid: int, key: str) -> int | None:
    """``key`` (``VmHWM``: peak RSS, ``VmRSS``) of ``/proc/<pid>/status`` in kB; None if the process is gone
    or the field is missing (or without ``/proc``)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is left (zombies of reaped-later leaders count as gone)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    if Path("/proc").is_dir():  # killpg(0) also succeeds for a group made only of zombies
        return any(int(f[2]) == pgid and f[0] != "Z" for f in _all_stats().values())
    return True


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


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


def stop_process(
    proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None, *, timeout: float = 10.0
) -> bool:
    """SIGTERM ``proc`` and wait up to ``timeout`` s, then SIGKILL; a no-op when it already exited. Returns
    whether it had to be killed."""
    if proc is None or proc.poll() is not None:
        return False
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return True
    return False
