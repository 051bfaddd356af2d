"""Run our worker bootstrap scripts for real on this machine: the project's wheel, a stand-in for a stock
PyTorch image, and a "machine" that runs a script and is stopped with its whole process group.

What is real: the exact script (``/bin/sh`` runs it), ``pip install`` of a wheel built from this checkout
(``depin-pipeline @ file:///…whl``), the ``depin`` console script pip writes, and the agent that script starts,
answering ``/v1/health`` with its token. Each machine has its own HOME, data directory and port.

What is simulated: the image. A provider's stock PyTorch image has a Python with torch; here each machine's
``python3`` is a fresh venv (``venv --without-pip``) of the Python the dev venv was made from, whose
``sys.path`` also holds the dev venv's installed packages (a symlink copy of its site-packages *without* the
project), so pip finds every dependency installed and installs only the wheel. pip runs with
``PIP_NO_INDEX=1``, no config file and only the wheel's directory as ``PIP_FIND_LINKS`` (the node's "index",
so a plain ``depin-pipeline`` requirement installs this checkout too): a missing dependency fails the run
instead of being downloaded (on a real node pip would fetch it from PyPI). The container's port mapping is
played by a free loopback port (``DEPIN_AGENT_HOST``/``DEPIN_AGENT_PORT``/``DEPIN_AGENT_DATA_DIR`` set by the
machine, as a provider's environment can).

Everything is built once per test process (``project_wheel``, ``node_image``) and removed at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import ssl
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import httpx

from depin_core import tls
from depin_core.net import free_port
from depin_core.proc import group_alive, stop_tree

REPO = Path(__file__).resolve().parents[2]
_PACKAGES = ("depin_core", "connectors", "gpu_jobs", "serving", "pipelines")
_lock = threading.RLock()
_cache: dict[str, object] = {}


def _session_dir() -> Path:
    """One temp directory per test process (removed at exit) for the wheel and the image."""
    with _lock:
        if "dir" not in _cache:
            path = Path(tempfile.mkdtemp(prefix="depin-nodes-"))
            path.chmod(0o755)  # a VM's gateway user reads the uv cache below it (symlinked files)
            atexit.register(shutil.rmtree, path, True)
            _cache["dir"] = path
        return _cache["dir"]  # type: ignore[return-value]


def project_wheel() -> Path:
    """The project's wheel, built once per process from a copy of this checkout's sources
    (``pip wheel --no-deps --no-build-isolation``: setuptools from the dev venv, nothing downloaded)."""
    with _lock:  # held while building: fake nodes boot in threads
        if "wheel" in _cache:
            return _cache["wheel"]  # type: ignore[return-value]
        root = _session_dir()
        src, out = root / "src", root / "wheel"
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        for name in _PACKAGES:
            shutil.copytree(REPO / name, src / name, ignore=ignore)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, src / name)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src)]
        r = subprocess.run([*cmd, "-w", str(out)], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"building the project wheel failed: {r.stderr[-2000:]}")
        (wheel,) = out.glob("depin_pipeline-*.whl")
        _cache["wheel"] = wheel
        return wheel


def wheel_requirement() -> str:
    """``depin-pipeline @ file:///…/depin_pipeline-….whl``: the package source a bootstrap gets in tests."""
    return f"depin-pipeline @ {project_wheel().as_uri()}"


class NodeImage:
    """The stand-in image: the base Python of the dev venv plus a symlink copy of the dev venv's
    site-packages without the project (no ``depin_pipeline`` metadata, no editable finder)."""

    def __init__(self, root: Path) -> None:
        self.base_python = Path(getattr(sys, "_base_executable", sys.executable))
        self.site = root / "image-site"
        self.site.mkdir(parents=True)
        dev_site = Path(sysconfig.get_paths()["purelib"])
        for entry in dev_site.iterdir():
            name = entry.name
            if name.startswith(("depin_pipeline", "__editable__", "depin-pipeline")) or name in _PACKAGES:
                continue
            (self.site / name).symlink_to(entry)

    def new_python(self, prefix: Path) -> Path:
        """A fresh venv at ``prefix`` whose ``python3`` sees the image's packages; its bin directory."""
        subprocess.run(
            [str(self.base_python), "-m", "venv", "--without-pip", str(prefix)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        (site,) = prefix.glob("lib/python3*/site-packages")
        (site / "_depin_image.pth").write_text(f"import site; site.addsitedir({str(self.site)!r})\n")
        return prefix / "bin"


def node_image() -> NodeImage:
    """The process-wide :class:`NodeImage` (made on first use)."""
    with _lock:
        if "image" not in _cache:
            _cache["image"] = NodeImage(_session_dir())
        return _cache["image"]  # type: ignore[return-value]


def kill_group(proc: subprocess.Popen[bytes] | None, *, timeout: float = 15.0) -> None:
    """SIGTERM the process group led by ``proc`` (what a script started in the background included), wait,
    then SIGKILL it."""
    if proc is None:
        return
    stop_tree([proc.pid], [], grace_s=timeout)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)


class _Group:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.leader = proc

    def poll(self) -> int | None:
        code = self.leader.poll()
        return None if code is None or group_alive(self.leader.pid) else code


class Machine:
    """A rented node: its own directory (HOME, the image's Python, the agent's data) and a free loopback port.

    ``run(argv)`` starts the bootstrap as the provider would (``argv`` is the provider's command, e.g.
    ``["/bin/sh", "-c", onstart]``) with ``env`` on top of the node's environment; ``wait_health`` waits for
    the agent; ``stop`` kills the process group (the agent included, also when the script backgrounded it).
    """

    def __init__(self, root: Path, *, image: NodeImage | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.home = self.root / "home"
        self.home.mkdir(exist_ok=True)
        self.data_dir = self.root / "agent-data"
        self.log_path = self.root / "bootstrap.log"
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"  # the agent serves HTTPS by default
        self.tls_cert: str | None = None  # the certificate handed to the node (else its own, in its data dir)
        self.bin = (image or node_image()).new_python(self.root / "python")
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_s: float | None = None  # seconds from run() until /v1/health answered

    def env(self, extra: dict[str, str]) -> dict[str, str]:
        """The node's environment: the image's Python first on PATH, its own HOME, the agent on loopback at
        this machine's port (over any port ``extra`` names: the provider maps the container's port to it);
        pip reaches no index, only this checkout's wheel (so a plain ``depin-pipeline`` requirement installs
        it too). ``extra``: the provider's environment for the node."""
        return {
            "PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "PIP_NO_INDEX": "1",
            "PIP_FIND_LINKS": str(project_wheel().parent),  # the node's "index": this checkout's wheel
            "PIP_CONFIG_FILE": os.devnull,
            **extra,
            # the container's port maps to this free loopback port (no container network here)
            "DEPIN_AGENT_HOST": "127.0.0.1",
            "DEPIN_AGENT_PORT": str(self.port),
            "DEPIN_AGENT_DATA_DIR": str(self.data_dir),
        }

    def run(
        self, argv: list[str], env: dict[str, str], *, unset: tuple[str, ...] = ()
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a new process group, output to ``log_path``; ``unset``: variables of
        :meth:`env` to leave out (e.g. ``DEPIN_AGENT_PORT``, to run the script's own default)."""
        full = {k: v for k, v in self.env(env).items() if k not in unset}
        self.tls_cert = tls.from_env("DEPIN_AGENT_TLS_CERT", dict(full), "CERTIFICATE")
        with open(self.log_path, "ab") as log:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                argv,
                env=full,
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.proc

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        agent_log = self.data_dir / "agent.log"
        if agent_log.exists():
            text += "\n--- agent.log ---\n" + agent_log.read_text(errors="replace")
        return text[-4000:]

    @property
    def verify(self) -> ssl.SSLContext | None:
        """A client context pinning the node's certificate: the one handed to it, else the self-signed one
        its agent keeps in its data dir (None until that exists)."""
        cert = self.tls_cert
        own = self.data_dir / "tls" / "tls-cert.pem"
        if cert is None and own.exists():
            cert = own.read_text()
        return tls.client_context(cert) if cert else None

    def wait_health(self, token: str, *, timeout_s: float = 240.0) -> dict[str, object]:
        """Poll ``GET /v1/health`` over pinned HTTPS with the token until it answers 200 (its JSON).
        ``RuntimeError`` with the log's tail when the script failed (non-zero exit) or on timeout."""
        deadline = time.monotonic() + timeout_s
        headers = {"Authorization": f"Bearer {token}"}
        while time.monotonic() < deadline:
            code = self.proc.poll() if self.proc else None
            if code not in (None, 0):
                raise RuntimeError(f"the bootstrap exited {code}:\n{self.log()}")
            verify = self.verify
            with contextlib.suppress(httpx.HTTPError):
                if verify is None:
                    raise httpx.ConnectError("no certificate yet")
                r = httpx.get(f"{self.url}/v1/health", headers=headers, timeout=2.0, verify=verify)
                if r.status_code == 200:
                    self.ready_s = time.monotonic() - self.started_at
                    return r.json()
            time.sleep(0.1)
        raise RuntimeError(f"no /v1/health at {self.url} within {timeout_s:.0f} s:\n{self.log()}")

    def stop(self) -> None:
        kill_group(self.proc)


class ScriptAgent:
    """A fake provider's instance (``tests.support.fakes.Agent``): a :class:`Machine` running the bootstrap the fake
    received (``argv``, ``env``: the provider's command and environment). ``start`` waits until the agent
    answers ``/v1/health`` with the token; ``url`` is then its loopback URL."""

    def __init__(self, root: Path, token: str, argv: list[str], env: dict[str, str]) -> None:
        self.root, self.token, self.argv, self.env = Path(root), token, argv, env
        self.machine: Machine | None = None
        self.url = ""

    @property
    def proc(self) -> _Group | None:
        """``poll()`` is None while anything the bootstrap started (a backgrounded agent too) runs."""
        return _Group(self.machine.proc) if self.machine and self.machine.proc else None

    def start(self) -> ScriptAgent:
        self.machine = Machine(self.root)
        self.machine.run(self.argv, {**self.env, "DEPIN_AGENT_TOKEN": self.token})
        try:
            self.machine.wait_health(self.token)
        except Exception:
            self.machine.stop()
            raise
        self.url = self.machine.url
        return self

    def stop(self) -> None:
        if self.machine is not None:
            self.machine.stop()

    def close(self) -> None:
        self.stop()
