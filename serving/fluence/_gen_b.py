"""Generation B of the Fluence API: cluster-based ``/v2/vms`` with cloud-init, security groups, hourly prices.

Wire shapes follow Fluence's published OpenAPI document (v0.10.0, "Cloudless Labs"):

- ``cloudInit.userData`` is capped at 16 KiB (bytes), accepted only on create and never echoed back; invalid
  YAML shows up as a ``failed`` VM, not a 400.
- A new boot disk's ``osImage`` is an image URL (a default image's ``downloadUrl``), not an image id.
- Ports are opened by a security group attached to the VM's interface. Creating one takes ``ingressRules`` /
  ``egressRules`` as ARRAYS of rules (or null); the ``{"type": "allow", "rules": [...]}`` / ``{"type":
  "allowAll"}`` object appears only in answers (and in the update request). Egress is left out: allow all.
- ``/v1/clusters``, ``/v1/configurations/virtual_machines`` and ``/v1/storages/default_images`` answer
  ``{"items": [...]}``; older snapshots answered a bare list (and ``dc_id`` for ``dcId``): both are read.
- Other lists are paginated (``page`` / ``perPage``); errors are ``{"code", "error"}``. A VM's ``publicIp`` is
  the id of a public-IP resource: :meth:`V2Cluster.get_vm` expands it to get the address.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

from depin_core.errors import ConfigError
from serving.fluence._api import FluenceApi
from serving.fluence.errors import FluenceNotFound, FluenceRefused
from serving.fluence.models import (
    Cluster,
    CostResult,
    DatacenterB,
    DefaultImage,
    NetworkInterface,
    SecurityGroup,
    ServiceStatus,
    SshKey,
    VmB,
    VmConfiguration,
)

MAX_USER_DATA_BYTES = 16 * 1024
_EXPAND = {"expand[0]": "publicIp", "expand[1]": "networkInterfaces"}


def tcp_ingress(tcp_ports: Iterable[int], *, source: str = "0.0.0.0/0") -> list[dict[str, Any]]:
    """Security-group rules (``SecurityGroupRuleDto``, the create request's array form) allowing TCP to each
    port in ``tcp_ports`` from ``source`` (an IPv4 CIDR)."""
    rules = []
    for port in sorted(set(tcp_ports)):
        if not 1 <= int(port) <= 65535:
            raise ConfigError(f"security group port {port}: must be 1-65535")
        rules.append(
            {
                "type": "ipv4",
                "protocolKind": {"tcp": {"ports": {"exact": {"value": int(port)}}}},
                "remote": {"address": source},
            }
        )
    return rules


class V2Cluster:
    """Generation-B calls of a :class:`FluenceClient`."""

    def __init__(self, client: FluenceApi) -> None:
        self._c = client

    def _get(self, path: str, params: Any = None) -> Any:
        return self._c.get_json(path, gen="B", params=params)

    def _send(self, method: str, path: str, body: Any = None, *, idempotent: bool | None = None) -> Any:
        r = self._c.request(method, path, gen="B", json=body, idempotent=idempotent)
        return r.json() if r.content else None

    # ---- discovery ---------------------------------------------------------------------------------------------
    def service_status(self) -> ServiceStatus:
        """``GET /v1/service/status`` (public: maintenance mode and version; says nothing about the account)."""
        return ServiceStatus.model_validate(self._get("/v1/service/status"))

    def clusters(self) -> list[Cluster]:
        """``GET /v1/clusters`` (``{"items"}`` or a bare list)."""
        return [Cluster.model_validate(c) for c in self._c.get_items("/v1/clusters", gen="B")]

    def datacenters(self) -> list[DatacenterB]:
        """``GET /v1/datacenters``: where each cluster's ``dcId`` is (country, city)."""
        return [DatacenterB.model_validate(d) for d in self._c.get_items("/v1/datacenters", gen="B")]

    def configurations(self) -> list[VmConfiguration]:
        """``GET /v1/configurations/virtual_machines``: VM sizes (``{"items"}`` or a bare list)."""
        items = self._c.get_items("/v1/configurations/virtual_machines", gen="B")
        return [VmConfiguration.model_validate(c) for c in items]

    def default_images(self) -> list[DefaultImage]:
        """``GET /v1/storages/default_images`` (``{"items"}`` or a bare list)."""
        return [
            DefaultImage.model_validate(i) for i in self._c.get_items("/v1/storages/default_images", gen="B")
        ]

    # ---- SSH keys ----------------------------------------------------------------------------------------------
    def ssh_keys(self) -> list[SshKey]:
        """``GET /v1/ssh_keys`` (every page)."""
        return [SshKey.model_validate(k) for k in self._c.paginate("/v1/ssh_keys", gen="B")]

    def add_ssh_key(self, name: str, public_key: str) -> SshKey:
        """``POST /v1/ssh_keys``."""
        return SshKey.model_validate(
            self._send("POST", "/v1/ssh_keys", {"name": name, "publicKey": public_key.strip()})
        )

    def ensure_ssh_key(self, name: str, public_key: str) -> SshKey:
        """The registered key with this public key (compared without its comment), added if missing."""
        want = " ".join(public_key.split()[:2])
        for key in self.ssh_keys():
            if " ".join(key.public_key.split()[:2]) == want:
                return key
        return self.add_ssh_key(name, public_key)

    # ---- VMs ---------------------------------------------------------------------------------------------------
    @staticmethod
    def boot_disk(
        cluster_id: str,
        name: str,
        *,
        volume_gb: int = 25,
        os_image: str | None = None,
        replicated: bool = False,
    ) -> dict[str, Any]:
        """An inline boot disk (``CreateUserStorageRequest``; NVME is the only type new storage may have).
        ``os_image`` is the image URL (a default image's ``downloadUrl`` or your own .qcow2/.img/.raw)."""
        if os_image is not None and not os_image.startswith(("https://", "http://")):
            raise ConfigError(
                f"bootDisk.osImage {os_image!r}: Fluence takes an image URL here (a default image's downloadUrl), "
                "not an image id or slug"
            )
        disk: dict[str, Any] = {
            "clusterId": cluster_id,
            "name": f"{name}-boot",
            "storageType": "NVME",
            "volumeGb": volume_gb,
            "replicated": replicated,
        }
        if os_image:
            disk["osImage"] = os_image
        return disk

    def create_vm(
        self,
        *,
        cluster_id: str,
        name: str,
        configuration_id: str,
        boot_disk: str | dict[str, Any],
        ssh_key_ids: Sequence[str] = (),
        public_ip: Literal["new"] | str | None = "new",
        cloud_init: str | None = None,
    ) -> VmB:
        """``POST /v2/vms``. ``public_ip="new"`` allocates a V4 address with the VM (without one the VM is not
        reachable from outside), an id attaches an existing one. ``cloud_init`` (≤ 16 KiB) is the user data.
        Not idempotent: on ``FluenceUnavailable`` look the name up with :meth:`find` before retrying."""
        body: dict[str, Any] = {
            "clusterId": cluster_id,
            "name": name,
            "configurationId": configuration_id,
            "bootDisk": boot_disk,
        }
        if ssh_key_ids:
            body["sshKeys"] = list(ssh_key_ids)
        if public_ip == "new":
            body["publicIp"] = {"clusterId": cluster_id, "name": f"{name}-ip", "addressType": "V4"}
        elif public_ip:
            body["publicIp"] = public_ip
        if cloud_init is not None:
            size = len(cloud_init.encode("utf-8"))
            if size > MAX_USER_DATA_BYTES:
                raise ConfigError(
                    f"cloudInit.userData is {size} bytes; Fluence accepts at most {MAX_USER_DATA_BYTES} "
                    "(16 KiB): move the install steps into a script the user data downloads"
                )
            body["cloudInit"] = {"userData": cloud_init}
        return VmB.model_validate(self._send("POST", "/v2/vms", body, idempotent=False))

    def list_vms(self, *, name: str | None = None, per_page: int = 100) -> list[VmB]:
        """``GET /v2/vms`` (every page). ``name`` is the API's case-insensitive LIKE filter (``%``/``_`` are
        wildcards there), so use :meth:`find` for an exact match."""
        params = {"name": name} if name else None
        return [
            VmB.model_validate(v)
            for v in self._c.paginate("/v2/vms", gen="B", params=params, per_page=per_page)
        ]

    def find(self, name: str) -> list[VmB]:
        """The VMs named exactly ``name``, in any status (filter on ``.gone`` / ``.status``)."""
        return [v for v in self.list_vms(name=name) if v.name == name]

    def get_vm(self, vm_id: str) -> VmB:
        """``GET /v2/vms/{id}`` with the public IP and interfaces expanded (``.public_address``)."""
        return VmB.model_validate(self._get(f"/v2/vms/{vm_id}", params=_EXPAND))

    def terminate(self, vm_id: str) -> None:
        """``POST /v2/vms/{id}/terminate``. Already terminated or unknown is not an error."""
        try:
            self._send("POST", f"/v2/vms/{vm_id}/terminate", idempotent=True)
        except FluenceNotFound:
            return
        except FluenceRefused as exc:
            if exc.status in (406, 409, 422):
                try:
                    if self.get_vm(vm_id).status in ("terminating", "terminated"):
                        return
                except FluenceNotFound:
                    return
            raise

    def interfaces(self, vm_id: str) -> list[NetworkInterface]:
        """``GET /v2/vms/{id}/interfaces``."""
        return [NetworkInterface.model_validate(i) for i in self._get(f"/v2/vms/{vm_id}/interfaces")]

    def attach_security_group(self, vm_id: str, interface_id: str, security_group_id: str | None) -> None:
        """``PATCH /v2/vms/{id}/interfaces/{iface}`` with ``{securityGroupId}`` (None detaches)."""
        self._send(
            "PATCH", f"/v2/vms/{vm_id}/interfaces/{interface_id}", {"securityGroupId": security_group_id}
        )

    # ---- security groups ---------------------------------------------------------------------------------------
    def security_groups(self) -> list[SecurityGroup]:
        """``GET /v1/security_groups`` (every page)."""
        return [SecurityGroup.model_validate(g) for g in self._c.paginate("/v1/security_groups", gen="B")]

    def create_security_group(
        self,
        *,
        cluster_id: str,
        name: str,
        tcp_ports: Iterable[int],
        source: str = "0.0.0.0/0",
    ) -> SecurityGroup:
        """``POST /v1/security_groups``: ingress TCP to ``tcp_ports`` from ``source``; egress is left out, which
        allows all. Include 22 in ``tcp_ports`` to keep SSH access."""
        body = {"clusterId": cluster_id, "name": name, "ingressRules": tcp_ingress(tcp_ports, source=source)}
        return SecurityGroup.model_validate(self._send("POST", "/v1/security_groups", body, idempotent=False))

    def delete_security_group(self, security_group_id: str) -> None:
        """``POST /v1/security_groups/delete`` with ``{"ids"}`` (answers the removed groups). Already gone is not
        an error."""
        try:
            self._send("POST", "/v1/security_groups/delete", {"ids": [security_group_id]}, idempotent=True)
        except FluenceNotFound:
            return

    # ---- prices ------------------------------------------------------------------------------------------------
    def cost(self, resources: list[dict[str, Any]], secs: int | None = None) -> CostResult:
        """``POST /v1/prices/cost`` for ``resources`` (``PricingResourceTypeDto`` JSON) over ``secs``."""
        body: dict[str, Any] = {"resources": resources}
        if secs is not None:
            body["secs"] = secs
        return CostResult.model_validate(self._send("POST", "/v1/prices/cost", body, idempotent=True))

    def vm_hourly_usd(
        self, cluster_id: str, configuration_id: str, *, volume_gb: int = 0, public_ip: bool = True
    ) -> float:
        """USD per hour of a VM of this configuration (plus its boot disk and a V4 address if asked)."""
        resources: list[dict[str, Any]] = [
            {"vm": {"resource_id": {"clusterId": cluster_id, "vmConfigurationId": configuration_id}}}
        ]
        if volume_gb:
            resources.append(
                {
                    "storage": {
                        "resource_id": {"clusterId": cluster_id, "storageType": "NVME", "replicated": False},
                        "volume_gb": volume_gb,
                    }
                }
            )
        if public_ip:
            resources.append({"publicIp": {"resource_id": {"clusterId": cluster_id, "addressType": "V4"}}})
        return self.cost(resources, secs=3600).total_cost
