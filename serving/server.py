"""Run the gateway: ``serve(settings)`` in this process, or ``GatewayProcess`` as a child process.

``python -m serving.server --settings-json '{...}' [--ready-file PATH]`` is the child's entry point (users run
``depin serve``). The listening socket is bound before uvicorn starts (port 0 = a free port; the real address
is written to the ready file) and has TCP_NODELAY, which keep-alive clients need to avoid ~40 ms stalls.
uvicorn[standard] brings uvloop and httptools; SIGTERM/Ctrl-C stop accepting, finish in-flight requests,
then drain every batcher.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import ssl
import sys
from pathlib import Path

import uvicorn

from depin_core.fs import atomic_write_bytes
from depin_core.net import listen_socket, url_host
from depin_core.proc import ServerProcess
from depin_core.tls import client_context
from serving.gateway import Gateway
from serving.settings import GatewaySettings


def serve(
    settings: GatewaySettings | None = None,
    *,
    ready_file: Path | str | None = None,
    gateway: Gateway | None = None,
) -> None:
    """Serve the gateway until interrupted. Binds first (``ConfigError`` naming the port if it cannot), then
    writes ``{"url", "host", "port", "pid"}`` to ``ready_file`` if given (``https://`` when
    ``tls_cert_file``/``tls_key_file`` are set). Models load in the background: poll
    ``/readyz``."""
    import prometheus_client

    prometheus_client.disable_created_metrics()  # the *_created series only add noise to /metrics
    settings = settings or GatewaySettings()
    gateway = gateway or Gateway(settings)  # validates trusted publishers / keys before binding
    sock = listen_socket(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    url = f"{settings.scheme}://{url_host(host)}:{port}"
    tls: dict[str, str] = {}
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        tls = {"ssl_certfile": str(settings.tls_cert_file), "ssl_keyfile": str(settings.tls_key_file)}
    config = uvicorn.Config(
        gateway.app,
        log_level=settings.log_level,
        access_log=settings.access_log,
        lifespan="on",
        timeout_keep_alive=30,
        backlog=2048,
        **tls,  # type: ignore[arg-type]
    )
    server = uvicorn.Server(config)
    # The imports (torch, numpy, pydantic…) leave ~10⁶ long-lived objects; frozen, the collector never walks
    # them again, which removes tens-of-ms pauses from the latency tail.
    gc.collect()
    gc.freeze()
    if ready_file is not None:
        doc = {"url": url, "host": host, "port": port, "pid": os.getpid()}
        atomic_write_bytes(Path(ready_file), json.dumps(doc).encode())
    logging.getLogger(__name__).info("gateway listening on %s (registry %s)", url, settings.registry_dir)
    server.run(sockets=[sock])


class GatewayProcess(ServerProcess):
    """The gateway in a child process on a free loopback port (unless ``settings.port`` was set explicitly),
    for tests, benchmarks and demos. ``start`` returns once ``/healthz`` answers (and ``/readyz``, with
    ``wait_ready``); ``stop`` sends SIGTERM (graceful) and kills after 10 s. The child's stderr goes to
    ``log_path``.

    >>> with GatewayProcess(GatewaySettings(registry_dir=reg, trusted_publishers=[addr])) as gw:
    ...     httpx.post(f"{gw.base_url}/v1/functions/range/invoke", json={"inputs": [...]})
    """

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        startup_timeout: float = 120.0,
        wait_ready: bool = True,
        env: dict[str, str] | None = None,
        cpu: int | None = None,
    ) -> None:
        super().__init__("gateway", startup_timeout=startup_timeout, cpu=cpu)
        explicit = "port" in settings.model_fields_set and settings.port
        self.settings = settings if explicit else settings.model_copy(update={"port": 0})
        self.wait_ready = wait_ready
        self.env = env

    @property
    def base_url(self) -> str:
        """The gateway's URL once it is listening (``""`` before)."""
        return self.url

    @property
    def port(self) -> int:
        """The port it listens on (0 before)."""
        return int(self.ready.get("port", 0))

    def start(self) -> GatewayProcess:
        cmd = [
            sys.executable,
            "-m",
            "serving.server",
            "--settings-json",
            self.settings.model_dump_json(),
            "--ready-file",
            str(self.ready_path),
        ]
        paths = ["/healthz", "/readyz"] if self.wait_ready else ["/healthz"]
        verify: ssl.SSLContext | bool = True
        if self.settings.tls_cert_file is not None:  # its own health checks pin its certificate
            verify = client_context(Path(self.settings.tls_cert_file).read_text())
        checks = [(path, f"gateway {path} not OK") for path in paths]
        self._launch(cmd, self.env or {}, checks, verify=verify)
        return self


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.server")
    parser.add_argument(
        "--settings-json", default=None, help="GatewaySettings as JSON (default: environment)"
    )
    parser.add_argument("--ready-file", default=None, help="write the bound URL here once listening")
    args = parser.parse_args(argv)
    settings = (
        GatewaySettings.model_validate_json(args.settings_json) if args.settings_json else GatewaySettings()
    )
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    with contextlib.suppress(KeyboardInterrupt):
        serve(settings, ready_file=args.ready_file)


if __name__ == "__main__":
    main()
