"""Each package's ``__init__`` names its public API (``__all__``): every name resolves, and importing the
package stays cheap (its names load on first use, so ``import`` alone pulls in no torch or HTTP client)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

PACKAGES = ["connectors.dimo", "gpu_jobs", "serving", "pipelines"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_resolves(package: str) -> None:
    module = importlib.import_module(package)
    names = list(module.__all__)
    assert names and len(names) == len(set(names))
    for name in names:
        assert getattr(module, name) is not None, f"{package}.{name}"
    missing = "no_such_name"
    with pytest.raises(AttributeError, match="no attribute"):
        getattr(module, missing)


def test_importing_the_packages_loads_no_heavy_dependency() -> None:
    code = (
        "import sys, json\n"
        + "".join(f"import {p}\n" for p in PACKAGES)
        + "print(json.dumps(sorted(m for m in ('torch', 'httpx', 'pyarrow', 'prefect') if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(out.stdout) == []
