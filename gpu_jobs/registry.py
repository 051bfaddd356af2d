"""Model families by name: the one list (:data:`FAMILIES`), loaded lazily (a family pulls in torch).

``spec.model.family`` is a registered name or, where the caller allows it, an import path
``"package.module:attr"`` (a class, instantiated without arguments, or an instance). Everything that lists
families derives from here: the CLI's ``--model``, ``TrainParams.family``, the quality bars, the gateway's
predictors. Plugins register without editing this file: :func:`register_family` in-process, or the environment
variable ``DEPIN_FAMILIES="name=package.module:attr,…"``, which child processes (workers, gateways) inherit.
"""

from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING, Any

from depin_core.errors import ConfigError
from depin_core.names import FUNCTION_NAME_RULE, is_function_name
from gpu_jobs.errors import FailureKind, JobError
from gpu_jobs.settings import GpuJobsSettings

if TYPE_CHECKING:
    from gpu_jobs.models.base import ModelFamily

FAMILIES: dict[str, str] = {
    "range": "gpu_jobs.models.range:RangeFamily",
    "anomaly": "gpu_jobs.models.anomaly:AnomalyFamily",
    "charging": "gpu_jobs.models.charging:ChargingFamily",
}
PLUGINS_ENV = "DEPIN_FAMILIES"  # read through GpuJobsSettings.families

_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def _check(name: str, import_path: str, where: str) -> None:
    if not is_function_name(name):  # a family name is the default function name of its models
        raise ConfigError(f"{where}: family name {name!r} must be {FUNCTION_NAME_RULE}; rename it")
    if not _PATH.fullmatch(import_path):
        raise ConfigError(f"{where}: family {name!r} at {import_path!r}; write it as 'package.module:attr'")


def register_family(name: str, import_path: str) -> None:
    """Register the family at ``"package.module:attr"`` as ``name`` in this process (``ConfigError`` if the
    name is taken by another path)."""
    _check(name, import_path, "register_family")
    if FAMILIES.get(name, import_path) != import_path:
        raise ConfigError(f"register_family: {name!r} is already {FAMILIES[name]}; pick another name")
    FAMILIES[name] = import_path


def plugin_families() -> dict[str, str]:
    """The families named in ``DEPIN_FAMILIES`` (``"name=package.module:attr"``, comma-separated)."""
    out: dict[str, str] = {}
    for item in GpuJobsSettings().families.split(","):
        if not item.strip():
            continue
        name, eq, path = (part.strip() for part in item.partition("="))
        if not eq:
            raise ConfigError(
                f"{PLUGINS_ENV}: {item.strip()!r} is not name=package.module:attr; fix the entry"
            )
        _check(name, path, PLUGINS_ENV)
        if FAMILIES.get(name, path) != path:
            raise ConfigError(f"{PLUGINS_ENV}: {name!r} is already {FAMILIES[name]}; pick another name")
        out[name] = path
    return out


def families() -> dict[str, str]:
    """Every family, name → import path: :data:`FAMILIES` and the ``DEPIN_FAMILIES`` plugins."""
    return {**FAMILIES, **plugin_families()}


def family_names() -> list[str]:
    """The registered family names, sorted."""
    return sorted(families())


def load_family(name: str, *, allow_import_path: bool = True) -> ModelFamily:
    """The family registered as ``name`` (or at import path ``name``); ``JobError(user)`` if unknown."""
    known = families()
    target = known.get(name)
    if target is None:
        if ":" not in name or not allow_import_path:
            raise JobError(
                f"unknown model family {name!r}; use one of {sorted(known)}"
                + (" or an import path 'module:attr'" if allow_import_path else ""),
                FailureKind.USER,
            )
        target = name
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise JobError(f"model family {name!r}: cannot load {target} ({e})", FailureKind.USER) from e
    family = obj() if isinstance(obj, type) else obj
    if not (callable(getattr(family, "train", None)) and callable(getattr(family, "infer", None))):
        raise JobError(f"model family {name!r}: {target} has no train/infer methods", FailureKind.USER)
    return family
