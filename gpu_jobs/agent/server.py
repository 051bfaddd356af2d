"""Run the worker agent: ``serve(settings, token)`` in this process (``depin worker serve`` and
``python -m gpu_jobs.agent``); ``gpu_jobs.agent.process.AgentProcess`` runs it as a child.

The admin token comes from ``--token-file`` or ``$DEPIN_AGENT_TOKEN``; only its sha256 is kept, and the
variable is removed from this process's environment so job workers (which run family code) never see it.
SIGTERM / Ctrl-C stop accepting requests, cancel the running jobs and wait for their workers to exit; job
workers also stop themselves when the agent dies abruptly (``gpu_jobs.worker.watch_parent``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

from depin_core.fs import atomic_write_bytes
from depin_core.net import listen_socket, url_host
from gpu_jobs.agent._auth import TOKEN_ENV, read_admin_token, token_digest
from gpu_jobs.agent.app import Agent, AgentSettings

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8900
DEFAULT_DATA_DIR = Path(".depin/agent")


def serve(
    settings: AgentSettings,
    token: str,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    ready_file: Path | str | None = None,
    on_ready: Callable[[dict[str, Any]], None] | None = None,
    log_level: str = "warning",
) -> None:
    """Serve the agent until interrupted. Binds and listens first (``ConfigError`` naming the port if it
    cannot), then writes ``{"url", "host", "port", "pid"}`` to ``ready_file`` and calls ``on_ready`` with it."""
    agent = Agent(settings, token_digest(token))
    del token
    sock = listen_socket(host, port)
    sock.listen(2048)  # connections queue from now on; uvicorn accepts them once it runs
    bound_host, bound_port = sock.getsockname()[:2]
    doc = {"url": f"http://{url_host(bound_host)}:{bound_port}", "host": bound_host, "port": bound_port,
           "pid": os.getpid()}  # fmt: skip
    config = uvicorn.Config(
        agent.app, log_level=log_level, access_log=False, lifespan="on", timeout_keep_alive=30, backlog=2048
    )
    server = uvicorn.Server(config)
    if ready_file is not None:
        atomic_write_bytes(Path(ready_file), json.dumps(doc).encode())
    if on_ready is not None:
        on_ready(doc)
    log.info("worker agent listening on %s (data %s)", doc["url"], agent.data_dir)
    try:
        server.run(sockets=[sock])
    finally:
        agent.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m gpu_jobs.agent``: the agent's command line (same options as ``depin worker serve``)."""
    parser = argparse.ArgumentParser(prog="python -m gpu_jobs.agent", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (0.0.0.0 to serve the network)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0 = a free port)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="blobs, jobs and outputs")
    parser.add_argument("--token-file", type=Path, default=None, help=f"admin token file (else ${TOKEN_ENV})")
    parser.add_argument(
        "--ready-file", type=Path, default=None, help="write {url, pid, …} here once listening"
    )
    parser.add_argument("--max-parallel", type=int, default=1, help="jobs running at once")
    parser.add_argument("--max-blob-gb", type=float, default=20.0, help="largest blob accepted (GiB)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    token = read_admin_token(args.token_file)
    os.environ.pop(TOKEN_ENV, None)  # job workers inherit the environment: never the admin token
    settings = AgentSettings(
        data_dir=args.data_dir, max_parallel=args.max_parallel, max_blob_bytes=int(args.max_blob_gb * 2**30)
    )
    with contextlib.suppress(KeyboardInterrupt):
        serve(
            settings, token, host=args.host, port=args.port, ready_file=args.ready_file, log_level="warning"
        )
