"""Typed views of the Fluence public API's JSON (both generations and GPU containers).

These are third-party wire models: unknown fields are ignored (``extra="ignore"``) so an API that grows a field
does not break us, and amounts the API sends as decimal strings ("2.4352") are parsed into floats. Field names
are snake_case in Python with the API's camelCase (or snake_case, for the GPU API) as aliases.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field

_CAMEL = ConfigDict(extra="ignore", populate_by_name=True)


def _money(value: Any) -> Any:
    """A price as float (the API sends decimal strings); None stays None."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"not a decimal amount: {str(value)[:40]!r}") from None


Money = Annotated[float | None, BeforeValidator(_money)]
"""A decimal-string amount as float."""


class Port(BaseModel):
    """An open port of a generation-A VM (``openPorts`` / ``ports``)."""

    model_config = _CAMEL

    port: int = Field(ge=1, le=65535)
    protocol: Literal["tcp", "udp"] = "tcp"


# ---- generation A ---------------------------------------------------------------------------------------------
VmStatusA = Literal[
    "New", "Launching", "Active", "SmallBalance", "InsufficientFunds", "Terminated", "Stopped"
]


class Datacenter(BaseModel):
    model_config = _CAMEL

    country_code: str | None = Field(None, alias="countryCode")
    city_code: str | None = Field(None, alias="cityCode")
    tier: int | None = None


class OfferConfiguration(BaseModel):
    model_config = _CAMEL

    slug: str
    price: Money = None  # USDC per epoch (24 h)


class OfferA(BaseModel):
    """One ``POST /marketplace/offers`` entry: a basic configuration at a price in one datacenter."""

    model_config = _CAMEL

    configuration: OfferConfiguration
    datacenter: Datacenter | None = None
    servers: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def available_instances(self) -> int:
        return sum(int(s.get("availableBasicInstances") or 0) for s in self.servers)


class DefaultImage(BaseModel):
    """``GET /vms/v3/default_images`` (A) or ``/v1/storages/default_images`` (B): an OS image and its SSH user."""

    model_config = _CAMEL

    id: str | None = None
    slug: str
    name: str | None = None
    distribution: str | None = None
    download_url: str = Field(alias="downloadUrl")
    username: str = "root"


class EstimateA(BaseModel):
    """``POST /vms/v3/estimate``: the deposit charged at deploy and the per-epoch (24 h) prices, in USDC."""

    model_config = _CAMEL

    deposit_amount_usdc: float = Field(alias="depositAmountUsdc")
    deposit_epochs: int = Field(alias="depositEpochs")
    total_price_per_epoch: float = Field(alias="totalPricePerEpoch")
    max_price_per_epoch: float = Field(alias="maxPricePerEpoch")
    instances: int


class CreatedVmA(BaseModel):
    """One element of the ``POST /vms/v3`` answer."""

    model_config = _CAMEL

    vm_id: str = Field(alias="vmId")
    vm_name: str = Field(alias="vmName")


class VmA(BaseModel):
    """A generation-A VM (``GET /vms/v3``). ``price_per_epoch`` is USDC per 24 h."""

    model_config = _CAMEL

    id: str
    vm_name: str = Field(alias="vmName")
    status: str  # VmStatusA; kept a str so a new status does not break parsing
    price_per_epoch: Money = Field(None, alias="pricePerEpoch")
    public_ip: str | None = Field(None, alias="publicIp")
    ports: list[Port] = Field(default_factory=list)
    os_image: str | None = Field(None, alias="osImage")
    datacenter: Datacenter | None = None
    reserved_balance: Money = Field(None, alias="reservedBalance")
    total_spent: Money = Field(None, alias="totalSpent")
    created_at: str | None = Field(None, alias="createdAt")

    @property
    def ready(self) -> bool:
        """Running with an address (the gateway may still be starting)."""
        return self.status == "Active" and bool(self.public_ip)

    @property
    def gone(self) -> bool:
        """Ended (by the provider, the user, or for lack of funds): it will not come back."""
        return self.status in ("Terminated", "Stopped", "InsufficientFunds")


class VmStatusEntryA(BaseModel):
    """One entry of ``GET /vms/v3/status``."""

    model_config = _CAMEL

    id: str
    status: str
    public_ip: str | None = Field(None, alias="publicIp")
    vm_name: str | None = Field(None, alias="vmName")


# ---- generation B ---------------------------------------------------------------------------------------------
VmStatusB = Literal[
    "new",
    "launching",
    "launched",
    "failed",
    "updating",
    "terminating",
    "terminated",
    "suspending",
    "suspended",
    "restarting",
    "softRebooting",
    "unknown",
]


class ServiceStatus(BaseModel):
    model_config = _CAMEL

    maintenance_mode: bool = Field(False, alias="maintenanceMode")
    version: str = ""


class DatacenterB(BaseModel):
    """``GET /v1/datacenters`` entry (``DatacenterDto``): where a cluster's ``dcId`` is."""

    model_config = _CAMEL

    id: str
    country_code: str | None = Field(None, alias="countryCode")
    city_code: str | None = Field(None, alias="cityCode")
    city_name: str | None = Field(None, alias="cityName")
    slug: str | None = None


class Cluster(BaseModel):
    model_config = _CAMEL

    id: str
    name: str
    # ``dcId`` in the current document, ``dc_id`` in older snapshots
    dc_id: str | None = Field(None, validation_alias=AliasChoices("dcId", "dc_id"))


class VmConfiguration(BaseModel):
    """``GET /v1/configurations/virtual_machines``: a VM size."""

    model_config = _CAMEL

    id: str
    slug: str
    name: str | None = None
    vcpu: int | None = None
    ram_gb: int | None = Field(None, alias="ramGb")


class SshKey(BaseModel):
    model_config = _CAMEL

    id: str
    name: str
    public_key: str = Field(alias="publicKey")
    fingerprint: str | None = None


class PublicIpB(BaseModel):
    model_config = _CAMEL

    id: str
    address: str | None = None
    status: str | None = None


class NetworkInterface(BaseModel):
    """``GET /v2/vms/{id}/interfaces`` entry."""

    model_config = _CAMEL

    id: str
    default: bool = False
    kind: dict[str, Any] | None = None
    security_group_id: str | None = Field(
        None, validation_alias=AliasChoices("securityGroup", "securityGroupId", "security_group_id")
    )

    @property
    def public(self) -> bool:
        return bool(self.kind and "public" in self.kind)


class VmExpanded(BaseModel):
    model_config = _CAMEL

    public_ip: PublicIpB | None = Field(None, alias="publicIp")
    network_interfaces: list[NetworkInterface] | None = Field(None, alias="networkInterfaces")


class VmB(BaseModel):
    """A generation-B VM (``UserVmDto``). ``public_ip_id`` is the id of its public IP resource; the address is
    ``public_address`` (present when fetched with ``expand=publicIp``, i.e. from ``V2Cluster.get_vm``)."""

    model_config = _CAMEL

    id: str
    name: str
    status: str  # VmStatusB
    cluster_id: str | None = Field(None, alias="clusterId")
    configuration_id: str | None = Field(None, alias="configurationId")
    price_hourly_usd: Money = Field(None, alias="priceHourlyUsd")
    price_monthly_usd: Money = Field(None, alias="priceMonthlyUsd")
    public_ip_id: str | None = Field(None, alias="publicIp")
    network_interfaces: list[str] = Field(default_factory=list, alias="networkInterfaces")
    ssh_keys: list[str] = Field(default_factory=list, alias="sshKeys")
    allowed_actions: list[str] = Field(default_factory=list, alias="allowedActions")
    expanded: VmExpanded | None = None
    created_at: str | None = Field(None, alias="createdAt")

    @property
    def public_address(self) -> str | None:
        """The public IP address, when the VM was fetched with ``expand=publicIp``."""
        if self.expanded and self.expanded.public_ip:
            return self.expanded.public_ip.address
        return None

    @property
    def ready(self) -> bool:
        return self.status == "launched"

    @property
    def gone(self) -> bool:
        return self.status in ("failed", "terminating", "terminated")


class SecurityGroup(BaseModel):
    """``/v1/security_groups`` entry (``UserSecurityGroupDto``). Rules are kept as the API's JSON: answers carry
    ``{"type": "allow", "rules": [...]}`` or ``{"type": "allowAll"}``; ``attached_to`` holds network interface
    ids."""

    model_config = _CAMEL

    id: str
    name: str
    cluster_id: str | None = Field(None, alias="clusterId")
    status: str | None = None
    ingress_rules: dict[str, Any] | list[Any] | None = Field(None, alias="ingressRules")
    egress_rules: dict[str, Any] | list[Any] | None = Field(None, alias="egressRules")
    attached_to: list[str] = Field(default_factory=list, alias="attachedTo")

    @property
    def ingress_rule_list(self) -> list[dict[str, Any]]:
        """The ingress rules, whichever form the API answered (object with ``rules``, or an array)."""
        rules = self.ingress_rules
        if isinstance(rules, dict):
            return list(rules.get("rules") or [])
        return list(rules or [])


class CostResult(BaseModel):
    """``POST /v1/prices/cost``: USD for ``period_secs`` (decimal strings on the wire)."""

    model_config = _CAMEL

    total_cost: float = Field(alias="totalCost")
    total_cost_per_sec: float = Field(alias="totalCostPerSec")
    period_secs: int = Field(alias="periodSecs")
    cost_of_resources: list[dict[str, Any]] = Field(default_factory=list, alias="costOfResources")

    @property
    def hourly_usd(self) -> float:
        return self.total_cost_per_sec * 3600.0


# ---- GPU containers ---------------------------------------------------------------------------------------------
class GpuPricing(BaseModel):
    model_config = _CAMEL

    hour: float
    upfront_hours: int = 0
    currency: str = "USDC"


class GpuModel(BaseModel):
    model_config = _CAMEL

    vendor: str | None = None
    model: str | None = None
    vram: str | None = None
    interface: str | None = None


class GpuPlan(BaseModel):
    """``GET /gpu/plans/`` entry, flattened: ``{"plan": {...}, "attributes": {"location": [...]}}``."""

    model_config = _CAMEL

    id: str
    name: str
    gpu_model: GpuModel | None = None
    gpu_count: int = 1
    pricing: GpuPricing
    locations: list[str] = Field(default_factory=list)

    @classmethod
    def from_api(cls, doc: dict[str, Any]) -> GpuPlan:
        plan = dict(doc.get("plan") or doc)
        supply = plan.get("supply") or {}
        return cls.model_validate(
            {
                **plan,
                "gpu_count": supply.get("gpu_count", 1),
                "locations": (doc.get("attributes") or {}).get("location") or [],
            }
        )


class ForwardedPort(BaseModel):
    model_config = _CAMEL

    port: int
    external_port: int
    protocol: str = "tcp"


class GpuNetwork(BaseModel):
    model_config = _CAMEL

    domain: str | None = None
    forwarded_ports: list[ForwardedPort] = Field(default_factory=list)
    uri: str | None = None


class GpuInstance(BaseModel):
    """``GET /gpu/instances/{id}``: ``instance_status`` INITIALIZED / ACTIVE / FAILED / ENDED,
    ``container_status`` STARTED / NOT_STARTED."""

    model_config = _CAMEL

    id: str = Field(validation_alias=AliasChoices("id", "instance_id"))
    name: str | None = None
    instance_status: str
    container_status: str | None = None
    network: GpuNetwork | None = None
    plan_id: str | None = None

    def external_port(self, port: int) -> int | None:
        """The public port forwarded to the container's ``port``."""
        for fp in self.network.forwarded_ports if self.network else []:
            if fp.port == port:
                return fp.external_port
        return None

    @property
    def ready(self) -> bool:
        return self.instance_status == "ACTIVE" and self.container_status == "STARTED"

    @property
    def gone(self) -> bool:
        return self.instance_status in ("FAILED", "ENDED")
