"""What ``depin publish --target fluence`` created, kept on this machine: ``state.json`` in the state directory
(default :data:`depin_core.paths.FLUENCE_STATE_DIR`).

One :class:`Deployment` per gateway VM: its Fluence id and name, API generation, address, datacenter, ports,
price, the sha256 of its admin key and the versions published to it. A target with replicas has one per
replica, keyed ``<target>`` (replica 0, what a single gateway always was) and ``<target>.r<i>``
(:func:`replica_key`). The admin key itself is in a separate file ``<key>.admin.key`` (mode 0600) beside the
state; it is never printed, logged or put in the state JSON. The gateway's TLS certificate (pinned by every
connection to it) and key are ``<key>.tls-cert.pem`` and ``<key>.tls-key.pem`` (0600). The files are written atomically (temp file + rename) with mode 0600,
under an exclusive lock (``state.lock``) so two publishes on one machine do not lose each other's records.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from depin_core import paths
from depin_core.errors import ConfigError
from depin_core.fs import atomic_write_bytes
from depin_core.tls import NodeCertificate, fingerprint

DEFAULT_STATE_DIR = paths.FLUENCE_STATE_DIR
STATE_FILE = "state.json"
LOCK_FILE = "state.lock"
_TARGET = re.compile(r"[a-z0-9][a-z0-9-]{0,30}")
_REPLICA_SUFFIX = re.compile(r"-r[0-9]+$")  # VM names of replicas 1.. end like this
_KEY = re.compile(r"(?P<target>[a-z0-9][a-z0-9-]{0,30})(?:\.r(?P<replica>[1-9][0-9]{0,2}))?")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def valid_target(target: str) -> str:
    """A target name: 1-31 of a-z, 0-9, '-' (it becomes part of the VM name ``depin-gw-<target>``), not ending
    in ``-r<digits>`` (replica 1.. of a target is ``depin-gw-<target>-r<i>``)."""
    if not _TARGET.fullmatch(target):
        raise ConfigError(f"fluence target {target!r}: use 1-31 of a-z, 0-9, '-' (starting a-z or 0-9)")
    if _REPLICA_SUFFIX.search(target):
        raise ConfigError(
            f"fluence target {target!r}: must not end in -r<digits> (replica VMs are named "
            "depin-gw-<target>-r<i>); pick another name"
        )
    return target


def replica_key(target: str, replica: int) -> str:
    """The state key and file stem of ``target``'s gateway replica ``replica``: the target itself for replica 0
    (what a single gateway always used), ``<target>.r<i>`` for the others."""
    return target if replica == 0 else f"{target}.r{replica}"


def split_key(key: str) -> tuple[str, int]:
    """(target, replica) of a state key (:func:`replica_key`); ``ConfigError`` for anything else."""
    m = _KEY.fullmatch(key)
    if m is None:
        raise ConfigError(f"Fluence state key {key!r}: not <target> or <target>.r<replica>")
    return valid_target(m["target"]), int(m["replica"] or 0)


class PublishedVersion(BaseModel):
    """One function version published to the gateway (and the aliases the publish moved)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    moved: list[str] = Field(default_factory=list)
    published_at: str = Field(default_factory=now_iso)


class Deployment(BaseModel):
    """A gateway VM created by the publisher for ``target`` (its replica ``replica``; 0 when not replicated)."""

    model_config = ConfigDict(extra="forbid")

    target: str
    replica: int = Field(0, ge=0)
    vm_name: str
    vm_id: str | None = None  # None between "about to create" and the create's answer
    generation: Literal["A", "B"]
    public_ip: str | None = None
    port: int
    ssh_port: int = 22
    ssh_host_key: str | None = None  # gen A: the VM's SSH host key seen at bootstrap (pinned afterwards)
    security_group_id: str | None = None  # gen B
    cluster_id: str | None = None  # gen B: the cluster the VM was created in
    datacenter: str | None = None  # what replicas must not share: gen A a country code, gen B a datacenter id
    country: str | None = None
    location: str | None = None  # the datacenter for people ("FR PAR", a cluster and its city)
    admin_key_hash: str
    tls_fingerprint: str | None = None  # sha256 of the gateway's pinned certificate (<target>.tls-cert.pem)
    usd_per_hour: float | None = None
    usd_per_day: float | None = None
    status: str = "creating"  # creating | bootstrapping | ready | failed
    bootstrapped: bool = False
    created_at: str = Field(default_factory=now_iso)
    updated_at: str = Field(default_factory=now_iso)
    published: list[PublishedVersion] = Field(default_factory=list)

    @property
    def key(self) -> str:
        """Its key in the state file and the stem of its key/certificate files (:func:`replica_key`)."""
        return replica_key(self.target, self.replica)

    @property
    def url(self) -> str | None:
        """The gateway's base URL, once the VM has an address (``https://`` when it has a certificate)."""
        if not self.public_ip:
            return None
        host = f"[{self.public_ip}]" if ":" in self.public_ip else self.public_ip
        return f"{'https' if self.tls_fingerprint else 'http'}://{host}:{self.port}"


class FluenceState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    deployments: dict[str, Deployment] = Field(default_factory=dict)


class StateStore:
    """The state directory (default :data:`depin_core.paths.FLUENCE_STATE_DIR`, mode 0700): ``state.json``
    and the admin key files."""

    def __init__(self, root: Path | str = DEFAULT_STATE_DIR) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"StateStore({str(self.root)!r})"

    @property
    def path(self) -> Path:
        return self.root / STATE_FILE

    def _ensure_dir(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    # ---- state ------------------------------------------------------------------------------------------
    def load(self) -> FluenceState:
        """The recorded state (empty when there is no file yet)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return FluenceState()
        try:
            return FluenceState.model_validate_json(raw)
        except ValidationError as exc:
            raise ConfigError(
                f"{self.path}: not a depin Fluence state file ({exc.error_count()} problems); fix or move it "
                "away — the VMs it listed are still named depin-gw-<target> in the Fluence console"
            ) from None

    def save(self, state: FluenceState) -> None:
        """Write ``state`` atomically, mode 0600."""
        self._ensure_dir()
        atomic_write_bytes(self.path, json.dumps(state.model_dump(mode="json"), indent=2).encode() + b"\n")
        os.chmod(self.path, 0o600)

    @contextlib.contextmanager
    def locked(self) -> Iterator[FluenceState]:
        """Exclusive read-modify-write: yields the state, saves it on a clean exit."""
        self._ensure_dir()
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            state = self.load()
            yield state
            self.save(state)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def get(self, target: str, replica: int = 0) -> Deployment | None:
        return self.load().deployments.get(replica_key(target, replica))

    def replicas(self, target: str) -> list[Deployment]:
        """Every recorded replica of ``target``, by replica number."""
        found = [d for d in self.load().deployments.values() if d.target == target]
        return sorted(found, key=lambda d: d.replica)

    def put(self, deployment: Deployment) -> Deployment:
        """Record (insert or replace) ``deployment``; returns it with ``updated_at`` refreshed."""
        deployment = deployment.model_copy(update={"updated_at": now_iso()})
        with self.locked() as state:
            state.deployments[deployment.key] = deployment
        return deployment

    def remove(self, key: str) -> None:
        """Forget the deployment ``key`` (a target: its replica 0) and delete its admin key and TLS files."""
        with self.locked() as state:
            state.deployments.pop(key, None)
        for path in (self.key_path(key), self.tls_cert_path(key), self.tls_key_path(key)):
            path.unlink(missing_ok=True)

    def add_published(self, key: str, item: PublishedVersion) -> None:
        """Append a published version to ``key``'s record (a re-publish of a version replaces it)."""
        with self.locked() as state:
            dep = state.deployments.get(key)
            if dep is None:
                return
            kept = [p for p in dep.published if (p.name, p.version) != (item.name, item.version)]
            state.deployments[key] = dep.model_copy(
                update={"published": [*kept, item], "updated_at": now_iso()}
            )

    # ---- admin key --------------------------------------------------------------------------------------
    def key_path(self, key: str) -> Path:
        return self.root / f"{_stem(key)}.admin.key"

    def write_admin_key(self, key: str, secret: SecretStr) -> Path:
        """Store deployment ``key``'s gateway admin key (mode 0600, atomic)."""
        self._ensure_dir()
        path = self.key_path(key)
        atomic_write_bytes(path, secret.get_secret_value().encode() + b"\n")
        os.chmod(path, 0o600)
        return path

    def admin_key(self, key: str) -> SecretStr | None:
        """Deployment ``key``'s admin key, or None when this machine has none."""
        path = self.key_path(key)
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            return None
        if mode & 0o077:
            raise ConfigError(f"admin key file {path} is readable by others (mode {mode:o}); chmod 600 it")
        text = path.read_text().strip()
        return SecretStr(text) if text else None

    # ---- the gateway's TLS certificate (pinned) and key (until the VM has it) ------------------------
    def tls_cert_path(self, key: str) -> Path:
        return self.root / f"{_stem(key)}.tls-cert.pem"

    def tls_key_path(self, key: str) -> Path:
        return self.root / f"{_stem(key)}.tls-key.pem"

    def write_tls(self, key: str, cert: NodeCertificate) -> None:
        """Store deployment ``key``'s gateway certificate (the pin) and its private key (mode 0600, atomic)."""
        self._ensure_dir()
        atomic_write_bytes(self.tls_key_path(key), cert.key_pem.encode())  # mkstemp: 0600
        atomic_write_bytes(self.tls_cert_path(key), cert.cert_pem.encode())
        os.chmod(self.tls_cert_path(key), 0o600)

    def tls_cert(self, key: str) -> str | None:
        """Deployment ``key``'s pinned gateway certificate (PEM), or None when it has none."""
        path = self.tls_cert_path(key)
        return path.read_text() if path.exists() else None

    def pinned_cert(self, dep: Deployment) -> str:
        """``dep``'s gateway certificate (PEM): the only one its connections trust. ``ConfigError`` when the
        deployment has none (made before TLS) or the file does not match the recorded fingerprint."""
        pem = self.tls_cert(dep.key)
        if dep.tls_fingerprint is None or pem is None or fingerprint(pem) != dep.tls_fingerprint:
            raise ConfigError(
                f"Fluence target {dep.target!r} has no pinned TLS certificate in {self.root} "
                f"({self.tls_cert_path(dep.key).name}) matching the state (a gateway deployed "
                f"without TLS, or the file was lost); run `depin fluence down --fluence-target {dep.target}` "
                "and publish again — the admin key is never sent to a gateway in clear"
            )
        return pem

    def tls_pair(self, key: str) -> NodeCertificate | None:
        """Deployment ``key``'s certificate and key (for the VM's bootstrap), or None when either is missing."""
        cert, private = self.tls_cert_path(key), self.tls_key_path(key)
        if not (cert.exists() and private.exists()):
            return None
        mode = private.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"TLS key file {private} is readable by others (mode {mode:o}); chmod 600 it")
        return NodeCertificate(cert.read_text(), private.read_text())


def _stem(key: str) -> str:
    split_key(key)  # refuses anything that could leave the directory
    return key


__all__ = [
    "DEFAULT_STATE_DIR",
    "Deployment",
    "FluenceState",
    "PublishedVersion",
    "StateStore",
    "replica_key",
    "split_key",
    "valid_target",
]
