"""GPU providers: where a worker agent runs. Vast.ai and io.net are rented through their REST APIs; GPUnet and
any other host are registered by hand (``manual``). See :mod:`gpu_jobs.providers.base` for the lifecycle.

``make_provider(name)`` builds one from the environment: ``DEPIN_VAST_API_KEY`` (+ ``DEPIN_VAST_URL``),
``DEPIN_IONET_API_KEY`` (+ ``DEPIN_IONET_URL``), or the nodes file for ``manual`` / ``gpunet``.
"""

from __future__ import annotations

import os
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


def _key(env: Mapping[str, str], var: str, provider: str) -> SecretStr:
    key = env.get(var, "").strip()
    if not key:
        raise ConfigError(f"{provider}: set {var} to your {provider} API key")
    return SecretStr(key)


def make_provider(
    name: str,
    *,
    nodes_file: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    poll_s: float | None = None,
) -> VastProvider | IonetProvider | ManualProvider:
    """The provider called ``name`` (one of ``PROVIDERS``), configured from ``env`` (default: the process
    environment). ``ConfigError`` naming the variable when a key is missing."""
    env = os.environ if env is None else env
    extra: dict[str, Any] = {} if poll_s is None else {"poll_s": poll_s}
    if name == "vast":
        url = env.get("DEPIN_VAST_URL") or env.get("VAST_URL") or "https://console.vast.ai/api/v0"
        return VastProvider(_key(env, "DEPIN_VAST_API_KEY", "vast"), url, **extra)
    if name == "ionet":
        url = env.get("DEPIN_IONET_URL") or "https://api.io.solutions"
        return IonetProvider(_key(env, "DEPIN_IONET_API_KEY", "ionet"), url, **extra)
    if name in ("manual", "gpunet"):
        path = nodes_file or env.get("DEPIN_NODES_FILE") or DEFAULT_NODES_FILE
        return ManualProvider(path, name=name, **extra)
    raise ConfigError(f"provider {name!r}: choose one of {', '.join(PROVIDERS)}")
