"""``AgentProcess``: the worker agent in a child process on a free loopback port (tests, benchmarks, fakes).

>>> with AgentProcess(tmp / "agent", token) as agent:
...     httpx.get(f"{agent.url}/v1/health", headers=..., verify=client_context(agent.tls_cert))

It serves HTTPS with ``tls`` (a ``NodeCertificate`` handed over as a provider would, through
``$DEPIN_AGENT_TLS_CERT/_KEY``; such variables in ``env`` do the same), else with the self-signed certificate kept in its data dir (made here first,
so ``tls_cert`` is known before it starts); ``insecure_http=True`` serves plain HTTP.

``stop()`` is a graceful SIGTERM (the agent cancels its jobs and waits for their workers; SIGKILL after
``stop_timeout``); ``kill()`` simulates a lost node: SIGKILL to the agent and to every job worker's process group
at once. The token reaches the child through ``$DEPIN_AGENT_TOKEN``, never its command line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import sys
from pathlib import Path

from pydantic import SecretStr

from depin_core import tls as tlslib
from depin_core.proc import ServerProcess, children
from gpu_jobs.agent._auth import TOKEN_ENV
from gpu_jobs.agent.server import TLS_CERT_ENV, TLS_DIR, TLS_KEY_ENV


class AgentProcess(ServerProcess):
    """The agent as a child process; ``start`` returns once ``/v1/health`` answers 200 with the token."""

    def __init__(
        self,
        data_dir: Path | str,
        token: str | SecretStr,
        host: str = "127.0.0.1",
        port: int = 0,
        env: dict[str, str] | None = None,
        *,
        max_parallel: int = 1,
        max_blob_bytes: int | None = None,
        startup_timeout: float = 120.0,
        stop_timeout: float = 20.0,
        tls: tlslib.NodeCertificate | None = None,
        insecure_http: bool = False,
    ) -> None:
        super().__init__("agent", startup_timeout=startup_timeout, stop_timeout=stop_timeout)
        self.data_dir = Path(data_dir)
        self._token = token if isinstance(token, SecretStr) else SecretStr(token)
        self.host, self.port = host, port
        self.env = dict(env or {})
        self.max_parallel = max_parallel
        self.max_blob_bytes = max_blob_bytes
        self.insecure_http = insecure_http
        self._tls = tls

    @property
    def tls_cert(self) -> str | None:
        """The PEM certificate the agent serves (the client's pin); None for plain HTTP."""
        if self.insecure_http:
            return None
        if self._tls is None:
            cert = tlslib.from_env(TLS_CERT_ENV, dict(self.env), "CERTIFICATE")
            key = tlslib.from_env(TLS_KEY_ENV, dict(self.env), "PRIVATE KEY")
            given = tlslib.NodeCertificate(cert, key) if cert and key else None  # as a provider hands it over
            self._tls = given or tlslib.load_or_make(self.data_dir / TLS_DIR)
        return self._tls.cert_pem

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """httpx's ``verify`` for this agent: a context trusting only its certificate (True for plain HTTP)."""
        cert = self.tls_cert
        return tlslib.client_context(cert) if cert else True

    @property
    def fingerprint(self) -> str | None:
        """sha256 of :attr:`tls_cert` (what ``depin worker serve --json`` prints); None for plain HTTP."""
        cert = self.tls_cert
        return tlslib.fingerprint(cert) if cert else None

    def __repr__(self) -> str:
        return f"AgentProcess(url={self.url!r}, data_dir={str(self.data_dir)!r}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> AgentProcess:
        """Start the child and wait (up to ``startup_timeout``) for its health route."""
        cmd = [
            sys.executable, "-m", "gpu_jobs.agent", "--host", self.host, "--port", str(self.port),
            "--data-dir", str(self.data_dir), "--ready-file", str(self.ready_path),
            "--max-parallel", str(self.max_parallel),
        ]  # fmt: skip
        if self.max_blob_bytes is not None:
            cmd += ["--max-blob-gb", repr(self.max_blob_bytes / 2**30)]
        token = self._token.get_secret_value()
        env = {**self.env, TOKEN_ENV: token}
        cert = self.tls_cert
        if cert is None:
            cmd.append("--insecure-http")
        elif self._tls is not None:
            env.update({TLS_CERT_ENV: self._tls.cert_pem, TLS_KEY_ENV: self._tls.key_pem})
        self._launch(
            cmd,
            env,
            [("/v1/health", "agent not healthy")],
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
            verify=self.verify,
        )
        return self

    def worker_pids(self) -> list[int]:
        """The pids of the agent's live child processes (its job workers)."""
        return children(self.proc.pid) if self.proc is not None and self.proc.poll() is None else []

    def stop(self) -> None:
        """SIGTERM: the agent cancels its jobs, waits for their workers and exits (SIGKILL after the timeout)."""
        super().stop()

    def kill(self) -> None:
        """SIGKILL the agent and its job workers (with their process groups) at once: a lost node."""
        if self.proc is None or self.proc.poll() is not None:
            return
        workers = children(self.proc.pid)
        self.proc.send_signal(signal.SIGKILL)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)  # workers lead their own session / process group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
