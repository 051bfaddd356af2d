"""DIMO's official Python SDK (dimo-python-sdk 1.8.0) in its own venv, ``<repo>/.venv-dimo-sdk``.

The SDK pins eth-account 0.13.4, so it cannot share the project's venv. :func:`ensure_sdk_python` creates the
venv on first use and reuses it while it still imports the pinned version. Used by the compatibility test
(``tests/e2e/test_official_sdk.py``) and the ingest benchmark (``bench/ingest.py``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SDK_VENV = REPO / ".venv-dimo-sdk"
SDK_PYTHON = SDK_VENV / "bin" / "python"
SDK_VERSION = "1.8.0"
SDK_REQUIREMENTS = [f"dimo-python-sdk=={SDK_VERSION}", "typing_extensions"]
UNREACHABLE = (
    "No matching distribution found",
    "Could not find a version",
    "NewConnectionError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Connection refused",
)


class SdkInstallError(RuntimeError):
    """pip could not install the SDK into its venv (the message carries pip's output)."""


class SdkIndexUnreachable(SdkInstallError):
    """The package index could not be reached, so the SDK could not be installed."""


def sdk_ready() -> bool:
    """Whether the venv exists and imports the pinned SDK version."""
    if not SDK_PYTHON.exists():
        return False
    check = f"import dimo, importlib.metadata as m; assert m.version('dimo-python-sdk') == '{SDK_VERSION}'"
    return subprocess.run([str(SDK_PYTHON), "-c", check], capture_output=True, timeout=60).returncode == 0


def ensure_sdk_python() -> Path:
    """The SDK venv's interpreter; built with ``python -m venv`` + pip when missing or broken.

    Raises :class:`SdkIndexUnreachable` when the package index cannot be reached and :class:`SdkInstallError`
    for any other install failure.
    """
    if sdk_ready():
        return SDK_PYTHON
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(SDK_VENV)], check=True, timeout=120)
    pip = subprocess.run(
        [str(SDK_PYTHON), "-m", "pip", "install", "-q", "--disable-pip-version-check", *SDK_REQUIREMENTS],
        capture_output=True,
        text=True,
        timeout=480,
    )
    if pip.returncode != 0:
        log = pip.stdout + pip.stderr
        if any(marker in log for marker in UNREACHABLE):
            raise SdkIndexUnreachable(
                f"package index unreachable, cannot install {SDK_REQUIREMENTS}: {log[-500:]}"
            )
        raise SdkInstallError(f"pip install {SDK_REQUIREMENTS} failed:\n{log[-3000:]}")
    if not sdk_ready():
        raise SdkInstallError(
            f"dimo-python-sdk {SDK_VERSION} installed into {SDK_VENV} but not importable; delete it to rebuild"
        )
    return SDK_PYTHON
