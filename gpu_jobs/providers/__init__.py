"""GPU providers: where a worker agent runs. Vast.ai and io.net are rented through their REST APIs; GPUnet and
any other host are registered by hand (``manual``). See :mod:`gpu_jobs.providers.base` for the lifecycle.

``make_provider(name)`` builds one from the environment (:class:`gpu_jobs.settings.GpuJobsSettings`):
``DEPIN_VAST_API_KEY`` (+ ``DEPIN_VAST_URL``), ``DEPIN_IONET_API_KEY`` (+ ``DEPIN_IONET_URL``), or the nodes file
for ``manual`` / ``gpunet``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from depin_core.errors import ConfigError
from gpu_jobs.errors import NoCapacity
from gpu_jobs.providers.base import (
    NAME_PREFIX,
    TOKEN_ENV,
    Bootstrap,
    Instance,
    Offer,
    Provider,
    Worker,
    bootstrap_script,
    choose_offer,
    is_ours,
    new_agent_token,
    parse_worker_name,
    pick_offer,
    reap,
    worker_name,
)
from gpu_jobs.providers.ionet import IonetProvider
from gpu_jobs.providers.manual import DEFAULT_NODES_FILE, ManualProvider, Node
from gpu_jobs.providers.vast import VastProvider
from gpu_jobs.settings import PROVIDER_KEYS, GpuJobsSettings

PROVIDERS = ("vast", "ionet", "manual", "gpunet")

__all__ = [
    "DEFAULT_NODES_FILE",
    "NAME_PREFIX",
    "PROVIDERS",
    "TOKEN_ENV",
    "Bootstrap",
    "Instance",
    "IonetProvider",
    "ManualProvider",
    "NoCapacity",
    "Node",
    "Offer",
    "Provider",
    "VastProvider",
    "Worker",
    "bootstrap_script",
    "choose_offer",
    "is_ours",
    "make_provider",
    "new_agent_token",
    "parse_worker_name",
    "pick_offer",
    "reap",
    "worker_name",
]


def _key(settings: GpuJobsSettings, provider: str) -> SecretStr:
    key = settings.provider_key(provider)
    if key is None:
        raise ConfigError(f"{provider}: set {PROVIDER_KEYS[provider]} to your {provider} API key")
    return key


def make_provider(
    name: str,
    *,
    nodes_file: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    settings: GpuJobsSettings | None = None,
    poll_s: float | None = None,
) -> VastProvider | IonetProvider | ManualProvider:
    """The provider called ``name`` (one of ``PROVIDERS``), configured from ``settings`` (default: read from
    ``env``, else the process environment). ``ConfigError`` naming the variable when a key is missing."""
    settings = settings if settings is not None else GpuJobsSettings.from_env(env)
    extra: dict[str, Any] = {} if poll_s is None else {"poll_s": poll_s}
    if name == "vast":
        return VastProvider(_key(settings, "vast"), settings.vast_url, **extra)
    if name == "ionet":
        return IonetProvider(_key(settings, "ionet"), settings.ionet_url, **extra)
    if name in ("manual", "gpunet"):
        path = nodes_file or settings.nodes_file
        return ManualProvider(path, name=name, **extra)
    raise ConfigError(f"provider {name!r}: choose one of {', '.join(PROVIDERS)}")
