"""Fake third-party APIs for tests, each following its provider's published documents, served on loopback.

Shared pieces: :class:`ServerThread` (a Starlette app under uvicorn in a thread, on a free loopback port,
always stopped) and :class:`AgentPool` (the fakes' "machines": a real ``gpu_jobs.agent.process.AgentProcess``
per launched instance, booted in the background like a real node, stopped on destroy).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import uvicorn
from starlette.applications import Starlette

from depin_core.net import listen_socket

log = logging.getLogger(__name__)


class ServerThread:
    """``app`` served by uvicorn in a daemon thread on ``127.0.0.1:<free port>``; ``url`` once started."""

    def __init__(self, app: Starlette, *, host: str = "127.0.0.1") -> None:
        self.app = app
        self.host = host
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> ServerThread:
        sock = listen_socket(self.host, 0)
        port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True, name="fake-api"
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("fake API server did not start")
            time.sleep(0.01)
        self.url = f"http://{self.host}:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None


class Agent(Protocol):
    url: str

    def start(self) -> Any: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


AgentFactory = Callable[[Path, str], Agent]


def real_agent(data_dir: Path, token: str) -> Agent:
    """A real worker agent (``gpu_jobs.agent.process.AgentProcess``) on a free loopback port."""
    from gpu_jobs.agent.process import AgentProcess

    return AgentProcess(data_dir, token)


def with_node_env(factory: AgentFactory, env: dict[str, str]) -> AgentFactory:
    """``factory`` whose agents also get the node's TLS variables from the provider's ``env`` (the certificate
    and key the client made and pinned), as the bootstrap would pass them to ``depin worker serve``."""
    tls_env = {k: v for k, v in env.items() if k.startswith("DEPIN_AGENT_TLS_")}

    def make(data_dir: Path, token: str) -> Agent:
        agent = factory(data_dir, token)
        extra = getattr(agent, "env", None)
        if isinstance(extra, dict):
            extra.update(tls_env)
        return agent

    return make


class AgentPool:
    """The machines behind a fake: ``boot(key, token, on_ready, on_fail)`` starts an agent in a background
    thread (like a node pulling its image and running the bootstrap), then calls ``on_ready(url)``;
    ``stop(key)`` stops it (at once, or as soon as it finished booting). ``factory=None``: instances never
    get an agent (API-only tests)."""

    def __init__(self, workdir: Path, factory: AgentFactory | None = real_agent) -> None:
        self.workdir = Path(workdir)
        self.factory = factory
        self._lock = threading.Lock()
        self._agents: dict[str, Agent] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._stopped: set[str] = set()

    def boot(
        self,
        key: str,
        token: str,
        on_ready: Callable[[str], None],
        on_fail: Callable[[str], None],
        factory: AgentFactory | None = None,
    ) -> None:
        """``factory`` (when given) replaces the pool's for this machine; nothing boots when the pool has none."""
        if self.factory is None:
            return
        factory = factory or self.factory

        def run() -> None:
            try:
                agent = factory(self.workdir / f"agent-{key}", token)
                with self._lock:
                    if key in self._stopped:
                        return
                    self._agents[key] = agent
                agent.start()
            except Exception as exc:
                log.warning("fake node %s: agent failed to start: %s", key, exc)
                on_fail(f"agent failed to start: {type(exc).__name__}")
                return
            with self._lock:
                stopped = key in self._stopped
            if stopped:
                agent.close()
                return
            on_ready(agent.url)

        t = threading.Thread(target=run, daemon=True, name=f"fake-node-{key}")
        with self._lock:
            self._threads[key] = t
        t.start()

    def agent(self, key: str) -> Agent | None:
        with self._lock:
            return self._agents.get(key)

    def running(self) -> list[str]:
        """Keys of agents whose process is alive."""
        with self._lock:
            items = list(self._agents.items())
        alive = []
        for key, agent in items:
            proc = getattr(agent, "proc", None)
            if proc is None or proc.poll() is None:
                alive.append(key)
        return sorted(alive)

    def stop(self, key: str) -> None:
        with self._lock:
            self._stopped.add(key)
            agent = self._agents.pop(key, None)
            thread = self._threads.pop(key, None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=180)  # a booting agent is stopped once it is up (or failed)
        if agent is not None:
            with contextlib.suppress(Exception):
                agent.close()

    def close(self) -> None:
        with self._lock:
            keys = set(self._agents) | set(self._threads)
        for key in keys:
            self.stop(key)
