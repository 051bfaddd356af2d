"""A gateway VM's lifecycle on generation A of the Fluence API (``/vms/v3``, client: ``_gen_a``).

The VM is created with ``openPorts = [22, port]`` (``openPorts`` replaces the list: 22 is always kept), and once
``Active`` the bootstrap script runs over SSH as the image's user. Prices are USDC per epoch (24 h).

Replicas are spread by country: the create constraints name datacenters only by ``countries``, so each replica
gets a country of its own among those the marketplace offers (``POST /marketplace/offers``), cheapest first.
"""

from __future__ import annotations

from typing import Any, Literal

from depin_core.errors import PermanentError
from serving.fluence import bootstrap as boot
from serving.fluence._gen_a import VmsV3
from serving.fluence.models import VmA
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


class LifecycleA:
    """Generation A: ``/vms/v3``; SSH bootstrap; ``openPorts``."""

    generation: Literal["A"] = "A"

    def __init__(self, host: VmHost, api: VmsV3) -> None:
        self.p = host
        self.api = api

    def _live(self, vm: VmA) -> LiveVm:
        per_day = vm.price_per_epoch
        dc = vm.datacenter
        country = dc.country_code if dc is not None else None
        return LiveVm(
            id=vm.id,
            name=vm.vm_name,
            status=vm.status,
            ip=vm.public_ip,
            running=vm.status == "Active",
            failed=vm.gone,
            usd_per_hour=per_day / 24 if per_day is not None else None,
            datacenter=country,
            country=country,
            location=" ".join(x for x in (country, dc.city_code) if x) if dc is not None else None,
        )

    def find(self, name: str) -> list[LiveVm]:
        return [self._live(v) for v in self.api.find(name)]

    def get(self, vm_id: str) -> LiveVm | None:
        vm = self.api.get(vm_id)
        return self._live(vm) if vm is not None else None

    def list_ours(self) -> list[LiveVm]:
        return [self._live(v) for v in self.api.list() if v.vm_name.startswith(VM_PREFIX)]

    def constraints(self, country: str | None = None) -> dict[str, Any]:
        """The create/estimate constraints: the configured size and countries, or exactly ``country``."""
        s = self.p.settings
        out: dict[str, Any] = {}
        if s.basic_configuration:
            out["basicConfiguration"] = s.basic_configuration
        countries = [country] if country else list(s.countries)
        if countries:
            out["datacenter"] = {"countries": countries}
        return out

    def placements(self, count: int, *, taken: set[str], replicas: int) -> list[Placement]:
        if replicas == 1:
            return [Placement(None, None, "the marketplace's choice")] * count
        cheapest: dict[str, float] = {}
        for offer in self.api.offers(self.constraints()):
            country = offer.datacenter.country_code if offer.datacenter else None
            if not country or offer.available_instances < 1:
                continue
            price = offer.configuration.price if offer.configuration.price is not None else float("inf")
            cheapest[country] = min(price, cheapest.get(country, price))
        have = sorted(cheapest, key=lambda c: (cheapest[c], c))
        free = [c for c in have if c not in taken]
        if len(free) < count:
            raise too_few_datacenters(replicas, have, taken, "countries (generation A places by country) are")
        return [Placement(c, c, c) for c in free[:count]]

    def quote(self, placement: Placement | None = None) -> Quote:
        country = placement.country if placement is not None else None
        est = self.api.estimate(self.constraints(country), instances=1)
        per_day = est.total_price_per_epoch
        return Quote(
            usd_per_day=per_day,
            usd_per_hour=per_day / 24,
            deposit_usd=est.deposit_amount_usdc,
            detail=f"{per_day:.4f} USDC/day, {est.deposit_amount_usdc:.4f} USDC deposit "
            f"({est.deposit_epochs} days charged at deploy)",
        )

    def image(self) -> tuple[str, str]:
        """(osImage URL, SSH username) of the configured or default (Ubuntu) image."""
        images = self.api.default_images()
        want = self.p.settings.os_image
        if want and want.startswith(("http://", "https://")):
            known = next((i for i in images if i.download_url == want), None)
            return want, known.username if known else "root"
        chosen = pick_image(images, want)
        return chosen.download_url, chosen.username

    def create(self, dep: Deployment, public_key: str) -> str:
        url, _ = self.image()
        created = self.api.create(
            name=dep.vm_name,
            os_image=url,
            ssh_keys=[public_key],
            open_ports=[22, dep.port],  # openPorts replaces the list: 22 stays
            hostname=dep.vm_name,
            constraints=self.constraints(dep.country),
        )
        if not created:
            raise PermanentError(f"POST /vms/v3 created no VM for {dep.vm_name}; see the Fluence console")
        return created[0].vm_id

    def prepare(self, dep: Deployment, vm: LiveVm) -> Deployment:
        """Once Active: make sure 22 + the gateway port are open, then bootstrap over SSH (once)."""
        live = self.api.get(vm.id)
        ports = {p.port for p in live.ports} if live is not None else set()
        if not {22, dep.port} <= ports:
            self.api.update(vm.id, open_ports=sorted(ports | {22, dep.port}))
        if dep.bootstrapped:
            return dep
        _, username = self.image()
        env = self.p.gateway_env(dep)
        script = boot.bootstrap_script(
            env, self.p.settings.package, torch_index=self.p.settings.torch_index, tls=self.p.tls_pair(dep)
        )
        dep = self.p.record(dep, status="bootstrapping")
        result = boot.ssh_bootstrap(
            vm.ip or "",
            script,
            username=username,
            key_file=self.p.settings.key_file(),
            port=self.p.ssh_port_for(vm.id),
            timeout_s=self.p.settings.bootstrap_timeout_s,
            host_key=dep.ssh_host_key,
            retry_s=min(2.0, self.p.settings.poll_s),
        )
        return self.p.record(dep, bootstrapped=True, ssh_host_key=result.host_key or None)

    def delete(self, dep: Deployment, vm_ids: list[str]) -> list[str]:
        self.api.delete(vm_ids)  # no ids: no call
        return []


__all__ = ["LifecycleA"]
