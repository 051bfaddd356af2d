"""A stand-in for a fresh Fluence VM that runs our gateway bootstrap for real, as root, on this machine.

What is real: the exact script (``/bin/sh``, as root), every file it writes (``/etc/depin``, ``/opt/depin``,
``/var/lib/depin``, ``/etc/systemd/system``), ``useradd``, ``python3 -m venv`` + ``pip install uv``,
``uv venv`` with this machine's ``/usr/bin/python3``, ``uv pip install`` of the project's wheel *and all its
dependencies*, and the gateway process (``/opt/depin/venv/bin/depin serve``, as the ``depin`` user, settings
from ``/etc/depin/gateway.env``) answering ``/readyz``.

What is simulated, and how:

- the VM's disk: a private mount namespace (``unshare --mount``, held by a sleeping process; every command
  enters it with ``nsenter``) where ``/etc``, ``/opt``, ``/var``, ``/usr`` and ``/root`` are overlays whose
  writes land in this VM's temp directory; this machine's real files are never changed. Needs root
  (:func:`unavailable` says why not). PIDs and users are this machine's;
- the VM's network: a network namespace of its own with only loopback (the gateway's ``0.0.0.0`` is the VM's,
  and nothing can be downloaded); :meth:`Vm.forward` plays its public IP + open port: ``127.0.0.1:port`` here
  is forwarded to the port inside the VM;
- systemd (not running here): a ``systemctl`` shim first on PATH. ``daemon-reload``/``enable`` do nothing;
  ``start``/``restart`` read the unit the script wrote and start its ``ExecStart`` as ``User=`` in
  ``WorkingDirectory=`` with exactly the ``EnvironmentFile=`` settings (plus PATH/HOME/USER/LANG as systemd
  sets them);
- the package index: pip and uv see none, only a local wheelhouse (``PIP_FIND_LINKS``, uv's ``find-links``)
  holding the same wheels PyPI serves (``pip download`` of the project's dependencies and uv, once, kept in
  ``<repo>/.venv-wheelhouse``; torch is the CPU wheel the dev venv has). uv links files from a per-process
  cache (``UV_LINK_MODE=symlink``) and never downloads a Python (``UV_PYTHON_DOWNLOADS=never``); uv's
  ``no-index`` (a ``UV_CONFIG_FILE``) also drops the script's ``--extra-index-url`` for CPU torch;
- cloud-init (generation B): :func:`run_cloud_init` applies the user data's ``write_files`` (content, mode,
  owner) and runs its ``runcmd`` in order, as cloud-init's modules of those names do.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx

from serving.fluence.bootstrap import UV_VERSION
from tests.support import node_image
from tests.support.node_image import REPO, kill_group

WHEELHOUSE = REPO / ".venv-wheelhouse"
_LAYERS = ("etc", "opt", "var", "usr", "root")
_BOOT = """set -e
ip link set lo up
for d in {layers}; do
  mount -t overlay "depin-vm-$d" -o "lowerdir=/$d,upperdir=$DEPIN_VM_LAYERS/$d/u,workdir=$DEPIN_VM_LAYERS/$d/w" "/$d"
done
touch "$DEPIN_VM_STATE/booted"
exec sleep 2147483647
""".format(layers=" ".join(_LAYERS))

SYSTEMCTL_SHIM = r'''#!/usr/bin/python3
"""systemctl for a machine without systemd (tests): start a unit's ExecStart as its User= with its
EnvironmentFile= and WorkingDirectory=; daemon-reload and enable do nothing."""
import os, pwd, shlex, signal, subprocess, sys, time

STATE = os.environ.get("DEPIN_VM_STATE", "/run")
args = [a for a in sys.argv[1:] if not a.startswith("-")]
verb, units = (args[0] if args else ""), args[1:]
with open(os.path.join(STATE, "systemctl.log"), "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\n")
if verb in ("daemon-reload", "enable", "disable"):
    sys.exit(0)


def unit_file(unit):
    for base in ("/etc/systemd/system", "/lib/systemd/system"):
        path = os.path.join(base, unit)
        if os.path.exists(path):
            return path
    sys.exit(f"Unit {unit} not found.")


def running(pid):
    try:
        with open(f"/proc/{pid}/status") as fh:
            return "\tZ" not in fh.read().split("State:")[1].split("\n")[0]
    except (FileNotFoundError, IndexError):
        return False


def stop(unit):
    """SIGTERM the unit's process and wait for it to end (SIGKILL after 90 s), as systemd does."""
    pidfile = os.path.join(STATE, unit + ".pid")
    if not os.path.exists(pidfile):
        return
    pid = int(open(pidfile).read())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 90
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if running(pid):
        os.kill(pid, signal.SIGKILL)
    os.unlink(pidfile)


def start(unit):
    service, section = {}, None
    for line in open(unit_file(unit)):
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            service[key.strip()] = value.strip()
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    user = service.get("User", "root")
    pw = pwd.getpwnam(user)
    env.update(HOME=pw.pw_dir, USER=user, LOGNAME=user)
    if service.get("EnvironmentFile"):
        for line in open(service["EnvironmentFile"].lstrip("-")):
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                env[key.strip()] = value.strip()
    out = open(os.path.join(STATE, unit + ".log"), "ab")
    proc = subprocess.Popen(
        shlex.split(service["ExecStart"]), env=env, cwd=service.get("WorkingDirectory", "/"),
        user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], stdin=subprocess.DEVNULL, stdout=out,
        stderr=subprocess.STDOUT,
    )
    with open(os.path.join(STATE, unit + ".pid"), "w") as fh:
        fh.write(str(proc.pid))


for unit in units:
    if verb in ("stop", "restart"):
        stop(unit)
    if verb in ("start", "restart"):
        start(unit)
    elif verb not in ("stop",):
        sys.exit(f"systemctl shim: {verb} is not supported")
'''


FORWARDER = r"""
import asyncio, ctypes, os, socket, sys
host_port, ns_path, vm_port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
listener = socket.create_server(("127.0.0.1", host_port))  # on this machine's loopback
fd = os.open(ns_path, os.O_RDONLY)
if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:  # CLONE_NEWNET: later sockets are the VM's
    sys.exit(f"setns: errno {ctypes.get_errno()}")


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def handle(client_r, client_w):
    try:
        vm_r, vm_w = await asyncio.open_connection("127.0.0.1", vm_port)
    except OSError:
        client_w.close()
        return
    await asyncio.gather(pipe(client_r, vm_w), pipe(vm_r, client_w))


async def main():
    server = await asyncio.start_server(handle, sock=listener)
    print("forwarding", flush=True)
    await server.serve_forever()


asyncio.run(main())
"""


def unavailable() -> str | None:
    """Why a VM cannot run here (None when it can): it needs root, ``unshare``/``nsenter`` and ``ip``."""
    if os.geteuid() != 0:
        return "a VM stand-in needs root (mount namespace + overlayfs)"
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "unshare/nsenter (util-linux) are missing"
    r = subprocess.run(["unshare", "--mount", "--net", "true"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"unshare --mount --net fails here: {r.stderr.strip()[:200]}"
    if shutil.which("ip") is None:
        return "ip (iproute2) is missing: the VM's loopback cannot be brought up"
    return None


def vm_python() -> str:
    """The ``python3`` a VM's PATH finds (the one ``uv venv`` picks): the wheelhouse is made for it."""
    found = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if found is None:
        raise RuntimeError("no python3 in /usr/local/bin:/usr/bin:/bin for the VM stand-in")
    return found


def _wheelhouse_key() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = importlib.metadata.version("torch")
    version = subprocess.run(
        [vm_python(), "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    tag = f"{version}-{platform.machine()}"
    return hashlib.sha256("\n".join([*deps, "uv", torch, tag]).encode()).hexdigest()


def wheelhouse() -> Path:
    """``<repo>/.venv-wheelhouse``: wheels of the project's dependencies and of uv for the VM's ``python3``
    (its ``pip download``: markers such as ``python_full_version`` differ between 3.11 patch releases), made
    on first use and reused while the dependency list and that Python are the same. torch only as the dev
    venv's own CPU build (a constraint pins it; the multi-GB CUDA build is never fetched)."""
    with node_image._lock:  # fake VMs boot in threads: one download
        if "wheelhouse" not in node_image._cache:
            node_image._cache["wheelhouse"] = _make_wheelhouse()
        return node_image._cache["wheelhouse"]  # type: ignore[return-value]


def _make_wheelhouse() -> Path:
    key = _wheelhouse_key()
    marker = WHEELHOUSE / ".complete"
    if marker.exists() and marker.read_text() == key:
        return WHEELHOUSE
    torch = importlib.metadata.version("torch")
    if "+cpu" not in torch:
        raise RuntimeError(f"the dev venv's torch is {torch}, not a CPU build: refusing to fetch torch")
    tmp = Path(tempfile.mkdtemp(prefix=".venv-wheelhouse-", dir=REPO))
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (tmp / "requirements.txt").write_text("\n".join([*deps, f"uv=={UV_VERSION}"]) + "\n")
    (tmp / "constraints.txt").write_text(f"torch=={torch}\n")
    cmd = [vm_python(), "-m", "pip", "download", "-q", "--disable-pip-version-check", "-d", str(tmp)]
    cmd += ["-r", str(tmp / "requirements.txt"), "-c", str(tmp / "constraints.txt")]
    if Path("/opt/wheels").is_dir():
        cmd += ["--find-links", "/opt/wheels"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"pip download of the gateway's dependencies failed: {r.stderr[-2000:]}")
    (tmp / ".complete").write_text(key)
    tmp.chmod(0o755)
    if WHEELHOUSE.exists():
        shutil.rmtree(WHEELHOUSE, ignore_errors=True)
    with contextlib.suppress(OSError):  # another test process may have finished first: keep its copy
        tmp.rename(WHEELHOUSE)
    shutil.rmtree(tmp, ignore_errors=True)
    return WHEELHOUSE


class Vm:
    """One VM: its disk layers, its ``systemctl`` shim and state, and the bootstrap processes it runs.

    ``run(argv, stdin=...)`` starts ``argv`` as root inside the VM (a new process group); ``wait_ready``
    polls the gateway's ``/readyz``; ``file(path)`` reads what the VM wrote; ``stop`` kills everything the
    VM started (the gateway included)."""

    def __init__(self, root: Path | None = None) -> None:
        why = unavailable()
        if why:
            raise RuntimeError(why)
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="depin-vm-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.layers = self.root / "layers"
        for d in _LAYERS:
            (self.layers / d / "u").mkdir(parents=True, exist_ok=True)
            (self.layers / d / "w").mkdir(parents=True, exist_ok=True)
        self.state = self.root / "state"
        self.state.mkdir(exist_ok=True)
        shim = self.root / "shim"
        shim.mkdir(exist_ok=True)
        (shim / "systemctl").write_text(SYSTEMCTL_SHIM)
        (shim / "systemctl").chmod(0o755)
        self.shim = shim
        self.log_path = self.root / "bootstrap.log"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.holder: subprocess.Popen[bytes] | None = None
        self.closed = False
        self.started_at = 0.0
        self.ready_s: float | None = None  # seconds from the first run() until /readyz answered 200

    def env(self) -> dict[str, str]:
        """Root's environment on the VM, with its package mirror (the wheelhouse) and the shim."""
        wh = str(wheelhouse())
        session = node_image._session_dir()
        cache, config = session / "uv-cache", session / "uv.toml"
        with node_image._lock:
            if not config.exists():
                cache.mkdir(exist_ok=True)
                config.write_text(f"no-index = true\nfind-links = [{wh!r}]\n")  # uv has no env var for it
        return {
            "PATH": f"{self.shim}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "DEPIN_VM_STATE": str(self.state),
            "PIP_NO_INDEX": "1",
            "PIP_FIND_LINKS": wh,
            "PIP_CONFIG_FILE": os.devnull,
            "PIP_ROOT_USER_ACTION": "ignore",
            "UV_CONFIG_FILE": str(config),
            "UV_CACHE_DIR": str(cache),
            "UV_LINK_MODE": "symlink",
            "UV_PYTHON_DOWNLOADS": "never",
        }

    def boot(self, *, timeout_s: float = 30.0) -> None:
        """Start the VM: a process that mounts its disk layers in a new mount namespace and then sleeps,
        holding the namespace that every :meth:`run` enters."""
        if self.closed:
            raise RuntimeError("the VM was closed")
        if self.holder is not None:
            return
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEPIN_VM_LAYERS": str(self.layers)}
        env["DEPIN_VM_STATE"] = str(self.state)
        with open(self.state / "boot.log", "ab") as log:
            self.holder = subprocess.Popen(
                ["unshare", "--mount", "--net", "--propagation", "private", "/bin/sh", "-c", _BOOT],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while not (self.state / "booted").exists():
            if self.holder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the VM did not boot: {(self.state / 'boot.log').read_text()[-1000:]}")
            time.sleep(0.02)

    def run(self, argv: list[str], *, stdin: bytes | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` as root inside the VM (booting it first); ``stdin`` is written to it and closed."""
        self.boot()
        assert self.holder is not None
        ns = f"/proc/{self.holder.pid}/ns"
        cmd = ["nsenter", f"--mount={ns}/mnt", f"--net={ns}/net", "--", *argv]
        env = self.env()
        with open(self.log_path, "ab") as log:
            if not self.started_at:
                self.started_at = time.monotonic()
            proc = subprocess.Popen(
                cmd,
                env=env,
                cwd="/",
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        if stdin is not None and proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(stdin)
            proc.stdin.close()
        return proc

    def forward(self, port: int, vm_port: int | None = None) -> None:
        """Make the VM's ``vm_port`` (default ``port``; any address inside the VM) reachable at
        ``127.0.0.1:port`` here, as a VM's public IP and open port are (the VM has a network of its own)."""
        self.boot()
        assert self.holder is not None
        with open(self.state / "forward.log", "ab") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    FORWARDER,
                    str(port),
                    f"/proc/{self.holder.pid}/ns/net",
                    str(vm_port or port),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the listener is bound once it says so
        if b"forwarding" not in line:
            kill_group(proc)
            raise RuntimeError(f"port forwarding failed: {(self.state / 'forward.log').read_text()[-500:]}")
        self.procs.append(proc)

    def file(self, path: str) -> Path:
        """Where the VM's ``path`` (under one of its overlaid directories) was written on this machine."""
        top, _, rest = path.lstrip("/").partition("/")
        if top not in _LAYERS:
            raise ValueError(f"{path}: not on the VM's disk layers {_LAYERS}")
        return self.layers / top / "u" / rest

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        for extra in sorted(self.state.glob("*.log")):
            text += f"\n--- {extra.name} ---\n" + extra.read_text(errors="replace")[-3000:]
        return text[-6000:]

    def wait_ready(self, url: str, *, timeout_s: float = 600.0, verify: Any = True) -> None:
        """Poll ``{url}/readyz`` until 200 (``verify``: httpx's, e.g. an SSLContext pinning the gateway's
        certificate); ``RuntimeError`` with the logs when a bootstrap exited non-zero or on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for proc in self.procs:
                code = proc.poll()
                if code not in (None, 0):
                    raise RuntimeError(f"the bootstrap exited {code}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2.0, verify=verify).status_code == 200:
                    self.ready_s = time.monotonic() - self.started_at
                    return
            time.sleep(0.2)
        raise RuntimeError(f"no /readyz at {url} within {timeout_s:.0f} s:\n{self.log()}")

    def stop(self) -> None:
        """Kill everything the VM runs: each run's process group (the gateway included), then the VM."""
        for proc in self.procs:
            kill_group(proc)
        kill_group(self.holder)
        self.holder = None

    def close(self) -> None:
        """Stop everything and delete the VM's disk layers; the VM cannot run anything after that."""
        self.closed = True
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


CLOUD_INIT_RUNNER = r"""
import grp, os, pwd, shlex, subprocess, sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
for f in doc.get("write_files") or []:
    os.makedirs(os.path.dirname(f["path"]), exist_ok=True)
    with open(f["path"], "w") as fh:
        fh.write(f.get("content") or "")
    os.chmod(f["path"], int(str(f.get("permissions", "0644")), 8))
    user, _, group = str(f.get("owner", "root:root")).partition(":")
    os.chown(f["path"], pwd.getpwnam(user).pw_uid, grp.getgrnam(group or user).gr_gid)
code = 0
for cmd in doc.get("runcmd") or []:
    code = subprocess.call(cmd if isinstance(cmd, list) else ["sh", "-c", cmd])
sys.exit(code)
"""


def run_cloud_init(vm: Vm, user_data: str) -> subprocess.Popen[bytes]:
    """Boot ``vm`` with ``user_data`` (``#cloud-config``): write_files, then runcmd, as root."""
    path = vm.root / "user-data"
    path.write_text(user_data)
    return vm.run([sys.executable, "-c", CLOUD_INIT_RUNNER, str(path)])
