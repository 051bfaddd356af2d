"""Generation A of the Fluence API: the CPU marketplace and ``/vms/v3`` (documented on fluence.dev).

No user data / cloud-init here: VMs are bootstrapped over SSH (as the default image's ``username``). Only port 22
is open at first; ``openPorts`` in an update REPLACES the whole list, so :meth:`VmsV3.update` refuses a list
without 22. Prices are USDC per epoch (24 h), billed daily with 2 epochs charged at deploy.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Iterable, Sequence
from typing import Any

from depin_core.errors import ConfigError
from serving.fluence._api import FluenceApi
from serving.fluence.errors import FluenceNotFound, FluenceRefused
from serving.fluence.models import CreatedVmA, DefaultImage, EstimateA, OfferA, Port, VmA, VmStatusEntryA

_NAME = re.compile(r"^[A-Za-z0-9-]{1,63}$")
SSH_PORT = 22
RESERVED_PORTS = frozenset({10250})


def ports(open_ports: Iterable[int | Port | dict[str, Any]]) -> list[dict[str, Any]]:
    """``openPorts`` JSON from ints (tcp), ``Port``s or dicts; refuses the reserved port 10250."""
    out = []
    for p in open_ports:
        port = p if isinstance(p, Port) else Port(port=p) if isinstance(p, int) else Port.model_validate(p)
        if port.port in RESERVED_PORTS:
            raise ConfigError(
                f"openPorts: port {port.port} is reserved by Fluence; pick another gateway port"
            )
        doc = port.model_dump()
        if doc not in out:
            out.append(doc)
    return out


class VmsV3:
    """``/marketplace/*`` and ``/vms/v3`` calls of a :class:`FluenceClient`."""

    def __init__(self, client: FluenceApi) -> None:
        self._c = client

    def _get(self, path: str, params: Any = None) -> Any:
        return self._c.get_json(path, gen="A", params=params)

    def _post(self, path: str, body: Any, *, idempotent: bool = True) -> Any:
        r = self._c.request("POST", path, gen="A", json=body, idempotent=idempotent)
        return r.json() if r.content else None

    # ---- marketplace -------------------------------------------------------------------------------------------
    def offers(self, filters: dict[str, Any] | None = None) -> list[OfferA]:
        """``POST /marketplace/offers`` (a search: safe to repeat). ``{}`` lists every offer."""
        return [OfferA.model_validate(o) for o in self._post("/marketplace/offers", filters or {}) or []]

    def basic_configurations(self) -> list[str]:
        """``GET /marketplace/basic_configurations``: slugs like ``cpu-2-ram-4gb-storage-25gb``."""
        return [str(s) for s in self._get("/marketplace/basic_configurations")]

    def default_images(self) -> list[DefaultImage]:
        """``GET /vms/v3/default_images``: OS image URLs and their SSH user."""
        return [DefaultImage.model_validate(i) for i in self._get("/vms/v3/default_images")]

    def estimate(self, constraints: dict[str, Any] | None = None, instances: int = 1) -> EstimateA:
        """``POST /vms/v3/estimate``: deposit and per-epoch prices; ``NoOffer`` when nothing matches."""
        body = {"constraints": constraints or {}, "instances": instances}
        return EstimateA.model_validate(self._post("/vms/v3/estimate", body))

    # ---- VMs ---------------------------------------------------------------------------------------------------
    def create(
        self,
        *,
        name: str,
        os_image: str,
        ssh_keys: Sequence[str],
        open_ports: Iterable[int | Port | dict[str, Any]] = (SSH_PORT,),
        hostname: str | None = None,
        constraints: dict[str, Any] | None = None,
        instances: int = 1,
    ) -> list[CreatedVmA]:
        """``POST /vms/v3``. Not idempotent (no idempotency keys): it is never re-sent once it may have reached
        the API — on ``FluenceUnavailable`` look the name up with :meth:`find` before trying again."""
        if not _NAME.match(name):
            raise ConfigError(f"VM name {name!r}: only letters, digits and hyphens (1-63)")
        if not ssh_keys:
            raise ConfigError(
                "sshKeys: give at least one public key, or the VM cannot be bootstrapped over SSH"
            )
        open_list = ports(open_ports)
        if not any(p["port"] == SSH_PORT for p in open_list):
            open_list.insert(0, {"port": SSH_PORT, "protocol": "tcp"})
        vm_config: dict[str, Any] = {
            "name": name,
            "openPorts": open_list,
            "osImage": os_image,
            "sshKeys": list(ssh_keys),
        }
        if hostname:
            vm_config["hostname"] = hostname
        body = {"constraints": constraints or {}, "instances": instances, "vmConfiguration": vm_config}
        return [CreatedVmA.model_validate(v) for v in self._post("/vms/v3", body, idempotent=False)]

    def list(self) -> list[VmA]:
        """``GET /vms/v3``: every VM of the account."""
        return [VmA.model_validate(v) for v in self._get("/vms/v3")]

    def get(self, vm_id: str) -> VmA | None:
        """The VM with this id, or None when it is not listed (deleted)."""
        return next((v for v in self.list() if v.id.lower() == vm_id.lower()), None)

    def find(self, name: str) -> builtins.list[VmA]:
        """The VMs named ``name`` (the API has no idempotency keys: reconcile by name)."""
        return [v for v in self.list() if v.vm_name == name]

    def status(self) -> builtins.list[VmStatusEntryA]:
        """``GET /vms/v3/status``: status and public IP of each VM."""
        return [VmStatusEntryA.model_validate(v) for v in self._get("/vms/v3/status")]

    def update(
        self,
        vm_id: str,
        *,
        name: str | None = None,
        open_ports: Iterable[int | Port | dict[str, Any]] | None = None,
    ) -> None:
        """``PATCH /vms/v3`` (204). ``open_ports`` REPLACES the VM's whole list: it must include 22."""
        update: dict[str, Any] = {"id": vm_id}
        if name is not None:
            if not _NAME.match(name):
                raise ConfigError(f"VM name {name!r}: only letters, digits and hyphens (1-63)")
            update["vmName"] = name
        if open_ports is not None:
            open_list = ports(open_ports)
            if not any(p["port"] == SSH_PORT and p["protocol"] == "tcp" for p in open_list):
                raise ConfigError(
                    "openPorts replaces the VM's whole port list: include 22/tcp or SSH access is lost"
                )
            update["openPorts"] = open_list
        self._c.request("PATCH", "/vms/v3", gen="A", json={"updates": [update]})

    def delete(self, vm_ids: Sequence[str]) -> None:
        """``DELETE /vms/v3`` with ``{"vmIds"}``. VMs already gone are not an error."""
        if not vm_ids:
            return
        try:
            self._c.request("DELETE", "/vms/v3", gen="A", json={"vmIds": list(vm_ids)})
        except FluenceNotFound:
            return
        except FluenceRefused as exc:
            # some deployments answer 400/422 for an id that is already deleted; check before raising
            if exc.status in (400, 422) and all(self.get(v) is None for v in vm_ids):
                return
            raise
