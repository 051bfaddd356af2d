"""A gateway VM's lifecycle on generation B of the Fluence API (``/v2/vms``, client: ``_gen_b``).

The bootstrap goes in as cloud-init user data at create; once ``launched``, a security group opening 22 and the
gateway port is attached to the VM's interface. Deleting the VM deletes that group too. Prices are USD per hour.

Replicas are spread by datacenter: each goes to a cluster whose ``dcId`` no other replica uses (the first such
cluster in ``GET /v1/clusters`` order); ``GET /v1/datacenters`` says where each is (country, city).
"""

from __future__ import annotations

from typing import Literal

from depin_core.errors import ConfigError, PermanentError
from serving.fluence import bootstrap as boot
from serving.fluence._gen_b import V2Cluster
from serving.fluence.errors import FluenceNotFound, FluenceRefused, FluenceUnavailable
from serving.fluence.models import Cluster, DatacenterB, VmB
from serving.fluence.state import Deployment
from serving.fluence.vms import (
    VM_PREFIX,
    LiveVm,
    Placement,
    Quote,
    VmHost,
    pick_image,
    too_few_datacenters,
)

_ENDED = ("terminating", "terminated")  # still listed for a while: history, not ours to reuse or delete


class LifecycleB:
    """Generation B: ``/v2/vms`` with cloud-init; a security group on the VM's interface."""

    generation: Literal["B"] = "B"

    def __init__(self, host: VmHost, api: V2Cluster) -> None:
        self.p = host
        self.api = api
        self._placement: tuple[str, str] | None = None
        self._clusters: list[Cluster] | None = None
        self._datacenters: dict[str, DatacenterB] | None = None

    def _live(self, vm: VmB) -> LiveVm:
        where = self.where(vm.cluster_id) if vm.cluster_id else None
        return LiveVm(
            id=vm.id,
            name=vm.name,
            status=vm.status,
            ip=vm.public_address,
            running=vm.status == "launched",
            failed=vm.status == "failed",
            usd_per_hour=vm.price_hourly_usd,
            datacenter=where.datacenter if where else None,
            country=where.country if where else None,
            location=where.location if where else None,
        )

    def clusters(self) -> list[Cluster]:
        if self._clusters is None:
            self._clusters = self.api.clusters()
        return self._clusters

    def datacenters(self) -> dict[str, DatacenterB]:
        """Datacenters by id; empty when the key may not list them (countries are then unknown)."""
        if self._datacenters is None:
            try:
                self._datacenters = {d.id: d for d in self.api.datacenters()}
            except FluenceRefused:
                self._datacenters = {}
        return self._datacenters

    def where(self, cluster_id: str) -> Placement | None:
        """The placement of cluster ``cluster_id`` (None when the account does not list it)."""
        cluster = next((c for c in self.clusters() if c.id == cluster_id), None)
        if cluster is None:
            return None
        dc_id = cluster.dc_id or cluster.id
        dc = self.datacenters().get(dc_id)
        city = (dc.city_name or dc.city_code) if dc is not None else None
        country = dc.country_code if dc is not None else None
        label = f"{cluster.name} ({', '.join(x for x in (city, country) if x) or 'datacenter ' + dc_id})"
        return Placement(dc_id, country, label, cluster_id=cluster.id)

    def placements(self, count: int, *, taken: set[str], replicas: int) -> list[Placement]:
        s = self.p.settings
        if s.cluster and replicas > 1:
            raise ConfigError(
                f"DEPIN_FLUENCE_CLUSTER {s.cluster!r} pins every gateway VM to one cluster, but --replicas "
                f"{replicas} needs one datacenter each; unset it (DEPIN_FLUENCE_COUNTRIES narrows the choice)"
            )
        if replicas == 1:
            cluster_id, _ = self.placement()
            one = self.where(cluster_id) or Placement(None, None, cluster_id, cluster_id=cluster_id)
            return [one] * count
        per_dc: dict[str, Placement] = {}
        for cluster in self.clusters():
            place = self.where(cluster.id)
            if place is None or place.datacenter is None or place.datacenter in per_dc:
                continue
            if s.countries and place.country not in s.countries:
                continue
            per_dc[place.datacenter] = place
        free = [p for dc, p in per_dc.items() if dc not in taken]
        if len(free) < count:
            have = [p.location for p in per_dc.values()]
            raise too_few_datacenters(replicas, have, taken, "datacenters are")
        return free[:count]

    def find(self, name: str) -> list[LiveVm]:
        return [self._live(v) for v in self.api.find(name) if v.status not in _ENDED]

    def get(self, vm_id: str) -> LiveVm | None:
        try:
            vm = self.api.get_vm(vm_id)
        except FluenceNotFound:
            return None
        if vm.status in _ENDED:
            return LiveVm(vm.id, vm.name, vm.status, None, running=False, failed=True, usd_per_hour=None)
        return self._live(vm)

    def list_ours(self) -> list[LiveVm]:
        return [
            self._live(v)
            for v in self.api.list_vms()
            if v.name.startswith(VM_PREFIX) and v.status not in _ENDED
        ]

    def placement(self) -> tuple[str, str]:
        """(cluster id, configuration id) from the settings, defaulting to the first cluster and the smallest
        configuration."""
        if self._placement is None:
            s = self.p.settings
            clusters = self.clusters()
            if s.cluster:
                cluster = next((c for c in clusters if s.cluster in (c.id, c.name)), None)
                if cluster is None:
                    names = ", ".join(c.name for c in clusters) or "none"
                    raise ConfigError(f"DEPIN_FLUENCE_CLUSTER {s.cluster!r}: no such cluster (have: {names})")
            elif clusters:
                cluster = clusters[0]
            else:
                raise PermanentError("the Fluence account sees no cluster (GET /v1/clusters is empty)")
            configs = self.api.configurations()
            if s.configuration:
                config = next((c for c in configs if s.configuration in (c.id, c.slug)), None)
                if config is None:
                    slugs = ", ".join(c.slug for c in configs) or "none"
                    raise ConfigError(
                        f"DEPIN_FLUENCE_CONFIGURATION {s.configuration!r}: no such VM configuration (have: {slugs})"
                    )
            elif configs:
                config = min(configs, key=lambda c: (c.vcpu or 0, c.ram_gb or 0, c.slug))
            else:
                raise PermanentError("no VM configuration offered (GET /v1/configurations/virtual_machines)")
            self._placement = (cluster.id, config.id)
        return self._placement

    def quote(self, placement: Placement | None = None) -> Quote:
        cluster_id, config_id = self.placement()
        if placement is not None and placement.cluster_id:
            cluster_id = placement.cluster_id
        hourly = self.api.vm_hourly_usd(cluster_id, config_id, volume_gb=self.p.settings.volume_gb)
        return Quote(
            usd_per_day=hourly * 24,
            usd_per_hour=hourly,
            deposit_usd=None,
            detail=f"{hourly:.4f} USD/hour (VM, {self.p.settings.volume_gb} GB disk, public IPv4)",
        )

    def create(self, dep: Deployment, public_key: str) -> str:
        cluster_id, config_id = self.placement()
        cluster_id = dep.cluster_id or cluster_id
        image_url = self.image_url()
        key = self.api.ensure_ssh_key(f"depin-{dep.target}", public_key)
        s = self.p.settings
        user_data = boot.cloud_init(
            self.p.gateway_env(dep), s.package, torch_index=s.torch_index, tls=self.p.tls_pair(dep)
        )
        vm = self.api.create_vm(
            cluster_id=cluster_id,
            name=dep.vm_name,
            configuration_id=config_id,
            boot_disk=self.api.boot_disk(cluster_id, dep.vm_name, volume_gb=s.volume_gb, os_image=image_url),
            ssh_key_ids=[key.id],
            public_ip="new",
            cloud_init=user_data,
        )
        return vm.id

    def image_url(self) -> str:
        """The boot disk's ``osImage``: the configured URL, or the ``downloadUrl`` of the configured (default:
        Ubuntu) default image — an image URL, not an image id."""
        want = self.p.settings.os_image
        if want and want.startswith(("http://", "https://")):
            return want
        return pick_image(self.api.default_images(), want).download_url

    def prepare(self, dep: Deployment, vm: LiveVm) -> Deployment:
        """Once launched: a security group opening 22 + the gateway port, attached to the VM's interface."""
        group_id = dep.security_group_id
        if group_id is None:
            cluster_id = dep.cluster_id or self.api.get_vm(vm.id).cluster_id or self.placement()[0]
            existing = [g for g in self.api.security_groups() if g.name == dep.vm_name]
            if existing:
                group_id = existing[0].id
            else:
                group = self.api.create_security_group(
                    cluster_id=cluster_id,
                    name=dep.vm_name,
                    tcp_ports=[22, dep.port],
                    source=self.p.settings.source_cidr,
                )
                group_id = group.id
            dep = self.p.record(dep, security_group_id=group_id)
        interfaces = self.api.interfaces(vm.id)
        chosen = [i for i in interfaces if i.default] or interfaces
        for iface in chosen:
            if iface.security_group_id != group_id:
                self.api.attach_security_group(vm.id, iface.id, group_id)
        return self.p.record(dep, bootstrapped=True)

    def delete(self, dep: Deployment, vm_ids: list[str]) -> list[str]:
        """Terminate ``vm_ids`` and delete ``dep``'s security group(s), even with no VM left."""
        for vm_id in vm_ids:
            self.api.terminate(vm_id)
        problems = []
        groups = {dep.security_group_id} if dep.security_group_id else set()
        try:
            groups |= {g.id for g in self.api.security_groups() if g.name == dep.vm_name}
        except FluenceRefused as exc:
            problems.append(f"listing security groups: {exc}")
        for group_id in sorted(groups):
            try:
                self.api.delete_security_group(group_id)
            except (FluenceRefused, FluenceUnavailable) as exc:
                problems.append(f"security group {group_id} not deleted ({exc}); delete it in the console")
        return problems


__all__ = ["LifecycleB"]
