"""A LAN of network namespaces for the multi-host tests: each "host" is a network namespace of its own, joined
to a bridge on this machine by a veth pair (``ip netns``, ``ip link``; root only).

The bridge holds this machine's address on the LAN (:attr:`Lan.address`, ``10.231.N.1``): the control plane's
services (Prefect server, emulator, object store, gateways) bind it, and a host reaches them there and only
there — its own loopback is its own, and nothing it starts is reachable from another host unless it binds its
LAN address. Processes run in a host with ``ip netns exec`` (:meth:`Lan.command`), which execs the command: the
pid is the command's. :meth:`Lan.close` kills what still runs in each namespace, deletes them and the bridge.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
from typing import Self


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can): not root, no ``ip``, or refused."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"dpchk{os.getpid() % 100_000}"
    try:
        _ip("netns", "add", name)
        _ip("netns", "del", name)
    except (OSError, FileNotFoundError) as exc:
        return f"cannot create a network namespace: {exc}"
    return None


class Lan:
    """A bridge ``dpb<id>`` with ``10.231.N.1/24`` and namespaces ``dpn<id>h<i>`` at ``10.231.N.(i+2)``."""

    def __init__(self) -> None:
        used = _ip("-o", "-4", "addr", "show")
        free = [n for n in range(1, 255) if f" 10.231.{n}." not in used]
        if not free:
            raise OSError("no free 10.231.N.0/24 subnet for a test LAN")
        self.subnet = random.choice(free)
        self.id = f"{os.getpid() % 10_000}{self.subnet}"
        self.bridge = f"dpb{self.id}"
        self.address = f"10.231.{self.subnet}.1"
        self.hosts: dict[str, tuple[str, str]] = {}  # name → (namespace, address)

    def __enter__(self) -> Self:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_host(self, name: str) -> str:
        """A new namespace on the LAN for host ``name``; returns its address."""
        i = len(self.hosts)
        ns, outside, inside = f"dpn{self.id}h{i}", f"dpv{self.id}h{i}", f"dpv{self.id}n{i}"
        address = f"10.231.{self.subnet}.{i + 2}"
        _ip("netns", "add", ns)
        self.hosts[name] = (ns, address)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        _ip("link", "set", inside, "netns", ns)
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inside)
        _ip("-n", ns, "link", "set", inside, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return address

    def command(self, name: str, argv: list[str]) -> list[str]:
        """``argv`` to run in host ``name``'s namespace."""
        return ["ip", "netns", "exec", self.hosts[name][0], *argv]

    def close(self) -> None:
        for ns, _ in self.hosts.values():
            try:
                for pid in _ip("netns", "pids", ns).split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                _ip("netns", "del", ns)  # its veth end goes with it, and the bridge's peer too
            except OSError:
                pass
        self.hosts.clear()
        with contextlib.suppress(OSError):
            _ip("link", "del", self.bridge)
