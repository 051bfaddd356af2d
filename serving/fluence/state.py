"""What ``depin publish --target fluence`` created, kept on this machine: ``state.json`` in the state directory
(default :data:`depin_core.paths.FLUENCE_STATE_DIR`).

One :class:`Deployment` per target (a gateway VM): its Fluence id and name, API generation, address, ports,
price, the sha256 of its admin key and the versions published to it. The admin key itself is in a separate
file ``<target>.admin.key`` (mode 0600) beside the state; it is never printed, logged or put in the state
JSON. The gateway's TLS certificate (pinned by every connection to it) and key are ``<target>.tls-cert.pem``
and ``<target>.tls-key.pem`` (0600). The files are written atomically (temp file + rename) with mode 0600,
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


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def valid_target(target: str) -> str:
    """A target name: 1-31 of a-z, 0-9, '-' (it becomes part of the VM name ``depin-gw-<target>``)."""
    if not _TARGET.fullmatch(target):
        raise ConfigError(f"fluence target {target!r}: use 1-31 of a-z, 0-9, '-' (starting a-z or 0-9)")
    return target


class PublishedVersion(BaseModel):
    """One function version published to the gateway (and the aliases the publish moved)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    moved: list[str] = Field(default_factory=list)
    published_at: str = Field(default_factory=now_iso)


class Deployment(BaseModel):
    """A gateway VM created by the publisher for ``target``."""

    model_config = ConfigDict(extra="forbid")

    target: str
    vm_name: str
    vm_id: str | None = None  # None between "about to create" and the create's answer
    generation: Literal["A", "B"]
    public_ip: str | None = None
    port: int
    ssh_port: int = 22
    ssh_host_key: str | None = None  # gen A: the VM's SSH host key seen at bootstrap (pinned afterwards)
    security_group_id: str | None = None  # gen B
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

    def get(self, target: str) -> Deployment | None:
        return self.load().deployments.get(target)

    def put(self, deployment: Deployment) -> Deployment:
        """Record (insert or replace) ``deployment``; returns it with ``updated_at`` refreshed."""
        deployment = deployment.model_copy(update={"updated_at": now_iso()})
        with self.locked() as state:
            state.deployments[deployment.target] = deployment
        return deployment

    def remove(self, target: str) -> None:
        """Forget ``target`` and delete its admin key and TLS files."""
        with self.locked() as state:
            state.deployments.pop(target, None)
        for path in (self.key_path(target), self.tls_cert_path(target), self.tls_key_path(target)):
            path.unlink(missing_ok=True)

    def add_published(self, target: str, item: PublishedVersion) -> None:
        """Append a published version to ``target``'s record (a re-publish of a version replaces it)."""
        with self.locked() as state:
            dep = state.deployments.get(target)
            if dep is None:
                return
            kept = [p for p in dep.published if (p.name, p.version) != (item.name, item.version)]
            state.deployments[target] = dep.model_copy(
                update={"published": [*kept, item], "updated_at": now_iso()}
            )

    # ---- admin key --------------------------------------------------------------------------------------
    def key_path(self, target: str) -> Path:
        return self.root / f"{valid_target(target)}.admin.key"

    def write_admin_key(self, target: str, key: SecretStr) -> Path:
        """Store ``target``'s gateway admin key (mode 0600, atomic)."""
        self._ensure_dir()
        path = self.key_path(target)
        atomic_write_bytes(path, key.get_secret_value().encode() + b"\n")
        os.chmod(path, 0o600)
        return path

    def admin_key(self, target: str) -> SecretStr | None:
        """``target``'s admin key, or None when this machine has none."""
        path = self.key_path(target)
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            return None
        if mode & 0o077:
            raise ConfigError(f"admin key file {path} is readable by others (mode {mode:o}); chmod 600 it")
        key = path.read_text().strip()
        return SecretStr(key) if key else None

    # ---- the gateway's TLS certificate (pinned) and key (until the VM has it) ------------------------
    def tls_cert_path(self, target: str) -> Path:
        return self.root / f"{valid_target(target)}.tls-cert.pem"

    def tls_key_path(self, target: str) -> Path:
        return self.root / f"{valid_target(target)}.tls-key.pem"

    def write_tls(self, target: str, cert: NodeCertificate) -> None:
        """Store ``target``'s gateway certificate (the pin) and its private key (mode 0600, atomic)."""
        self._ensure_dir()
        atomic_write_bytes(self.tls_key_path(target), cert.key_pem.encode())  # mkstemp: 0600
        atomic_write_bytes(self.tls_cert_path(target), cert.cert_pem.encode())
        os.chmod(self.tls_cert_path(target), 0o600)

    def tls_cert(self, target: str) -> str | None:
        """``target``'s pinned gateway certificate (PEM), or None when it has none."""
        path = self.tls_cert_path(target)
        return path.read_text() if path.exists() else None

    def pinned_cert(self, dep: Deployment) -> str:
        """``dep``'s gateway certificate (PEM): the only one its connections trust. ``ConfigError`` when the
        deployment has none (made before TLS) or the file does not match the recorded fingerprint."""
        pem = self.tls_cert(dep.target)
        if dep.tls_fingerprint is None or pem is None or fingerprint(pem) != dep.tls_fingerprint:
            raise ConfigError(
                f"Fluence target {dep.target!r} has no pinned TLS certificate in {self.root} "
                f"({self.tls_cert_path(dep.target).name}) matching the state (a gateway deployed "
                f"without TLS, or the file was lost); run `depin fluence down --fluence-target {dep.target}` "
                "and publish again — the admin key is never sent to a gateway in clear"
            )
        return pem

    def tls_pair(self, target: str) -> NodeCertificate | None:
        """``target``'s certificate and key (for the VM's bootstrap), or None when either is missing."""
        cert, key = self.tls_cert_path(target), self.tls_key_path(target)
        if not (cert.exists() and key.exists()):
            return None
        mode = key.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"TLS key file {key} is readable by others (mode {mode:o}); chmod 600 it")
        return NodeCertificate(cert.read_text(), key.read_text())


__all__ = [
    "DEFAULT_STATE_DIR",
    "Deployment",
    "FluenceState",
    "PublishedVersion",
    "StateStore",
    "valid_target",
]
