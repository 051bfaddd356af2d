"""Settings of gpu_jobs (env prefix ``DEPIN_``): the agent token and pin for ``agent:URL`` runners, the GPU
providers' API keys and base URLs, the registered-nodes file, torch's CPU threads.

Precedence: keyword arguments > environment variables > defaults; an empty variable counts as unset.
``GpuJobsSettings.from_env(env)`` reads a mapping instead of the process environment (tests). Values are
checked where they are used, with messages naming the variable, so one bad variable never breaks the rest.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from depin_core import paths
from depin_core.settings import EnvSettings

AGENT_TOKEN_ENV = "DEPIN_AGENT_TOKEN"
AGENT_FINGERPRINT_ENV = "DEPIN_AGENT_TLS_FINGERPRINT"  # pins an agent:URL that is not registered
THREADS_ENV = "DEPIN_TORCH_THREADS"
PROVIDER_KEYS = {"vast": "DEPIN_VAST_API_KEY", "ionet": "DEPIN_IONET_API_KEY"}
VAST_URL = "https://console.vast.ai/api/v0"
IONET_URL = "https://api.io.solutions"


class GpuJobsSettings(EnvSettings):
    """Where jobs may run and with which credentials. Secrets are ``SecretStr`` and never printed."""

    model_config = SettingsConfigDict(
        env_prefix="DEPIN_",
        extra="ignore",
        hide_input_in_errors=True,
        env_ignore_empty=True,
        populate_by_name=True,
    )

    agent_token: SecretStr | None = Field(
        None, description="bearer token of an agent:URL that is not registered"
    )
    agent_tls_fingerprint: str | None = Field(
        None, description="sha256 fingerprint pinning an https agent:URL that is not registered"
    )
    vast_api_key: SecretStr | None = Field(None, description="Vast.ai API key (runner vast)")
    vast_url: str = Field(
        VAST_URL,
        validation_alias=AliasChoices("DEPIN_VAST_URL", "VAST_URL"),
        description="Vast.ai server root (also the official client's VAST_URL)",
    )
    ionet_api_key: SecretStr | None = Field(None, description="io.net API key (runner ionet)")
    ionet_url: str = Field(IONET_URL, description="io.net API base URL")
    nodes_file: Path = Field(paths.NODES_FILE, description="registered nodes of providers manual / gpunet")
    families: str = Field(
        "", description="model-family plugins, name=package.module:attr, comma-separated (DEPIN_FAMILIES)"
    )
    torch_threads: str | None = Field(
        None, description="torch CPU threads of a job (checked by gpu_jobs.device.cpu_threads)"
    )

    def provider_key(self, provider: str) -> SecretStr | None:
        """The API key of ``provider`` (vast, ionet), stripped; None when unset or blank."""
        key = {"vast": self.vast_api_key, "ionet": self.ionet_api_key}.get(provider)
        text = key.get_secret_value().strip() if key is not None else ""
        return SecretStr(text) if text else None


__all__ = [
    "AGENT_FINGERPRINT_ENV",
    "AGENT_TOKEN_ENV",
    "PROVIDER_KEYS",
    "THREADS_ENV",
    "GpuJobsSettings",
]
