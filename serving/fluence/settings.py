"""Settings of ``depin publish --target fluence`` and ``depin fluence`` (env prefix ``DEPIN_FLUENCE_``).

Precedence: keyword arguments > ``DEPIN_FLUENCE_*`` environment variables > defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from depin_core.errors import ConfigError
from serving.fluence import bootstrap as boot
from serving.fluence._client import DEFAULT_BASE_URL, FluenceClient
from serving.fluence.state import DEFAULT_STATE_DIR, valid_target

SSH_KEY_FILE = "id_ed25519"  # under the state directory unless ssh_key_file says otherwise


class FluenceSettings(BaseSettings):
    """Settings of ``depin publish --target fluence`` (env prefix ``DEPIN_FLUENCE_``; keyword arguments win)."""

    model_config = SettingsConfigDict(env_prefix="DEPIN_FLUENCE_", extra="ignore", hide_input_in_errors=True)

    api_key: SecretStr | None = Field(None, description="Fluence API key (Console › Settings › API keys)")
    url: str = Field(DEFAULT_BASE_URL, description="Fluence API base URL")
    generation: Literal["A", "B"] | None = Field(
        None, description="API generation A or B; default: detected with authenticated calls"
    )
    target: str = Field("default", description="deployment name; the VM is named depin-gw-<target>")
    replicas: int | None = Field(
        None,
        ge=1,
        le=10,
        description="gateway VMs, each in a different datacenter (replica i ≥ 1: depin-gw-<target>-r<i>); "
        "default: as many as the target has, 1 for a new one",
    )
    port: int = Field(8787, ge=1, le=65535, description="gateway port opened on the VM")
    ssh_port: int = Field(22, ge=1, le=65535, description="SSH port of generation-A VMs (bootstrap)")
    max_usd_per_day: float = Field(
        5.0, ge=0, description="price cap: refuse to create a VM costing more than this per day (USD/USDC)"
    )
    package: str = Field(boot.DEFAULT_PACKAGE, description="pip requirement installed on the VM")
    torch_index: str | None = Field(boot.CPU_TORCH_INDEX, description="extra index for torch wheels (CPU)")
    state_dir: Path = Field(DEFAULT_STATE_DIR, description="state file, admin keys and the SSH key")
    ssh_key_file: Path | None = Field(None, description="SSH private key (default <state_dir>/id_ed25519)")
    os_image: str | None = Field(
        None, description="OS image: a default image's slug, id or name, or an image URL; default Ubuntu"
    )
    basic_configuration: str | None = Field(
        None, description="gen A VM size slug, e.g. cpu-2-ram-4gb-storage-25gb (default: the cheapest)"
    )
    countries: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="datacenter countries to place gateway VMs in (ISO codes, comma-separated; default any)",
    )
    cluster: str | None = Field(
        None, description="gen B cluster id or name (default: the first); one replica only"
    )
    configuration: str | None = Field(
        None, description="gen B VM configuration id or slug (default: smallest)"
    )
    volume_gb: int = Field(25, ge=10, le=10_000, description="gen B boot disk size")
    source_cidr: str = Field("0.0.0.0/0", description="gen B: who may reach the gateway port (CIDR)")
    vm_timeout_s: float = Field(900.0, gt=0, description="wait for Active/launched at most this long")
    bootstrap_timeout_s: float = Field(1200.0, gt=0, description="gen A: SSH bootstrap at most this long")
    ready_timeout_s: float = Field(
        900.0, gt=0, description="wait for the gateway's /readyz at most this long"
    )
    poll_s: float = Field(5.0, gt=0, description="status polling interval")

    @field_validator("countries", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [c.strip().upper() for c in value.split(",") if c.strip()]
        return value

    @field_validator("generation", mode="before")
    @classmethod
    def _generation(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().upper() or None
            if value not in (None, "A", "B"):
                raise ConfigError(
                    f"DEPIN_FLUENCE_GENERATION {value!r}: A (/vms/v3) or B (/v2/vms), or unset to detect"
                )
        return value

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        return valid_target(value)

    @field_validator("port")
    @classmethod
    def _port(cls, value: int) -> int:
        if value in (22, 10250):
            raise ConfigError(f"DEPIN_FLUENCE_PORT (port) {value}: reserved (SSH / Fluence); use e.g. 8787")
        return value

    def key_file(self) -> Path:
        return self.ssh_key_file or self.state_dir / SSH_KEY_FILE

    def client(self, **options: Any) -> FluenceClient:
        """A :class:`FluenceClient` for these settings (``ConfigError`` without an API key)."""
        if self.api_key is None or not self.api_key.get_secret_value().strip():
            raise ConfigError(
                "no Fluence API key: set DEPIN_FLUENCE_API_KEY (Fluence Console › Settings › API keys)"
            )
        return FluenceClient(self.api_key, base_url=self.url, generation=self.generation, **options)


__all__ = ["SSH_KEY_FILE", "FluenceSettings"]
