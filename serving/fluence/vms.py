"""Gateway VMs in generation-neutral terms: what :class:`~serving.fluence.publisher.FluencePublisher` needs of a
VM lifecycle (:class:`VmBackend`, one per Fluence API generation: ``_lifecycle_a`` / ``_lifecycle_b``), what a
backend needs of the publisher (:class:`VmHost`), and the values they exchange (:class:`Quote`, :class:`LiveVm`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from depin_core.errors import ConfigError, PermanentError
from depin_core.tls import NodeCertificate
from serving.fluence._api import Generation
from serving.fluence.models import DefaultImage
from serving.fluence.settings import FluenceSettings
from serving.fluence.state import Deployment

VM_PREFIX = "depin-gw-"  # a target's gateway VM is named VM_PREFIX + target (replica i ≥ 1: + "-r<i>")


def vm_name(target: str, replica: int = 0) -> str:
    """The VM name of ``target``'s gateway replica ``replica``: ``depin-gw-<target>`` for replica 0 (the name a
    single gateway always had), ``depin-gw-<target>-r<i>`` for the others."""
    return VM_PREFIX + target + (f"-r{replica}" if replica else "")


def replica_of(target: str, name: str) -> int | None:
    """Which replica of ``target`` the VM named ``name`` is, or None when it is not one of them."""
    if name == vm_name(target):
        return 0
    rest = name.removeprefix(vm_name(target) + "-r")
    if rest != name and rest.isdigit() and not rest.startswith("0"):
        return int(rest)
    return None


@dataclass(frozen=True)
class Placement:
    """Where a new gateway VM goes. ``datacenter`` is what replicas must not share (generation A: a country
    code, the finest its constraints name; generation B: a datacenter id); None leaves it to the API."""

    datacenter: str | None
    country: str | None
    location: str
    cluster_id: str | None = None  # generation B


@dataclass(frozen=True)
class Quote:
    """What a new gateway VM would cost."""

    usd_per_day: float
    usd_per_hour: float
    deposit_usd: float | None
    detail: str


@dataclass(frozen=True)
class LiveVm:
    """A VM as the API reports it now, in generation-neutral terms."""

    id: str
    name: str
    status: str
    ip: str | None
    running: bool  # Active / launched
    failed: bool  # failed, ended, stopped: will not come back
    usd_per_hour: float | None
    datacenter: str | None = None  # as Placement.datacenter, when the API says
    country: str | None = None
    location: str | None = None


class VmHost(Protocol):
    """What a backend needs of the publisher driving it."""

    settings: FluenceSettings

    def record(self, dep: Deployment, **changes: Any) -> Deployment:
        """Save ``dep`` with ``changes`` to the state file; returns the saved record."""
        ...

    def gateway_env(self, dep: Deployment) -> dict[str, str]:
        """The gateway's ``KEY=VALUE`` settings for ``dep``'s VM."""
        ...

    def tls_pair(self, dep: Deployment) -> NodeCertificate:
        """The certificate and key made for ``dep``'s VM."""
        ...

    def ssh_port_for(self, vm_id: str) -> int:
        """The SSH port of VM ``vm_id``."""
        ...


class VmBackend(Protocol):
    """A gateway VM's lifecycle on one generation of the Fluence API."""

    @property
    def generation(self) -> Generation:
        """The API generation ("A" or "B") its deployments are recorded with."""
        ...

    def find(self, name: str) -> list[LiveVm]:
        """The account's VMs named ``name`` (generation B: terminated ones are history and left out)."""
        ...

    def get(self, vm_id: str) -> LiveVm | None:
        """VM ``vm_id`` now; None when the API no longer knows it."""
        ...

    def list_ours(self) -> list[LiveVm]:
        """Every VM of the account named ``depin-gw-*`` (generation B: terminated ones left out)."""
        ...

    def placements(self, count: int, *, taken: set[str], replicas: int) -> list[Placement]:
        """Where ``count`` new gateway VMs of a target with ``replicas`` go: with more than one replica each in
        a datacenter of its own, none in ``taken`` (``ConfigError`` naming ``--replicas`` when too few are
        offered); with one, the configured/default place."""
        ...

    def quote(self, placement: Placement | None = None) -> Quote:
        """What a new gateway VM (at ``placement``) would cost (``NoOffer`` when nothing matches)."""
        ...

    def create(self, dep: Deployment, public_key: str) -> str:
        """Create ``dep``'s VM (in its recorded placement) and return its id. Not idempotent: on ``FluenceUnavailable`` look it up by name."""
        ...

    def prepare(self, dep: Deployment, vm: LiveVm) -> Deployment:
        """Once ``vm`` runs: open SSH and the gateway port, bootstrap it (once); returns the saved record."""
        ...

    def delete(self, dep: Deployment, vm_ids: list[str]) -> list[str]:
        """Delete ``vm_ids`` (may be empty) and what else ``dep`` owns; the problems that did not stop it."""
        ...


def too_few_datacenters(replicas: int, have: list[str], taken: set[str], how: str) -> ConfigError:
    """The error for ``--replicas`` asking more datacenters than are offered (nothing was created)."""
    kept = f"; {len(taken)} of them already hold a replica" if taken else ""
    return ConfigError(
        f"--replicas {replicas} (DEPIN_FLUENCE_REPLICAS) needs {replicas} gateway VMs in different datacenters, "
        f"but only {len(have)} {how} available ({', '.join(have) or 'none'}){kept}; lower --replicas to at "
        f"most {len(have)} or widen the choice (DEPIN_FLUENCE_COUNTRIES, the VM size) — nothing was created"
    )


def pick_image(images: list[DefaultImage], want: str | None) -> DefaultImage:
    """The image whose id/slug/name is ``want``; by default the newest-looking Ubuntu image, else the first."""
    if not images:
        raise PermanentError("Fluence lists no default OS image; set DEPIN_FLUENCE_OS_IMAGE")
    if want:
        for image in images:
            if want in (image.id, image.slug, image.name, image.download_url):
                return image
        slugs = ", ".join(i.slug for i in images)
        raise ConfigError(f"DEPIN_FLUENCE_OS_IMAGE {want!r}: not a default image (have: {slugs})")
    ubuntu = [i for i in images if "ubuntu" in f"{i.slug} {i.name or ''} {i.distribution or ''}".lower()]
    return sorted(ubuntu, key=lambda i: i.slug)[-1] if ubuntu else images[0]


__all__ = [
    "VM_PREFIX",
    "LiveVm",
    "Placement",
    "Quote",
    "VmBackend",
    "VmHost",
    "pick_image",
    "replica_of",
    "too_few_datacenters",
    "vm_name",
]
