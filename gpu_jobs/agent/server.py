"""Run the worker agent: ``serve(settings, token)`` in this process (``depin worker serve`` and
``python -m gpu_jobs.agent``); ``gpu_jobs.agent.process.AgentProcess`` runs it as a child.

The admin token comes from ``--token-file`` or ``$DEPIN_AGENT_TOKEN``; only its sha256 is kept, and the
variable is removed from this process's environment so job workers (which run family code) never see it.
It serves HTTPS by default (:func:`resolve_tls`): the certificate and key from ``--tls-cert/--tls-key``, or the
PEM text in ``$DEPIN_AGENT_TLS_CERT`` / ``$DEPIN_AGENT_TLS_KEY`` (how a provider hands the node the certificate
the client made and pinned), else its own self-signed one kept in ``<data dir>/tls`` (stable across restarts).
Plain HTTP only with ``--insecure-http``. SIGTERM / Ctrl-C stop accepting requests, cancel the running jobs and wait for their workers to exit; job
workers also stop themselves when the agent dies abruptly (``gpu_jobs.worker.watch_parent``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

from depin_core import paths
from depin_core import tls as tlslib
from depin_core.errors import ConfigError
from depin_core.fs import atomic_write_bytes
from depin_core.net import listen_socket, url_host
from gpu_jobs.agent._auth import TOKEN_ENV, read_admin_token, token_digest
from gpu_jobs.agent.app import Agent, AgentSettings

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8900
DEFAULT_DATA_DIR = paths.AGENT_DATA_DIR
TLS_CERT_ENV = "DEPIN_AGENT_TLS_CERT"  # PEM text of the certificate (a provider's secret env)
TLS_KEY_ENV = "DEPIN_AGENT_TLS_KEY"  # PEM text of its private key (secret env; removed from os.environ)
TLS_DIR = "tls"  # under the data dir: the certificate served (and the self-signed one kept across restarts)


def resolve_tls(
    data_dir: Path,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    *,
    insecure_http: bool = False,
) -> tlslib.NodeCertificate | None:
    """The certificate to serve: ``cert_file``/``key_file``, else ``$DEPIN_AGENT_TLS_CERT``/``_KEY`` (PEM text, or
    ``depin_core.tls.to_env``'s one-line form; the key variables are then removed from this process's
    environment), else a self-signed one kept in
    ``data_dir/tls``; None with ``insecure_http``. ``ConfigError`` naming the option for a half-given pair."""
    env_cert = tlslib.from_env(TLS_CERT_ENV, os.environ, "CERTIFICATE")
    env_key = tlslib.from_env(TLS_KEY_ENV, os.environ, "PRIVATE KEY", pop=True)  # job workers never see it
    if insecure_http:
        return None
    if (cert_file is None) != (key_file is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both files, or neither")
    if cert_file is not None and key_file is not None:
        try:
            return tlslib.NodeCertificate(cert_file.read_text(), key_file.read_text())
        except OSError as exc:
            raise ConfigError(f"--tls-cert/--tls-key: cannot read {exc.filename} ({exc.strerror})") from None
    if (env_cert is None) != (env_key is None):
        raise ConfigError(f"${TLS_CERT_ENV} and ${TLS_KEY_ENV} go together: set both, or neither")
    if env_cert is not None and env_key is not None:
        return tlslib.NodeCertificate(env_cert, env_key)
    return tlslib.load_or_make(data_dir / TLS_DIR)


class _Server(uvicorn.Server):
    """``uvicorn.Server`` whose graceful shutdown does not hang on TLS: closing a TLS connection waits (up to
    30 s) for the client's close_notify, which an idle keep-alive client never sends, so connections that are
    already closing (idle, or done with their last response) are dropped instead."""

    async def _wait_tasks_to_complete(self) -> None:
        while self.server_state.connections and not self.force_exit:
            for conn in list(self.server_state.connections):
                transport = getattr(conn, "transport", None)
                if transport is not None and transport.is_closing():
                    transport.abort()
            await asyncio.sleep(0.05)
        await super()._wait_tasks_to_complete()


def serve(
    settings: AgentSettings,
    token: str,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    ready_file: Path | str | None = None,
    on_ready: Callable[[dict[str, Any]], None] | None = None,
    log_level: str = "warning",
    tls: tlslib.NodeCertificate | None = None,
) -> None:
    """Serve the agent until interrupted, over HTTPS with ``tls`` (plain HTTP when None). Binds and listens
    first (``ConfigError`` naming the port if it cannot), then writes ``{"url", "host", "port", "pid",
    "tls_fingerprint"}`` to ``ready_file`` and calls ``on_ready`` with it."""
    ssl_files: dict[str, Any] = {}
    if tls is not None:
        cert_path, key_path = tls.write(settings.data_dir / TLS_DIR)
        ssl_files = {"ssl_certfile": str(cert_path), "ssl_keyfile": str(key_path)}
    agent = Agent(settings, token_digest(token))
    del token
    sock = listen_socket(host, port)
    sock.listen(2048)  # connections queue from now on; uvicorn accepts them once it runs
    bound_host, bound_port = sock.getsockname()[:2]
    scheme = "https" if tls is not None else "http"
    doc = {"url": f"{scheme}://{url_host(bound_host)}:{bound_port}", "host": bound_host, "port": bound_port,
           "pid": os.getpid(), "tls_fingerprint": tls.fingerprint if tls is not None else None}  # fmt: skip
    config = uvicorn.Config(
        agent.app, log_level=log_level, access_log=False, lifespan="on", timeout_keep_alive=30, backlog=2048,
        **ssl_files,
    )  # fmt: skip
    server = _Server(config)
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
    parser.add_argument("--tls-cert", type=Path, default=None, help=f"certificate PEM (else ${TLS_CERT_ENV})")
    parser.add_argument("--tls-key", type=Path, default=None, help=f"its key PEM (else ${TLS_KEY_ENV})")
    parser.add_argument("--insecure-http", action="store_true", help="serve plain HTTP (loopback tests only)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    token = read_admin_token(args.token_file)
    os.environ.pop(TOKEN_ENV, None)  # job workers inherit the environment: never the admin token
    tls = resolve_tls(args.data_dir, args.tls_cert, args.tls_key, insecure_http=args.insecure_http)
    settings = AgentSettings(
        data_dir=args.data_dir, max_parallel=args.max_parallel, max_blob_bytes=int(args.max_blob_gb * 2**30)
    )
    with contextlib.suppress(KeyboardInterrupt):
        serve(
            settings,
            token,
            host=args.host,
            port=args.port,
            ready_file=args.ready_file,
            log_level="warning",
            tls=tls,
        )
