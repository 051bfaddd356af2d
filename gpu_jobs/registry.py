"""Model families by name, loaded lazily (importing a family pulls in its features and torch modules).

``spec.model.family`` is a name in ``FAMILIES`` or, where the caller allows it, an import path
``"package.module:attr"`` (a class, instantiated without arguments, or an instance).
"""

from __future__ import annotations

import importlib
from typing import Any

from gpu_jobs.context import ModelFamily
from gpu_jobs.errors import FailureKind, JobError

FAMILIES: dict[str, str] = {
    "range": "gpu_jobs.models.range:RangeFamily",
    "anomaly": "gpu_jobs.models.anomaly:AnomalyFamily",
}


def load_family(name: str, *, allow_import_path: bool = True) -> ModelFamily:
    """The family registered as ``name`` (or at import path ``name``); ``JobError(user)`` if unknown."""
    target = FAMILIES.get(name)
    if target is None:
        if ":" not in name or not allow_import_path:
            raise JobError(
                f"unknown model family {name!r}; use one of {sorted(FAMILIES)}"
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
