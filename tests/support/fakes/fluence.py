"""A local fake of the Fluence public API (generation A or B, plus GPU containers) that really runs the gateway.

It follows Fluence's public API (its docs, and its OpenAPI document for generation B): generation A (``/marketplace/offers``, ``/vms/v3`` with
``openPorts``, ``/vms/v3/status``, ``default_images``, ``estimate``; errors ``{"error"}``; missing/invalid key →
403), generation B (clusters, configurations, ``/v2/vms`` with ``cloudInit.userData`` ≤ 16 KiB, interfaces +
security groups, ``/v1/prices/cost``, ``/v1/ssh_keys``; paginated lists; errors ``{code, error}``; missing/invalid
key → 401), and GPU containers (``/gpu/plans/``, ``/gpu/instances/``; errors ``{"detail"}``).

Generation B answers exactly the shapes of Fluence's published OpenAPI document (v0.10.0; the e2e test
``test_fluence_openapi.py`` validates every exchange against it) and refuses request bodies that break it with 400
``{"code": "bad_request", "error": "<field>: ..."}`` (``tests/support/fakes/fluence_wire.py``): e.g. security-group rules
as the ``{"type", "rules"}`` object instead of an array, a boot disk ``osImage`` that is not an image URL, an id
that is not a UUID. ``legacy_lists = True`` answers the older snapshot's bare lists (clusters with ``dc_id``).
Auth: B takes ``X-API-KEY: <key>`` and/or ``Authorization: X-API-KEY <key>`` (both forms the document shows),
A and GPU take ``X-API-KEY`` and/or the older docs' ``Authorization: Bearer <key>``. ``GET /v1/service/status``
and ``/v1/storages/default_images`` are public and answer for every account, generation A's included (one host).

When a VM boots, the gateway is started for real (``serving.server.GatewayProcess`` on 127.0.0.1 at the requested
``DEPIN_GATEWAY_PORT``, with a temp registry), from the bootstrap the publisher sent (design-6-7 "The gateway
bootstrap format"): generation B reads the ``#cloud-config`` user data (``yaml.safe_load``; invalid YAML → VM
``failed``) and its ``write_files`` entry ``/etc/depin/gateway.env``; generation A runs an SSH server per VM on
a loopback port (``ssh_port(vm_id)``; user = the default image's username, key = one of the VM's ``sshKeys``) and,
on ``exec sh -s`` with the script on stdin, extracts the env heredoc and starts the gateway. Statuses advance
over time (``step_s`` apart): A ``New → Launching → Active``, B ``new → launching → launched``. Gateways stop on
delete/terminate and when the fake stops: no orphan processes.

``run_bootstrap = True`` runs the bootstrap itself instead (root only; ``tests.support.vm``, about a minute per
VM): a launched generation-B VM applies its user data's ``write_files`` and ``runcmd``, and generation A's
``sh -s`` runs the script it received, in a stand-in VM of its own (overlay disk, own network); the script
installs the package with uv and starts the gateway through its systemd unit, and the VM's gateway port is
forwarded to 127.0.0.1. The SSH client gets the script's real exit status and output.

Datacenters: ``datacenters`` (country, city) pairs, default one in Paris. Generation B has a cluster per
datacenter (``GET /v1/clusters`` with its ``dcId``, ``GET /v1/datacenters``); generation A has an offer per
datacenter and places a VM in the first datacenter matching ``constraints.datacenter.countries``. Each VM's
public address is a loopback address of its own (127.0.0.1, then .2, … for VMs running at the same time), and
its gateway binds it, so replicas on one port do not collide.

Failure knobs: ``no_offer`` (every create/estimate → 422 "No suitable offer found"), ``insufficient_balance``
(creates → B 422 ``insufficient_balance``, GPU 400 ``{"detail": "Insufficient balance ..."}``), ``fail_next = "failed"``
(the next VM fails: B ``failed``, A ``Terminated``, GPU ``FAILED``), ``fail_next = "never_ready"`` (the next VM
comes up but never runs a gateway), ``creates_left`` (after that many more creates, creates answer 422 "No
suitable offer found": capacity gone between the estimate and the create), prices (``price_per_epoch_usd``, ``price_hourly_usd``, ``gpu_price_hour``),
and ``inject_errors(status, times, retry_after=None)`` (the next requests answer that status).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import re
import secrets
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import uvicorn
import yaml
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from depin_core.net import free_port, listen_socket
from depin_core.tls import client_context
from serving.server import GatewayProcess
from serving.settings import GatewaySettings
from tests.support.fakes.fluence_wire import body_problem, uuid_problem

ENV_PATH = "/etc/depin/gateway.env"
_PUBLIC = frozenset({"/v1/service/status", "/v1/storages/default_images"})
MAX_USER_DATA = 16 * 1024
_HEREDOC = re.compile(r"^cat > /etc/depin/gateway\.env <<'DEPIN_ENV'\n(.*?)^DEPIN_ENV$", re.M | re.S)
TLS_CERT_PATH, TLS_KEY_PATH = "/etc/depin/tls-cert.pem", "/etc/depin/tls-key.pem"
_TLS_HEREDOC = {
    path: re.compile(r"^cat > " + re.escape(path) + r" <<'(DEPIN_TLS_\w+)'\n(.*?)^\1$", re.M | re.S)
    for path in (TLS_CERT_PATH, TLS_KEY_PATH)
}
_ENV_LINE = re.compile(r"^([A-Z_][A-Z0-9_]*)=(.*)$")
_NAME_A = re.compile(r"^[A-Za-z0-9-]{1,63}$")
_NAME_GPU = re.compile(r"^[a-z0-9-]{1,25}$")
_SH = {"sh -s", "sh", "bash -s", "bash", "sudo sh -s", "sudo -n sh -s", "sudo bash -s", "sudo -n bash -s"}
_IMAGE_EXT = (".qcow2", ".img", ".raw", ".raw.xz", ".raw.gz", ".img.xz", ".img.gz")
DEFAULT_IMAGES = [
    {
        "id": "df6e9992f8694635a67baafadf5a1905",
        "name": "22.04 (LTS) x64",
        "distribution": "Ubuntu",
        "slug": "ubuntu-22-04-x64",
        "downloadUrl": "https://cloud-images.ubuntu.com/releases/22.04/release/ubuntu-22.04-server-cloudimg-amd64.img",
        "iconUrl": "https://fluence.test/icons/ubuntu.svg",
        "username": "ubuntu",
        "createdAt": "2025-01-01T00:00:00Z",
        "updatedAt": "2025-01-01T00:00:00Z",
    },
    {
        "id": "da1e99153be74618820a164eebcbdc66",
        "name": "24.04 (LTS) x64",
        "distribution": "Ubuntu",
        "slug": "ubuntu-24-04-x64",
        "downloadUrl": "https://cloud-images.ubuntu.com/releases/24.04/release/ubuntu-24.04-server-cloudimg-amd64.img",
        "iconUrl": "https://fluence.test/icons/ubuntu.svg",
        "username": "ubuntu",
        "createdAt": "2025-01-01T00:00:00Z",
        "updatedAt": "2025-01-01T00:00:00Z",
    },
]
USER_ID = "00000000-0000-4000-8000-000000000001"
BASIC_CONFIGURATIONS = [
    "cpu-2-ram-4gb-storage-25gb",
    "cpu-4-ram-8gb-storage-25gb",
    "cpu-8-ram-16gb-storage-25gb",
]


def parse_env_lines(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines (blank lines and comments skipped); ``ValueError`` on anything else."""
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _ENV_LINE.match(line)
        if not m:
            raise ValueError(f"not a KEY=VALUE line: {line[:60]!r}")
        env[m.group(1)] = m.group(2)
    return env


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _money(x: float) -> str:
    return f"{x:.6f}".rstrip("0").rstrip(".") if x else "0"


@dataclass
class _Gateway:
    """A gateway process of one VM / GPU instance and the thread starting it."""

    proc: GatewayProcess
    thread: threading.Thread | None = None
    error: str | None = None
    registry: tempfile.TemporaryDirectory[str] | None = None

    def stop(self) -> None:
        self.proc.stop()  # also aborts a start in progress (its wait sees the process gone)
        if self.thread is not None:
            self.thread.join(timeout=180)
        self.proc.close()
        if self.registry is not None:
            self.registry.cleanup()

    @property
    def alive(self) -> bool:
        return self.proc.proc is not None and self.proc.proc.poll() is None


@dataclass
class _VmGateway:
    """``run_bootstrap``: the gateway a stand-in VM runs (what its bootstrap started), seen at
    ``127.0.0.1:port``; alive once it answered ``/readyz`` and while its process runs."""

    port: int
    machine: Any = None  # tests.support.vm.Vm
    tls_cert: str | None = None  # the certificate the bootstrap was given: HTTPS, pinned
    error: str | None = None
    ready: bool = False
    thread: threading.Thread | None = None

    @property
    def proc(self) -> _VmGateway:  # the fake reads gateway.proc.base_url
        return self

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls_cert else 'http'}://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        if not self.ready or self.machine is None:
            return False
        pid_file = self.machine.state / "depin-gateway.service.pid"
        return pid_file.exists() and Path(f"/proc/{pid_file.read_text().strip()}").exists()

    def watch(self, timeout_s: float) -> None:
        def run() -> None:
            try:
                verify = client_context(self.tls_cert) if self.tls_cert else True
                self.machine.wait_ready(self.base_url, timeout_s=timeout_s, verify=verify)
                self.ready = True
            except Exception as exc:
                self.error = f"gateway did not start: {str(exc)[-1500:]}"

        self.thread = threading.Thread(target=run, name=f"vm-gateway-{self.port}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.machine is not None:
            self.machine.close()  # kills the bootstrap and the gateway: the readiness wait ends with them
        if self.thread is not None:
            self.thread.join(timeout=30)


@dataclass
class _Vm:
    id: str
    name: str
    generation: str  # "A", "B" or "GPU"
    created: float
    fate: str  # "ok", "failed", "never_ready"
    status: str
    price: float
    public_ip: str | None = None
    # A
    open_ports: list[dict[str, Any]] = field(default_factory=list)
    ssh_keys: list[str] = field(default_factory=list)  # A: public key lines; B: key ids
    username: str = "ubuntu"
    os_image: str = ""
    ssh_server: Any = None
    ssh_port: int = 0
    host_key: Any = None
    # B
    cluster_id: str = ""
    configuration_id: str = ""
    user_data: str | None = None
    had_cloud_init: bool = False
    public_ip_id: str | None = None
    iface_id: str = ""
    security_group_id: str | None = None
    boot_disk_id: str = ""
    datacenter: dict[str, Any] = field(default_factory=dict)  # A: the datacenter's JSON; B: the cluster's dc
    # GPU
    gpu: dict[str, Any] = field(default_factory=dict)
    # gateway
    env: dict[str, str] | None = None
    tls_files: dict[str, str] = field(default_factory=dict)  # what the bootstrap wrote: path → PEM
    gateway: _Gateway | None = None
    gateway_error: str | None = None
    ended: bool = False
    log: list[str] = field(default_factory=list)
    created_at: str = field(default_factory=_now_iso)


class FakeFluence:
    """The fake API on a free loopback port, served from a background thread. Use as a context manager.

    ``generation``: "A" or "B" (the account's API); GPU routes answer in both. ``step_s``: seconds between
    status steps. ``api_key``: the key the fake accepts (random if None; ``.api_key`` as SecretStr).
    """

    def __init__(
        self,
        generation: str = "B",
        *,
        api_key: str | None = None,
        step_s: float = 0.3,
        gateway_startup_timeout_s: float = 120.0,
        datacenters: Sequence[tuple[str, str]] = (("FR", "PAR"),),
    ) -> None:
        if generation not in ("A", "B"):
            raise ValueError("generation must be 'A' or 'B'")
        self.generation = generation
        self._key = api_key or f"fk-{secrets.token_hex(16)}"
        self.step_s = step_s
        self.gateway_startup_timeout_s = gateway_startup_timeout_s
        # knobs
        self.run_bootstrap = False  # True: VMs run the bootstrap they got in a stand-in VM (tests.support.vm)
        self.no_offer = False
        self.insufficient_balance = False
        self.legacy_lists = False
        self.fail_next: str | None = None
        self.creates_left: int | None = None
        self.price_per_epoch_usd = 2.4352
        self.price_hourly_usd = 0.05
        self.gpu_price_hour = 1.22
        self._inject: list[tuple[int, float | None]] = []
        # observations
        self.requests: list[dict[str, Any]] = []
        # state
        self._lock = threading.RLock()
        self._vms: dict[str, _Vm] = {}
        self._ssh_keys: dict[str, dict[str, Any]] = {}
        self._security_groups: dict[str, dict[str, Any]] = {}
        self.datacenters = [
            {
                "id": str(uuid.uuid4()),
                "countryCode": country,
                "cityCode": city,
                "cityName": city.title(),
                "index": 1,
                "tier": 4,
                "certifications": [],
                "slug": f"{country}-{city}-1".lower(),
            }
            for country, city in datacenters
        ]
        self.clusters = [
            {"id": str(uuid.uuid4()), "name": f"fake-{dc['slug']}", "dcId": dc["id"]}
            for dc in self.datacenters
        ]
        self.clusters[0]["name"] = "fake-eu-1"
        self.cluster = self.clusters[0]
        self.configurations = [
            {
                "id": str(uuid.uuid4()),
                "slug": slug,
                "name": slug,
                "vcpu": cpu,
                "ramGb": ram,
                "dedicated": False,
                "cpuFamilies": ["AMD_ZEN3"],
                "preset": "general",
                "tags": [],
                "description": f"{cpu} vCPU, {ram} GB RAM",
            }
            for slug, cpu, ram in (("cpu-regular-2vcpu-4gb", 2, 4), ("cpu-regular-4vcpu-8gb", 4, 8))
        ]
        self.gpu_plans = [
            {
                "plan": {
                    "id": str(uuid.uuid4()),
                    "name": "a100-80gi-sxm-1gpu-16cpu-128gi-120gi",
                    "supply": {
                        "vcpu": {"count": 16},
                        "memory": {"count": 128, "units": "Gi"},
                        "storage": {"count": 120, "units": "Gi"},
                        "gpu_count": 1,
                    },
                    "gpu_model": {"vendor": "nvidia", "model": "a100", "vram": "80Gi", "interface": "SXM"},
                    "pricing": {"hour": self.gpu_price_hour, "upfront_hours": 3, "currency": "USDC"},
                },
                "attributes": {"location": ["US"]},
            }
        ]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: uvicorn.Server | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-fluence-")
        self.url = ""

    # ---- public helpers ----------------------------------------------------------------------------------------
    @property
    def api_key(self) -> SecretStr:
        return SecretStr(self._key)

    def inject_errors(self, status: int, times: int = 1, retry_after: float | None = None) -> None:
        """The next ``times`` authenticated requests answer ``status`` (e.g. 429, 503)."""
        with self._lock:
            self._inject.extend([(status, retry_after)] * times)

    def ssh_port(self, vm_id: str) -> int:
        """The loopback port of a generation-A VM's SSH server (real VMs: 22). Known from creation on; it
        accepts connections once the VM is Active and while 22/tcp is in its openPorts."""
        return self._vm(vm_id).ssh_port

    def host_key(self, vm_id: str) -> str:
        """The OpenSSH public host key of a generation-A VM's SSH server."""
        vm = self._vm(vm_id)
        return vm.host_key.export_public_key().decode().strip() if vm.host_key else ""

    def vm(self, vm_id: str) -> dict[str, Any]:
        """A snapshot of one VM / GPU instance: status, ports, security group, env, gateway_url, errors."""
        self._advance()
        vm = self._vm(vm_id)
        gw = vm.gateway
        return {
            "id": vm.id,
            "name": vm.name,
            "generation": vm.generation,
            "status": vm.status,
            "public_ip": vm.public_ip,
            "datacenter": dict(vm.datacenter),
            "cluster_id": vm.cluster_id or None,
            "open_ports": [dict(p) for p in vm.open_ports],
            "security_group_id": vm.security_group_id,
            "security_group": self._security_groups.get(vm.security_group_id or ""),
            "iface_id": vm.iface_id,
            "had_cloud_init": vm.had_cloud_init,
            "env": dict(vm.env) if vm.env else None,
            "ssh_port": vm.ssh_port,
            "ssh_listening": vm.ssh_server is not None,
            "gateway_url": gw.proc.base_url if gw and gw.alive else None,
            "gateway_started": gw is not None,
            "gateway_alive": bool(gw and gw.alive),
            "gateway_error": vm.gateway_error or (gw.error if gw else None),
            "ended": vm.ended,
            "log": list(vm.log),
        }

    def vms(self) -> list[dict[str, Any]]:
        """Snapshots of every VM and GPU instance ever created (ended ones included)."""
        return [self.vm(i) for i in list(self._vms)]

    def live_gateways(self) -> int:
        """How many gateway processes the fake is running now."""
        with self._lock:
            return sum(1 for vm in self._vms.values() if vm.gateway and vm.gateway.alive)

    def wait_gateway(self, vm_id: str, timeout_s: float = 120.0) -> str:
        """Block until the VM's gateway answers (its URL) or raise ``TimeoutError`` with its error."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            snap = self.vm(vm_id)
            if snap["gateway_url"]:
                return snap["gateway_url"]
            if snap["gateway_error"] or snap["ended"]:
                break
            time.sleep(0.05)
        raise TimeoutError(f"no gateway for {vm_id}: {self.vm(vm_id)}")

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> FakeFluence:
        sock = listen_socket("127.0.0.1", 0)
        port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(self._app(), log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            ticker = loop.create_task(self._tick())
            loop.call_soon(ready.set)
            try:
                loop.run_until_complete(self._server.serve(sockets=[sock]))  # type: ignore[union-attr]
            finally:
                ticker.cancel()
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(self._close_ssh_servers())
                loop.close()

        self._thread = threading.Thread(target=run, name="fake-fluence", daemon=True)
        self._thread.start()
        ready.wait(10)
        deadline = time.monotonic() + 10
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._server.started:
            self.stop()
            raise RuntimeError("the fake Fluence API did not start")
        return self

    def stop(self) -> None:
        """Stop every gateway, SSH server and the API (idempotent)."""
        with self._lock:
            vms = list(self._vms.values())
        for vm in vms:
            vm.ended = True
            self._stop_gateway(vm)
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
            self._thread = None
        for vm in vms + [v for v in self._vms.values() if v not in vms]:  # started while stopping
            vm.ended = True
            self._stop_gateway(vm)
        self._tmp.cleanup()

    def __enter__(self) -> FakeFluence:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- internals: state ----------------------------------------------------------------------------------------
    def _vm(self, vm_id: str) -> _Vm:
        with self._lock:
            for key, vm in self._vms.items():
                if key.lower() == vm_id.lower():
                    return vm
        raise KeyError(vm_id)

    def _new_fate(self) -> str:
        with self._lock:
            fate, self.fail_next = self.fail_next or "ok", None
        return fate

    def _take_create(self) -> bool:
        """Whether one more create is allowed (``creates_left``); counts it."""
        with self._lock:
            if self.creates_left is None:
                return True
            if self.creates_left <= 0:
                return False
            self.creates_left -= 1
            return True

    def _address(self) -> str:
        """The lowest loopback address no running VM holds (each VM has an address of its own)."""
        with self._lock:
            held = {v.public_ip for v in self._vms.values() if not v.ended and v.public_ip}
        return next(f"127.0.0.{i}" for i in range(1, 255) if f"127.0.0.{i}" not in held)

    def _dc_of_cluster(self, cluster_id: str) -> dict[str, Any]:
        cluster = next(c for c in self.clusters if c["id"] == cluster_id)
        return next(d for d in self.datacenters if d["id"] == cluster["dcId"])

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(min(0.05, self.step_s / 4 or 0.05))
            self._advance()
            await self._ssh_servers_sync()

    def _advance(self) -> None:
        """Move every VM along its lifecycle according to its age."""
        now = time.monotonic()
        with self._lock:
            vms = [vm for vm in self._vms.values() if not vm.ended]
        for vm in vms:
            steps = int((now - vm.created) / self.step_s) if self.step_s > 0 else 2
            if vm.generation == "A":
                self._advance_a(vm, steps)
            elif vm.generation == "B":
                self._advance_b(vm, steps)
            else:
                self._advance_gpu(vm, steps)

    def _advance_a(self, vm: _Vm, steps: int) -> None:
        with self._lock:
            if vm.status in ("Terminated", "Stopped", "Active"):
                return
            if steps >= 1 and vm.status == "New":
                vm.status = "Launching"
            if steps >= 2 and vm.status == "Launching":
                if vm.fate == "failed":
                    vm.status = "Terminated"
                    vm.log.append("terminated by the provider (injected failure)")
                    return
                vm.status = "Active"
                vm.public_ip = self._address()

    def _advance_b(self, vm: _Vm, steps: int) -> None:
        start_env: dict[str, str] | None = None
        user_data: str | None = None
        with self._lock:
            if vm.status not in ("new", "launching"):
                return
            if steps >= 1 and vm.status == "new":
                if vm.fate == "failed":
                    vm.status, vm.user_data = "failed", None
                    vm.log.append("failed (injected failure)")
                    return
                if vm.user_data is not None:
                    try:
                        vm.env = self._env_from_user_data(vm.user_data, vm)
                    except yaml.YAMLError as exc:
                        vm.status, vm.user_data = "failed", None
                        vm.log.append(f"cloud-init: invalid YAML ({exc})")
                        return
                vm.status = "launching"
            if steps >= 2 and vm.status == "launching":
                vm.status = "launched"
                user_data, vm.user_data = vm.user_data, None  # erased once launched (never echoed back)
                vm.public_ip = self._address() if vm.public_ip_id else None
                if vm.env is not None and vm.fate == "ok":
                    start_env = vm.env
        if start_env is not None and self.run_bootstrap and user_data is not None:
            boot = threading.Thread(  # off the API's event loop: booting a VM takes a moment
                target=self._boot_vm, args=(vm, start_env), kwargs={"user_data": user_data}, daemon=True
            )
            boot.start()
        elif start_env is not None:
            self._start_gateway(vm, start_env)

    def _advance_gpu(self, vm: _Vm, steps: int) -> None:
        start_env = None
        with self._lock:
            if vm.status != "INITIALIZED" or steps < 1:
                return
            if vm.fate == "failed":
                vm.status = "FAILED"
                vm.log.append("container failed to start (injected failure)")
                return
            vm.status = "ACTIVE"
            vm.gpu["container_status"] = "STARTED"
            if vm.env and vm.fate == "ok" and any(k.startswith("DEPIN_GATEWAY_") for k in vm.env):
                start_env = vm.env
        if start_env is not None:
            self._start_gateway(vm, start_env, port=vm.gpu["external_port"])

    def _env_from_user_data(self, user_data: str, vm: _Vm) -> dict[str, str] | None:
        """The gateway env a ``#cloud-config`` would write, or None when it starts nothing (``YAMLError`` on
        invalid YAML)."""
        if not user_data.startswith("#cloud-config"):
            vm.log.append("cloud-init: user data is not #cloud-config; nothing run")
            return None
        doc = yaml.safe_load(user_data)
        if not isinstance(doc, dict):
            raise yaml.YAMLError("the document is not a mapping")
        env = None
        for entry in doc.get("write_files") or []:
            if isinstance(entry, dict) and entry.get("path") in _TLS_HEREDOC:
                vm.tls_files[entry["path"]] = str(entry.get("content") or "")
            if isinstance(entry, dict) and entry.get("path") == ENV_PATH:
                try:
                    env = parse_env_lines(str(entry.get("content") or ""))
                except ValueError as exc:
                    vm.log.append(f"cloud-init: {ENV_PATH}: {exc}")
                    return None
        if env is None:
            vm.log.append(f"cloud-init: no write_files entry for {ENV_PATH}; no gateway")
            return None
        if not doc.get("runcmd"):
            vm.log.append("cloud-init: no runcmd; nothing starts the gateway")
            return None
        return env

    # ---- internals: gateways ---------------------------------------------------------------------------------
    def _settings(
        self, env: dict[str, str], registry: Path, port: int | None, vm: _Vm | None = None
    ) -> GatewaySettings:
        kwargs: dict[str, Any] = {}
        for key, value in env.items():
            if key.startswith("DEPIN_GATEWAY_"):
                kwargs[key.removeprefix("DEPIN_GATEWAY_").lower()] = value
        for key in ("tls_cert_file", "tls_key_file"):  # the files the bootstrap wrote, in the VM's own dir
            if key in kwargs:
                path = kwargs[key]
                if vm is None or path not in vm.tls_files:
                    raise ValueError(f"DEPIN_GATEWAY_{key.upper()} {path}: the bootstrap wrote no such file")
                local = Path(self._tmp.name) / f"tls-{vm.id}" / Path(path).name
                local.parent.mkdir(exist_ok=True, mode=0o700)
                local.write_text(vm.tls_files[path])
                local.chmod(0o600)
                kwargs[key] = str(local)
        # the VM would bind 0.0.0.0; the fake stays on loopback, on the VM's own address
        kwargs["host"] = vm.public_ip if vm is not None and vm.public_ip else "127.0.0.1"
        kwargs["registry_dir"] = str(registry)
        if port is not None:
            kwargs["port"] = port
        if not int(kwargs.get("port") or 0):
            raise ValueError("DEPIN_GATEWAY_PORT is missing")
        return GatewaySettings(**kwargs)

    def _start_gateway(self, vm: _Vm, env: dict[str, str], *, port: int | None = None) -> None:
        """Start the VM's gateway in a background thread (replacing a running one, as the idempotent script's
        ``systemctl restart`` would)."""
        self._stop_gateway(vm)
        registry = tempfile.TemporaryDirectory(prefix=f"registry-{vm.id[:10]}-", dir=self._tmp.name)
        try:
            settings = self._settings(env, Path(registry.name), port, vm)
        except Exception as exc:
            registry.cleanup()
            with self._lock:
                vm.gateway_error = f"gateway settings: {exc}"
                vm.log.append(vm.gateway_error)
            return
        proc = GatewayProcess(settings, startup_timeout=self.gateway_startup_timeout_s, wait_ready=False)
        gw = _Gateway(proc=proc, registry=registry)

        def run() -> None:
            try:
                proc.start()
                with self._lock:
                    vm.log.append(f"gateway listening on {proc.base_url}")
            except Exception as exc:
                gw.error = f"gateway did not start: {str(exc)[:1500]}"
                with self._lock:
                    vm.log.append(gw.error)

        gw.thread = threading.Thread(target=run, name=f"gateway-{vm.id[:10]}", daemon=True)
        with self._lock:
            vm.gateway, vm.gateway_error = gw, None
            ended = vm.ended
        if ended:
            proc.close()
            registry.cleanup()
            return
        gw.thread.start()

    def _boot_vm(
        self, vm: _Vm, env: dict[str, str], *, user_data: str | None = None, script: str | None = None
    ) -> tuple[int, str]:
        """``run_bootstrap``: boot a stand-in VM (``tests.support.vm``) that applies ``user_data`` (generation
        B, in the background) or runs ``script`` with ``sh -s`` to its end (generation A: its exit status and
        output); the VM's gateway port is forwarded to 127.0.0.1. Replaces a running one."""
        from tests.support import vm as vms

        self._stop_gateway(vm)
        gw = _VmGateway(
            port=int(env.get("DEPIN_GATEWAY_PORT") or 0), tls_cert=vm.tls_files.get(TLS_CERT_PATH)
        )
        why = vms.unavailable()
        if why is None:
            gw.machine = vms.Vm(Path(tempfile.mkdtemp(prefix=f"vm-{vm.id[:10]}-", dir=self._tmp.name)))
        with self._lock:
            vm.gateway, vm.gateway_error = gw, None  # type: ignore[assignment]
            ended = vm.ended
        if why is not None or ended or gw.machine is None:
            gw.error = why or "the VM ended"
            vm.log.append(f"bootstrap: {gw.error}")
            return 1, f"fake fluence: {gw.error}\n"
        machine = gw.machine
        try:
            if script is not None:
                proc = machine.run(["sh", "-s"], stdin=script.encode())
                code = proc.wait(timeout=self.gateway_startup_timeout_s)
            else:
                vms.run_cloud_init(machine, user_data or "")
                code = 0
            machine.forward(gw.port)
        except Exception as exc:
            gw.error = f"bootstrap: {str(exc)[:1500]}"
            vm.log.append(gw.error)
            return 1, gw.error + "\n"
        vm.log.append(f"bootstrap ran in a VM stand-in ({'sh -s' if script is not None else 'cloud-init'})")
        gw.watch(self.gateway_startup_timeout_s)
        return code, machine.log()

    def _stop_gateway(self, vm: _Vm) -> None:
        with self._lock:
            gw, vm.gateway = vm.gateway, None
        if gw is not None:
            gw.stop()

    # ---- internals: SSH (generation A) ---------------------------------------------------------------------------
    async def _ssh_servers_sync(self) -> None:
        """Run an SSH server for every Active generation-A VM whose port 22 is open; close the others."""
        with self._lock:
            vms = [vm for vm in self._vms.values() if vm.generation == "A"]
        for vm in vms:
            want = (
                not vm.ended
                and vm.status == "Active"
                and any(p.get("port") == 22 and p.get("protocol", "tcp") == "tcp" for p in vm.open_ports)
            )
            if want and vm.ssh_server is None:
                await self._open_ssh(vm)
            elif not want and vm.ssh_server is not None:
                server, vm.ssh_server = vm.ssh_server, None
                server.close()
                with contextlib.suppress(Exception):
                    await server.wait_closed()

    async def _open_ssh(self, vm: _Vm) -> None:
        fake = self
        if vm.host_key is None:
            vm.host_key = asyncssh.generate_private_key("ssh-ed25519")
        allowed = []
        for line in vm.ssh_keys:
            with contextlib.suppress(Exception):
                allowed.append(asyncssh.import_public_key(line))

        class Server(asyncssh.SSHServer):
            def begin_auth(self, username: str) -> bool:
                return True

            def public_key_auth_supported(self) -> bool:
                return True

            def password_auth_supported(self) -> bool:
                return False

            def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
                if username != vm.username:
                    return False
                return any(key.public_data == k.public_data for k in allowed)

        async def handle(process: asyncssh.SSHServerProcess[str]) -> None:
            await fake._ssh_exec(vm, process)

        try:
            vm.ssh_server = await asyncssh.create_server(
                Server,
                vm.public_ip or "127.0.0.1",  # the VM's own address
                vm.ssh_port or 0,
                server_host_keys=[vm.host_key],
                process_factory=handle,
                encoding="utf-8",
            )
        except OSError as exc:
            vm.log.append(f"ssh server: {exc}")
            return
        vm.ssh_port = vm.ssh_server.sockets[0].getsockname()[1]

    async def _ssh_exec(self, vm: _Vm, process: asyncssh.SSHServerProcess[str]) -> None:
        command = (process.command or "").strip()
        try:
            if command in _SH:
                script = await process.stdin.read()
                if vm.username != "root" and not command.startswith("sudo"):
                    process.stderr.write(
                        f"sh: 4: cannot create {ENV_PATH}: Permission denied (run as root: sudo -n sh -s)\n"
                    )
                    process.exit(2)
                    return
                match = _HEREDOC.search(script)
                if match is None:
                    process.stdout.write("fake fluence: script ran; it wrote no gateway env file\n")
                    vm.log.append("ssh: script without the DEPIN_ENV heredoc; no gateway")
                    process.exit(0)
                    return
                try:
                    env = parse_env_lines(match.group(1))
                except ValueError as exc:
                    process.stderr.write(f"{ENV_PATH}: {exc}\n")
                    process.exit(1)
                    return
                vm.env = env
                for path, pattern in _TLS_HEREDOC.items():
                    if found := pattern.search(script):
                        vm.tls_files[path] = found.group(2)
                vm.log.append("ssh: bootstrap script received")
                if vm.fate == "ok" and self.run_bootstrap:  # the script runs as root on the VM, for real
                    code, output = await asyncio.to_thread(self._boot_vm, vm, env, script=script)
                    process.stdout.write(output)
                    process.exit(code)
                    return
                if vm.fate == "ok":
                    await asyncio.to_thread(self._start_gateway, vm, env)
                process.stdout.write("depin gateway bootstrapped\n")
                process.exit(0)
            elif command in ("true", ":") or command.startswith("echo "):
                process.stdout.write(command[5:] + "\n" if command.startswith("echo ") else "")
                process.exit(0)
            else:
                process.stderr.write(f"fake fluence: unsupported command {command[:80]!r}\n")
                process.exit(127)
        except Exception as exc:
            vm.log.append(f"ssh exec error: {exc}")
            with contextlib.suppress(Exception):
                process.exit(1)

    async def _close_ssh_servers(self) -> None:
        with self._lock:
            vms = list(self._vms.values())
        for vm in vms:
            if vm.ssh_server is not None:
                server, vm.ssh_server = vm.ssh_server, None
                server.close()
                with contextlib.suppress(Exception):
                    await server.wait_closed()

    # ---- HTTP --------------------------------------------------------------------------------------------------
    def _app(self) -> Starlette:
        a, b, g = self._routes_a(), self._routes_b(), self._routes_gpu()
        routes = self._routes_public() + g + (a if self.generation == "A" else b)
        app = Starlette(routes=routes)
        fake = self

        async def middleware(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            request = Request(scope)
            path = scope["path"]
            gen_b = path.startswith(("/v1/", "/v2/"))
            headers = request.headers
            auth = headers.get("authorization", "")
            fake.requests.append(
                {
                    "method": scope["method"],
                    "path": path,
                    "x_api_key": headers.get("x-api-key") == fake._key,
                    "authorization": auth.split(" ", 1)[0] if auth else None,
                    "authorization_ok": auth.split(" ", 1)[-1] == fake._key if auth else None,
                }
            )
            denied = fake._auth_error(path, headers, gen_b)
            if denied is not None:
                await denied(scope, receive, send)
                return
            if path not in _PUBLIC:
                with fake._lock:
                    injected = fake._inject.pop(0) if fake._inject else None
                if injected is not None:
                    status, retry_after = injected
                    extra = {"Retry-After": str(retry_after)} if retry_after is not None else None
                    code = "internal_server_error" if status == 500 else "service_unavailable"
                    body: dict[str, Any] = (
                        {"code": code, "error": f"injected {status}"}
                        if gen_b
                        else {"detail": f"injected {status}"}
                        if path.startswith("/gpu/")
                        else {"error": f"injected {status}"}
                    )
                    await JSONResponse(body, status_code=status, headers=extra)(scope, receive, send)
                    return
            fake._advance()
            await app(scope, receive, send)

        return middleware  # type: ignore[return-value]

    def _auth_error(self, path: str, headers: Any, gen_b: bool) -> Response | None:
        """403 ``{"error"}`` (A) / ``{"detail"}`` (GPU) / 401 ``{code, error}`` (B) unless every key header sent is
        a form the generation takes: ``X-API-KEY: <key>``, plus ``Authorization: X-API-KEY <key>`` (B) or
        ``Authorization: Bearer <key>`` (A, GPU: the older docs). One wrong header fails the request."""
        if path in _PUBLIC:
            return None  # security: [] in the document
        forms = []
        if "x-api-key" in headers:
            forms.append(headers.get("x-api-key") == self._key)
        auth = headers.get("authorization")
        if auth is not None:
            scheme, _, value = auth.partition(" ")
            want = "x-api-key" if gen_b else "bearer"
            forms.append(scheme.lower() == want and value == self._key)
        if forms and all(forms):
            return None
        if gen_b:
            return JSONResponse({"code": "unauthorized", "error": "Auth token invalid or missing"}, 401)
        if path.startswith("/gpu/"):
            return JSONResponse({"detail": "Auth failed. No such API Key"}, 403)
        return JSONResponse({"error": "Auth failed. No such API Key"}, 403)

    def _routes_public(self) -> list[Route]:
        """The unauthenticated generation-B routes: one host serves every account, so they answer whatever the
        account's generation (why they cannot tell the generation)."""
        fake = self

        async def service_status(request: Request) -> Response:
            return JSONResponse({"maintenanceMode": False, "version": "0.10.0-fake"})

        async def default_images(request: Request) -> Response:
            return JSONResponse(DEFAULT_IMAGES if fake.legacy_lists else {"items": DEFAULT_IMAGES})

        return [
            Route("/v1/service/status", service_status, methods=["GET"]),
            Route("/v1/storages/default_images", default_images, methods=["GET"]),
        ]

    @staticmethod
    async def _body(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            return None

    # ---- generation A ------------------------------------------------------------------------------------------
    def _routes_a(self) -> list[Route]:
        fake = self

        def err(status: int, message: str) -> JSONResponse:
            return JSONResponse({"error": message}, status)

        def vm_json(vm: _Vm) -> dict[str, Any]:
            return {
                "id": vm.id,
                "vmName": vm.name,
                "status": vm.status,
                "pricePerEpoch": _money(vm.price),
                "resources": [
                    {"type": "VCPU", "quantity": 2, "details": {}, "metadata": {"manufacturer": "AMD"}},
                    {"type": "RAM", "supply": 4, "units": "GiB", "details": {}, "metadata": {"type": "DDR"}},
                    {
                        "type": "STORAGE",
                        "supply": 25,
                        "units": "GiB",
                        "details": {},
                        "metadata": {"type": "SSD"},
                    },
                    {"type": "PUBLIC_IP", "quantity": 1, "details": {}, "metadata": {"version": "4"}},
                ],
                "createdAt": vm.created_at,
                "nextBillingAt": None,
                "osImage": vm.os_image,
                "datacenter": dict(vm.datacenter),
                "publicIp": vm.public_ip if vm.status == "Active" else None,
                "ports": [dict(p) for p in vm.open_ports],
                "reservedBalance": _money(vm.price * 2),
                "totalSpent": _money(vm.price * 2),
            }

        def dc_json(dc: dict[str, Any]) -> dict[str, Any]:
            return {
                "countryCode": dc["countryCode"],
                "cityCode": dc["cityCode"],
                "cityIndex": dc["index"],
                "tier": dc["tier"],
                "certifications": [],
            }

        def matching(c: Any) -> list[dict[str, Any]]:
            """The datacenters ``constraints.datacenter.countries`` allows (all when it names none)."""
            countries = ((c or {}).get("datacenter") or {}).get("countries") or []
            return [d for d in fake.datacenters if not countries or d["countryCode"] in countries]

        def offer(dc: dict[str, Any]) -> dict[str, Any]:
            return {
                "configuration": {"slug": BASIC_CONFIGURATIONS[0], "price": _money(fake.price_per_epoch_usd)},
                "resources": [{"type": "VCPU", "metadata": {"manufacturer": "AMD"}, "price": "0.005"}],
                "datacenter": dc_json(dc),
                "servers": [{"availableBasicInstances": 5, "additionalResources": []}],
                "maxAdditionalSupply": [],
            }

        def check_constraints(c: Any) -> str | None:
            """An error message, or None."""
            if c is None:
                return None
            if not isinstance(c, dict):
                return "constraints: must be an object"
            basic = c.get("basicConfiguration")
            if basic is not None and basic not in BASIC_CONFIGURATIONS:
                return f"constraints.basicConfiguration: unknown configuration {basic!r}"
            mx = c.get("maxTotalPricePerEpochUsd")
            if mx is not None:
                if not isinstance(mx, str):
                    return "constraints.maxTotalPricePerEpochUsd: must be a decimal string"
                try:
                    float(mx)
                except ValueError:
                    return "constraints.maxTotalPricePerEpochUsd: not a decimal"
            return None

        def price_ok(c: Any) -> bool:
            mx = (c or {}).get("maxTotalPricePerEpochUsd")
            return mx is None or fake.price_per_epoch_usd <= float(mx)

        async def offers(request: Request) -> Response:
            body = await fake._body(request)
            if not isinstance(body, dict):
                return err(400, "request body must be a JSON object ({} for every offer)")
            problem = check_constraints(body)
            if problem:
                return err(400, problem)
            if fake.no_offer or not price_ok(body):
                return JSONResponse([])
            return JSONResponse([offer(dc) for dc in matching(body)])

        async def basic_configurations(request: Request) -> Response:
            return JSONResponse(BASIC_CONFIGURATIONS)

        async def default_images(request: Request) -> Response:
            return JSONResponse(DEFAULT_IMAGES)

        async def estimate(request: Request) -> Response:
            body = await fake._body(request)
            if not isinstance(body, dict) or "constraints" not in body or "instances" not in body:
                return err(400, "body must be {constraints, instances}")
            n = body.get("instances")
            if not isinstance(n, int) or not 1 <= n <= 10:
                return err(400, "instances: an integer from 1 to 10")
            problem = check_constraints(body.get("constraints"))
            if problem:
                return err(400, problem)
            if (
                fake.no_offer
                or not price_ok(body.get("constraints"))
                or not matching(body.get("constraints"))
            ):
                return err(422, "Not enough offers found")
            total = fake.price_per_epoch_usd * n
            return JSONResponse(
                {
                    "depositAmountUsdc": _money(total * 2),
                    "depositEpochs": 2,
                    "totalPricePerEpoch": _money(total),
                    "maxPricePerEpoch": _money(fake.price_per_epoch_usd),
                    "instances": n,
                }
            )

        def check_ports(ports: Any) -> str | None:
            if not isinstance(ports, list):
                return "openPorts: must be a list of {port, protocol}"
            for p in ports:
                if not isinstance(p, dict) or set(p) - {"port", "protocol"}:
                    return "openPorts: each entry is {port, protocol}"
                if not isinstance(p.get("port"), int) or not 1 <= p["port"] <= 65535:
                    return "openPorts[].port: an integer 1-65535"
                if p.get("protocol") not in ("tcp", "udp"):
                    return "openPorts[].protocol: tcp or udp"
                if p["port"] == 10250:
                    return "openPorts: port 10250 is reserved"
            return None

        async def vms(request: Request) -> Response:
            if request.method == "GET":
                with fake._lock:
                    items = [vm_json(v) for v in fake._vms.values() if v.generation == "A" and not v.ended]
                return JSONResponse(items)
            body = await fake._body(request)
            if request.method == "POST":
                return create(body)
            if request.method == "PATCH":
                return update(body)
            return await delete(body)

        def create(body: Any) -> Response:
            if not isinstance(body, dict) or not isinstance(body.get("vmConfiguration"), dict):
                return err(400, "body must have vmConfiguration")
            n = body.get("instances", 1)
            if not isinstance(n, int) or not 1 <= n <= 10:
                return err(400, "instances: an integer from 1 to 10")
            problem = check_constraints(body.get("constraints"))
            if problem:
                return err(400, problem)
            cfg = body["vmConfiguration"]
            name = cfg.get("name")
            if not isinstance(name, str) or not _NAME_A.match(name):
                return err(400, "vmConfiguration.name: only alphanumeric characters and hyphens")
            problem = check_ports(cfg.get("openPorts", []))
            if problem:
                return err(400, f"vmConfiguration.{problem}")
            image = cfg.get("osImage")
            if not isinstance(image, str) or not image.startswith(("http://", "https://")):
                return err(400, "vmConfiguration.osImage: the URL of an OS image")
            if not image.split("?")[0].endswith(_IMAGE_EXT):
                return err(400, f"vmConfiguration.osImage: supported formats are {', '.join(_IMAGE_EXT)}")
            keys = cfg.get("sshKeys", [])
            if not isinstance(keys, list) or not all(
                isinstance(k, str) and k.startswith("ssh-") for k in keys
            ):
                return err(400, "vmConfiguration.sshKeys: a list of OpenSSH public keys")
            places = matching(body.get("constraints"))
            if fake.no_offer or not price_ok(body.get("constraints")) or not places:
                return err(422, "No suitable offer found")
            if not fake._take_create():
                return err(422, "No suitable offer found")
            user = next((i["username"] for i in DEFAULT_IMAGES if i["downloadUrl"] == image), "ubuntu")
            out = []
            for _ in range(n):
                vm = _Vm(
                    id="0x" + secrets.token_hex(20),
                    name=name,
                    generation="A",
                    created=time.monotonic(),
                    fate=fake._new_fate(),
                    status="New",
                    price=fake.price_per_epoch_usd,
                    open_ports=[dict(p) for p in cfg.get("openPorts", [])]
                    or [{"port": 22, "protocol": "tcp"}],
                    ssh_keys=list(keys),
                    username=user,
                    os_image=image,
                    ssh_port=free_port(),  # fixed up front; refuses connections until the VM is Active
                    datacenter=dc_json(places[0]),
                )
                with fake._lock:
                    fake._vms[vm.id] = vm
                out.append({"vmId": vm.id, "vmName": vm.name})
            return JSONResponse(out)

        def update(body: Any) -> Response:
            if not isinstance(body, dict) or not isinstance(body.get("updates"), list):
                return err(400, "body must be {updates: [{id, vmName?, openPorts?}]}")
            for u in body["updates"]:
                if not isinstance(u, dict) or "id" not in u:
                    return err(400, "updates[].id is required")
                try:
                    vm = fake._vm(str(u["id"]))
                except KeyError:
                    return err(404, f"VM {u['id']} not found")
                if vm.ended or vm.generation != "A":
                    return err(404, f"VM {u['id']} not found")
                if "openPorts" in u:
                    problem = check_ports(u["openPorts"])
                    if problem:
                        return err(400, f"updates[].{problem}")
                if "vmName" in u and (not isinstance(u["vmName"], str) or not _NAME_A.match(u["vmName"])):
                    return err(400, "updates[].vmName: only alphanumeric characters and hyphens")
            for u in body["updates"]:
                vm = fake._vm(str(u["id"]))
                with fake._lock:
                    if "openPorts" in u:
                        vm.open_ports = [dict(p) for p in u["openPorts"]]  # replaces the whole list
                    if "vmName" in u:
                        vm.name = u["vmName"]
            return Response(status_code=204)

        async def delete(body: Any) -> Response:
            if not isinstance(body, dict) or not isinstance(body.get("vmIds"), list):
                return err(400, "body must be {vmIds: [...]}")
            found = []
            for vm_id in body["vmIds"]:
                try:
                    vm = fake._vm(str(vm_id))
                except KeyError:
                    continue
                if vm.generation == "A" and not vm.ended:
                    found.append(vm)
            if not found:
                return err(404, "VMs not found")
            for vm in found:
                await fake._end(vm, "Stopped")
            return JSONResponse({"removed": [vm.id for vm in found]})

        async def status(request: Request) -> Response:
            with fake._lock:
                items = [
                    {"id": v.id, "vmName": v.name, "status": v.status, "publicIp": vm_json(v)["publicIp"]}
                    for v in fake._vms.values()
                    if v.generation == "A" and not v.ended
                ]
            return JSONResponse(items)

        return [
            Route("/marketplace/offers", offers, methods=["POST"]),
            Route("/marketplace/basic_configurations", basic_configurations, methods=["GET"]),
            Route("/vms/v3/default_images", default_images, methods=["GET"]),
            Route("/vms/v3/estimate", estimate, methods=["POST"]),
            Route("/vms/v3/status", status, methods=["GET"]),
            Route("/vms/v3", vms, methods=["GET", "POST", "PATCH", "DELETE"]),
        ]

    async def _end(self, vm: _Vm, status: str) -> None:
        """End a VM: status, gateway stopped (awaited, off the event loop), SSH server closed."""
        with self._lock:
            vm.status = status
            vm.ended = True  # A and GPU lists drop ended VMs; B keeps listing them as terminated
            vm.user_data = None
        await asyncio.to_thread(self._stop_gateway, vm)
        if vm.ssh_server is not None:
            server, vm.ssh_server = vm.ssh_server, None
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()

    # ---- generation B ------------------------------------------------------------------------------------------
    def _routes_b(self) -> list[Route]:
        fake = self
        subnet_id = str(uuid.uuid4())
        vpc_id = str(uuid.uuid4())

        def err(status: int, code: str, message: str) -> JSONResponse:
            return JSONResponse({"code": code, "error": message}, status)

        async def body_of(request: Request) -> Any:
            """The JSON body if it keeps the document's rules for this route, else a 400 ``JSONResponse``."""
            route = next(r for r in request.app.routes if r.endpoint is request.scope["endpoint"])
            for name, value in request.path_params.items():
                problem = uuid_problem(name, value)
                if problem:
                    return err(400, "bad_request", problem)
            body = await fake._body(request)
            if body is None:
                return err(400, "bad_request", "the body must be JSON")
            problem = body_problem(request.method, route.path, body)
            return err(400, "bad_request", problem) if problem else body

        def page(request: Request, items: list[dict[str, Any]]) -> JSONResponse:
            q = request.query_params
            try:
                per_page = int(q.get("perPage", 10))
                number = int(q.get("page", 1))
            except ValueError:
                return err(400, "bad_request", "page/perPage: integers")
            per_page = max(1, min(per_page, 200))
            number = max(number, 1)  # 1-based; 0 means the first page
            pages = max(1, -(-len(items) // per_page))
            chunk = items[(number - 1) * per_page : number * per_page]
            return JSONResponse(
                {
                    "items": chunk,
                    "pagination": {
                        "totalRecords": len(items),
                        "filteredRecords": len(items),
                        "totalPages": pages,
                        "currentPage": number,
                        "perPage": per_page,
                    },
                }
            )

        def expand_of(request: Request) -> set[str]:
            return {
                v for k, v in request.query_params.multi_items() if k == "expand" or k.startswith("expand[")
            }

        def public_ip_json(vm: _Vm) -> dict[str, Any] | None:
            if not vm.public_ip_id:
                return None
            return {
                "id": vm.public_ip_id,
                "userId": USER_ID,
                "clusterId": vm.cluster_id,
                "name": f"{vm.name}-ip",
                "addressType": "V4",
                "address": vm.public_ip,
                "status": "ready",
                "allowedActions": ["update"],
                "attachedTo": {"id": vm.id, "name": vm.name},
                "priceHourlyUsd": "0.005",
                "priceMonthlyUsd": "3.65",
                "createdAt": vm.created_at,
            }

        def iface_json(vm: _Vm) -> dict[str, Any]:
            kind = (
                {"public": {"public_ip": vm.public_ip_id}}
                if vm.public_ip_id
                else {"private": {"subnet": subnet_id}}
            )
            return {"id": vm.iface_id, "default": True, "kind": kind, "securityGroup": vm.security_group_id}

        def actions(vm: _Vm) -> list[str]:
            if vm.status in ("terminated", "terminating"):
                return []
            return (
                ["terminate"] if vm.status == "failed" else ["terminate", "updateNetworkInterface", "restart"]
            )

        def vm_json(vm: _Vm, expand: set[str] = frozenset()) -> dict[str, Any]:  # type: ignore[assignment]
            doc: dict[str, Any] = {
                "id": vm.id,
                "userId": USER_ID,
                "clusterId": vm.cluster_id,
                "configurationId": vm.configuration_id,
                "name": vm.name,
                "status": vm.status,
                "restartRequired": False,
                "allowedActions": actions(vm),
                "bootDisk": vm.boot_disk_id,
                "cloudInit": {} if vm.had_cloud_init else None,
                "dataDisks": [],
                "subnets": [],
                "sshKeys": list(vm.ssh_keys),
                "networkInterfaces": [vm.iface_id],
                "publicIp": vm.public_ip_id,
                "priceHourlyUsd": _money(vm.price),
                "priceMonthlyUsd": _money(vm.price * 730),
                "createdAt": vm.created_at,
                "updatedAt": _now_iso(),
                "readySince": None,
                "terminatedAt": _now_iso() if vm.status == "terminated" else None,
            }
            if expand:
                exp: dict[str, Any] = {}
                if "publicIp" in expand:
                    exp["publicIp"] = public_ip_json(vm)
                if "networkInterfaces" in expand:
                    exp["networkInterfaces"] = [iface_json(vm)]
                doc["expanded"] = exp
            return doc

        def group_json(group: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in group.items() if not k.startswith("_")}

        def b_vms() -> list[_Vm]:
            with fake._lock:
                return [v for v in fake._vms.values() if v.generation == "B"]

        def get_b(vm_id: str) -> _Vm | None:
            try:
                vm = fake._vm(vm_id)
            except KeyError:
                return None
            return vm if vm.generation == "B" else None

        def vm_of(request: Request) -> _Vm | JSONResponse:
            vm_id = request.path_params["vm_id"]
            problem = uuid_problem("vm_id", vm_id)
            if problem:
                return err(400, "bad_request", problem)
            vm = get_b(vm_id)
            return vm if vm is not None else err(404, "not_found", "VM not found")

        async def clusters(request: Request) -> Response:
            if fake.legacy_lists:  # the 0.8.210 snapshot: a bare list, dc_id
                return JSONResponse(
                    [{"id": c["id"], "name": c["name"], "dc_id": c["dcId"]} for c in fake.clusters]
                )
            return JSONResponse({"items": fake.clusters})

        async def datacenters(request: Request) -> Response:
            return JSONResponse({"items": fake.datacenters})

        cluster_ids = {c["id"] for c in fake.clusters}

        async def configurations(request: Request) -> Response:
            return JSONResponse(fake.configurations if fake.legacy_lists else {"items": fake.configurations})

        async def ssh_keys(request: Request) -> Response:
            if request.method == "GET":
                with fake._lock:
                    return page(request, list(fake._ssh_keys.values()))
            body = await body_of(request)
            if isinstance(body, Response):
                return body
            pub = body["publicKey"]
            try:
                key = asyncssh.import_public_key(pub)
            except Exception:
                return err(400, "bad_request", "publicKey: not an OpenSSH public key")
            with fake._lock:
                if any(k["publicKey"].split()[:2] == pub.split()[:2] for k in fake._ssh_keys.values()):
                    return err(409, "conflict", "publicKey: this key is already registered")
                doc = {
                    "id": str(uuid.uuid4()),
                    "userId": USER_ID,
                    "name": body["name"],
                    "publicKey": pub.strip(),
                    "algorithm": key.algorithm.decode(),
                    "fingerprint": key.get_fingerprint(),
                }
                fake._ssh_keys[doc["id"]] = doc
            return JSONResponse(doc)

        async def delete_ssh_keys(request: Request) -> Response:
            body = await body_of(request)
            if isinstance(body, Response):
                return body
            with fake._lock:
                removed = [fake._ssh_keys.pop(i) for i in body["ids"] if i in fake._ssh_keys]
            return JSONResponse(removed)

        async def vms(request: Request) -> Response:
            if request.method == "GET":
                q = request.query_params
                items = b_vms()
                name = q.get("name")
                if name:
                    pattern = re.compile(
                        fnmatch.translate(
                            name.replace("*", "[*]").replace("?", "[?]").replace("%", "*").replace("_", "?")
                        ),
                        re.I,
                    )
                    items = [v for v in items if pattern.match(v.name)]
                ids = {v for k, v in q.multi_items() if k == "ids" or k.startswith("ids[")}
                if ids:
                    items = [v for v in items if v.id in ids]
                expand = expand_of(request)
                return page(request, [vm_json(v, expand) for v in items])
            body = await body_of(request)
            if isinstance(body, Response):
                return body
            if body["clusterId"] not in cluster_ids:
                return err(422, "unprocessable_entity", "clusterId: unknown cluster")
            config = next((c for c in fake.configurations if c["id"] == body["configurationId"]), None)
            if config is None:
                return err(422, "unprocessable_entity", "configurationId: unknown configuration")
            if not body["name"]:
                return err(400, "bad_request", "name: a non-empty string")
            disk = body["bootDisk"]
            if isinstance(disk, dict):
                image = disk.get("osImage")
                if image is not None and (
                    not image.startswith(("http://", "https://"))
                    or not image.split("?")[0].endswith(_IMAGE_EXT)
                ):
                    return err(
                        400,
                        "bad_request",
                        f"bootDisk.osImage: the URL of a {'/'.join(_IMAGE_EXT)} image (a default image's "
                        f"downloadUrl), not {image[:60]!r}",
                    )
            keys = body.get("sshKeys") or []
            with fake._lock:
                unknown = [k for k in keys if k not in fake._ssh_keys]
            if unknown:
                return err(422, "unprocessable_entity", f"sshKeys: unknown key ids {unknown}")
            user_data = (body.get("cloudInit") or {}).get("userData")
            if user_data is not None and len(user_data.encode("utf-8")) > MAX_USER_DATA:
                return err(400, "bad_request", "cloudInit.userData: exceeds 16 KiB")
            if fake.no_offer:
                return err(422, "unprocessable_entity", "No suitable offer found")
            if fake.insufficient_balance:
                return err(422, "insufficient_balance", "Insufficient balance to create the VM")
            if not fake._take_create():
                return err(422, "unprocessable_entity", "No suitable offer found")
            pip = body.get("publicIp")
            vm = _Vm(
                id=str(uuid.uuid4()),
                name=body["name"],
                generation="B",
                created=time.monotonic(),
                fate=fake._new_fate(),
                status="new",
                price=fake.price_hourly_usd,
                ssh_keys=list(keys),
                cluster_id=body["clusterId"],
                configuration_id=config["id"],
                user_data=user_data,
                had_cloud_init=user_data is not None,
                public_ip_id=(pip if isinstance(pip, str) else str(uuid.uuid4())) if pip else None,
                iface_id=str(uuid.uuid4()),
                boot_disk_id=disk if isinstance(disk, str) else str(uuid.uuid4()),
                datacenter=fake._dc_of_cluster(body["clusterId"]),
            )
            with fake._lock:
                fake._vms[vm.id] = vm
            return JSONResponse(vm_json(vm))

        async def vm_item(request: Request) -> Response:
            vm = vm_of(request)
            if isinstance(vm, Response):
                return vm
            if request.method == "PATCH":
                body = await body_of(request)
                if isinstance(body, Response):
                    return body
                if body.get("name") is not None:
                    vm.name = body["name"]
            return JSONResponse(vm_json(vm, expand_of(request)))

        async def terminate(request: Request) -> Response:
            vm = vm_of(request)
            if isinstance(vm, Response):
                return vm
            if "terminate" not in actions(vm):
                return err(406, "not_acceptable", "terminate is not allowed in status " + vm.status)
            await fake._end(vm, "terminated")
            return JSONResponse(vm_json(vm))

        async def interfaces(request: Request) -> Response:
            vm = vm_of(request)
            if isinstance(vm, Response):
                return vm
            return JSONResponse([iface_json(vm)])

        async def patch_interface(request: Request) -> Response:
            vm = vm_of(request)
            if isinstance(vm, Response):
                return vm
            body = await body_of(request)
            if isinstance(body, Response):
                return body
            if request.path_params["interface_id"] != vm.iface_id:
                return err(404, "not_found", "interface not found")
            if "updateNetworkInterface" not in actions(vm):
                return err(
                    406, "not_acceptable", "updateNetworkInterface is not allowed in status " + vm.status
                )
            if "securityGroupId" not in body:
                return JSONResponse(vm_json(vm))  # absent: no change
            sg_id = body["securityGroupId"]
            with fake._lock:
                if sg_id is not None and sg_id not in fake._security_groups:
                    return err(422, "unprocessable_entity", "securityGroupId: unknown security group")
                old = fake._security_groups.get(vm.security_group_id or "")
                if old is not None and vm.iface_id in old["attachedTo"]:
                    old["attachedTo"].remove(vm.iface_id)
                vm.security_group_id = sg_id
                if sg_id is not None:
                    fake._security_groups[sg_id]["attachedTo"].append(vm.iface_id)
            return JSONResponse(vm_json(vm))

        def rules_json(rules: list[dict[str, Any]] | None) -> dict[str, Any]:
            """The answer's form of a create request's rule array: null/absent allows all."""
            return {"type": "allowAll"} if rules is None else {"type": "allow", "rules": rules}

        async def security_groups(request: Request) -> Response:
            if request.method == "GET":
                with fake._lock:
                    return page(request, [group_json(g) for g in fake._security_groups.values()])
            body = await body_of(request)
            if isinstance(body, Response):
                return body
            if body["clusterId"] not in cluster_ids:
                return err(422, "unprocessable_entity", "clusterId: unknown cluster")
            doc = {
                "id": str(uuid.uuid4()),
                "userId": USER_ID,
                "clusterId": body["clusterId"],
                "vpcId": vpc_id,
                "name": body["name"],
                "status": "ready",
                "ingressRules": rules_json(body.get("ingressRules")),
                "egressRules": rules_json(body.get("egressRules")),
                "attachedTo": [],
                "createdAt": _now_iso(),
                "readySince": _now_iso(),
                "removedAt": None,
            }
            with fake._lock:
                fake._security_groups[doc["id"]] = doc
            return JSONResponse(group_json(doc))

        def live_ifaces() -> set[str]:
            return {v.iface_id for v in b_vms() if v.status not in ("terminated", "terminating")}

        async def delete_security_groups(request: Request) -> Response:
            body = await body_of(request)
            if isinstance(body, Response):
                return body
            with fake._lock:
                for i in body["ids"]:
                    sg = fake._security_groups.get(i)
                    if sg is None:
                        return err(404, "not_found", f"security group {i} not found")
                    live = [v for v in sg["attachedTo"] if v in live_ifaces()]
                    if live:
                        return err(409, "conflict", f"security group {i} is attached to interfaces {live}")
                removed = []
                for i in body["ids"]:
                    sg = fake._security_groups.pop(i)
                    removed.append({**group_json(sg), "status": "removed", "removedAt": _now_iso()})
            return JSONResponse(removed)

        async def cost(request: Request) -> Response:
            body = await body_of(request)
            if isinstance(body, Response):
                return body
            secs = body.get("secs") or 3600
            items, total = [], 0.0
            for res in body["resources"]:
                ((kind, spec),) = res.items()
                rid = spec["resource_id"]
                if rid["clusterId"] not in cluster_ids:
                    return err(
                        422, "unprocessable_entity", f"resources[].{kind}.resource_id.clusterId: unknown"
                    )
                if kind == "vm":
                    if rid["vmConfigurationId"] not in {c["id"] for c in fake.configurations}:
                        return err(422, "unprocessable_entity", "vmConfigurationId: unknown")
                    hourly = fake.price_hourly_usd
                elif kind == "storage":
                    hourly = 0.0001 * int(spec["volume_gb"])
                else:
                    hourly = 0.005
                per_sec = hourly / 3600
                total += per_sec
                items.append({"resource": res, "costPerSec": f"{per_sec:.12f}"})
            return JSONResponse(
                {
                    "costOfResources": items,
                    "totalCostPerSec": f"{total:.12f}",
                    "periodSecs": secs,
                    "totalCost": f"{total * secs:.8f}",
                }
            )

        return [
            Route("/v1/clusters", clusters, methods=["GET"]),
            Route("/v1/datacenters", datacenters, methods=["GET"]),
            Route("/v1/configurations/virtual_machines", configurations, methods=["GET"]),
            Route("/v1/ssh_keys", ssh_keys, methods=["GET", "POST"]),
            Route("/v1/ssh_keys/delete", delete_ssh_keys, methods=["POST"]),
            Route("/v1/security_groups", security_groups, methods=["GET", "POST"]),
            Route("/v1/security_groups/delete", delete_security_groups, methods=["POST"]),
            Route("/v1/prices/cost", cost, methods=["POST"]),
            Route("/v2/vms", vms, methods=["GET", "POST"]),
            Route("/v2/vms/{vm_id}", vm_item, methods=["GET", "PATCH"]),
            Route("/v2/vms/{vm_id}/terminate", terminate, methods=["POST"]),
            Route("/v2/vms/{vm_id}/interfaces", interfaces, methods=["GET"]),
            Route("/v2/vms/{vm_id}/interfaces/{interface_id}", patch_interface, methods=["PATCH"]),
        ]

    # ---- GPU containers ----------------------------------------------------------------------------------------
    def _routes_gpu(self) -> list[Route]:
        fake = self

        def err(status: int, message: str) -> JSONResponse:
            """A business error: FastAPI's ``{"detail": "..."}``."""
            return JSONResponse({"detail": message}, status)

        def invalid(loc: list[Any], message: str, value: Any = None) -> JSONResponse:
            """A validation error: 422 ``{"detail": [{type, loc, msg, input}]}``."""
            item = {
                "type": "value_error",
                "loc": ["body", *loc],
                "msg": f"Value error, {message}",
                "input": value,
            }
            return JSONResponse({"detail": [item]}, 422)

        def resources() -> dict[str, Any]:
            plan = fake.gpu_plans[0]["plan"]
            return {"supply": plan["supply"], "gpu_model": plan["gpu_model"]}

        def inst_item(vm: _Vm) -> dict[str, Any]:
            """A ``GET /gpu/instances/`` entry (the docs' list shape: no container or network details)."""
            return {
                "id": vm.id,
                "name": vm.name,
                "instance_status": vm.status,
                "resources": resources(),
                "domain": "127.0.0.1" if vm.status == "ACTIVE" else None,
                "location": "US",
                "created_at": vm.gpu["created_at"],
                "updated_at": _now_iso(),
            }

        def inst_json(vm: _Vm) -> dict[str, Any]:
            """``GET /gpu/instances/{id}`` (the docs' detail shape)."""
            g = vm.gpu
            network = None  # null unless ACTIVE; ports are strings on the wire
            if vm.status == "ACTIVE":
                forwarded = [
                    {
                        "port": str(e["port"]),
                        "external_port": str(g["ports"][int(e["port"])]),
                        "protocol": e.get("protocol", "tcp"),
                    }
                    for e in g["expose"]
                ]
                http80 = any(str(e["port"]) == "80" and e.get("protocol") == "http" for e in g["expose"])
                uri = f"http://127.0.0.1:{g['ports'][80]}" if http80 else None
                network = {"domain": "127.0.0.1", "forwarded_ports": forwarded, "uri": uri}
            active = vm.status == "ACTIVE"
            return {
                "id": vm.id,
                "name": vm.name,
                "instance_status": vm.status,
                "container_status": g["container_status"],
                "resources": resources(),
                "location": "US",
                "container_info": {
                    "image": g["image"],
                    "expose": g["expose"],
                    "environment": g["environment"],
                    "startup_command": g["startup_command"],
                },
                "billing": {
                    "hourly_usage": fake.gpu_price_hour if active else 0,
                    "total_spendings": fake.gpu_price_hour,
                    "reserved_amount": fake.gpu_price_hour * 2 if active else 0,
                    "next_billing_period": _now_iso() if active else None,
                },
                "network": network,
                "created_at": g["created_at"],
                "updated_at": _now_iso(),
            }

        async def plans(request: Request) -> Response:
            for p in fake.gpu_plans:
                p["plan"]["pricing"]["hour"] = fake.gpu_price_hour
            return JSONResponse(fake.gpu_plans)

        async def instances(request: Request) -> Response:
            if request.method == "GET":
                with fake._lock:
                    items = [inst_item(v) for v in fake._vms.values() if v.generation == "GPU"]
                return JSONResponse(items)
            body = await fake._body(request)
            if not isinstance(body, dict):
                return invalid([], "the body must be a JSON object", body)
            name = body.get("name")
            if (
                not isinstance(name, str)
                or not _NAME_GPU.match(name)
                or name.startswith("-")
                or name.endswith("-")
            ):
                return invalid(["name"], "1-25 of a-z, 0-9 and '-', not starting or ending with '-'", name)
            cs = body.get("container_settings")
            if not isinstance(cs, dict) or not isinstance(cs.get("image"), str):
                return invalid(["container_settings", "image"], "Field required")
            expose = cs.get("expose") or []
            if not isinstance(expose, list) or not 1 <= len(expose) <= 10:
                return invalid(["container_settings", "expose"], "expose 1 to 10 ports", expose)
            for i, e in enumerate(expose):
                if not isinstance(e, dict) or not isinstance(e.get("port"), str) or not e["port"].isdigit():
                    return invalid(
                        ["container_settings", "expose", i, "port"], "a port number as a string", e
                    )
                if not 1 <= int(e["port"]) <= 65535:
                    return invalid(
                        ["container_settings", "expose", i, "port"], "Port must be between 1 and 65535"
                    )
                if e.get("protocol", "tcp") not in ("tcp", "udp", "http"):
                    return invalid(["container_settings", "expose", i, "protocol"], "tcp, udp or http")
                if e.get("protocol") == "http" and e["port"] != "80":
                    return invalid(
                        ["container_settings", "expose", i, "protocol"], "only port 80 may use http"
                    )
            envl = cs.get("environment") or []
            if not isinstance(envl, list) or len(envl) > 64:
                return invalid(["container_settings", "environment"], "at most 64 variables")
            creds = cs.get("credentials")
            if creds and creds.get("host") not in ("docker.io", "ghcr.io"):
                return invalid(["container_settings", "credentials", "host"], "docker.io or ghcr.io")
            env = {str(e.get("name")): str(e.get("value")) for e in envl if isinstance(e, dict)}
            if body.get("plan_id") not in {p["plan"]["id"] for p in fake.gpu_plans} or fake.no_offer:
                return err(400, "Plan no longer available")
            if fake.insufficient_balance:
                return err(400, "Insufficient balance to deploy instance")
            gateway_port = int(env.get("DEPIN_GATEWAY_PORT", "8787") or 8787)
            external = {int(e["port"]): free_port() for e in expose}
            vm = _Vm(
                id=str(uuid.uuid4()),
                name=name,
                generation="GPU",
                created=time.monotonic(),
                fate=fake._new_fate(),
                status="INITIALIZED",
                price=fake.gpu_price_hour,
                env=env,
                gpu={
                    "plan_id": body["plan_id"],
                    "expose": expose,
                    "container_status": "NOT_STARTED",
                    "gateway_port": gateway_port,
                    "image": cs["image"],
                    "environment": envl,
                    "startup_command": cs.get("startup_command"),
                    "ports": external,
                    "external_port": external.get(gateway_port) or free_port(),
                    "created_at": _now_iso(),
                },
            )
            with fake._lock:
                fake._vms[vm.id] = vm
            return JSONResponse({"instance_id": vm.id})

        def get_gpu(instance_id: str) -> _Vm | None:
            try:
                vm = fake._vm(instance_id)
            except KeyError:
                return None
            return vm if vm.generation == "GPU" else None  # ended ones stay readable, as ENDED

        async def instance(request: Request) -> Response:
            vm = get_gpu(request.path_params["instance_id"])
            if vm is None:
                return err(404, "instance not found")
            if request.method == "DELETE":
                if vm.status != "ACTIVE":
                    return err(
                        400, f"Only instances with ACTIVE status can be terminated (this one is {vm.status})"
                    )
                vm.gpu["container_status"] = "NOT_STARTED"
                await fake._end(vm, "ENDED")
                return Response(status_code=204)
            return JSONResponse(inst_json(vm))

        async def logs(request: Request) -> Response:
            vm = get_gpu(request.path_params["instance_id"])
            if vm is None:
                return err(404, "instance not found")
            try:
                last = int(request.query_params.get("last", 100))
            except ValueError:
                return JSONResponse(
                    {"detail": [{"type": "int_parsing", "loc": ["query", "last"], "msg": "an integer"}]}, 422
                )
            lines = list(vm.log)
            if vm.gateway is not None:
                lines += vm.gateway.proc.log_text().splitlines()
            return JSONResponse(lines[-last:] if last > 0 else [])  # a JSON array of log lines

        return [
            Route("/gpu/plans/", plans, methods=["GET"]),
            Route("/gpu/instances/", instances, methods=["GET", "POST"]),
            Route("/gpu/instances/{instance_id}", instance, methods=["GET", "DELETE"]),
            Route("/gpu/instances/{instance_id}/logs", logs, methods=["GET"]),
        ]
