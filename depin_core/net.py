"""Sockets for our HTTP servers: bound up front (so a server can report its real port) with TCP_NODELAY."""

from __future__ import annotations

import socket

from depin_core.errors import ConfigError


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (0 = a free port) with SO_REUSEADDR and TCP_NODELAY.

    Accepted sockets inherit TCP_NODELAY; without it a response's headers and body (two writes) wait ~40 ms
    for the client's delayed ACK (Nagle) on every keep-alive request. uvicorn calls ``listen`` itself
    (``Server.run(sockets=[sock])``). Raises ``ConfigError`` naming the port when binding fails.
    """
    host = host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"port: cannot bind {host}:{port} ({exc.strerror}); pick another port") from None
    return sock


def url_host(host: str) -> str:
    """``host`` as it appears in a URL (IPv6 addresses in brackets)."""
    return f"[{host}]" if ":" in host else host


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (racy: prefer binding port 0 and reading the real port)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
