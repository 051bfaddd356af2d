"""Child processes, one launcher for all: :class:`Child` (a command with a log file, optionally a process
group of its own), :class:`ServerProcess` (a local server started through it, ready after a handshake), and
the ``/proc`` helpers to find and stop process trees."""

from depin_core.proc.child import Child
from depin_core.proc.server import ServerProcess
from depin_core.proc.tree import (
    alive,
    children,
    descendants,
    group_alive,
    start_time,
    status_kb,
    stop_process,
    stop_tree,
)

__all__ = [
    "Child",
    "ServerProcess",
    "alive",
    "children",
    "descendants",
    "group_alive",
    "start_time",
    "status_kb",
    "stop_process",
    "stop_tree",
]
