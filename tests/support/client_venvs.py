"""Official third-party clients, each in a venv of its own beside the checkout (``<repo>/.venv-<name>``).

They pin what the project cannot share (the DIMO SDK pins eth-account 0.13.4) and they are the oracle our
fakes and adapters are checked against, so each is installed as a user would install it, from the package
index. A venv is created on first use and reused while it still imports the pinned version. Used by the
compatibility tests (``tests/e2e/test_official_*.py``) and the ingest benchmark (``bench/ingest.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# pip's words for "the index could not be reached" (as opposed to a broken install)
UNREACHABLE = (
    "No matching distribution found",
    "Could not find a version",
    "NewConnectionError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Connection refused",
)


class InstallError(RuntimeError):
    """pip could not install the client into its venv (the message carries pip's output)."""


class IndexUnreachable(InstallError):
    """The package index could not be reached, so the client could not be installed."""


@dataclass(frozen=True)
class ClientVenv:
    """One pinned client distribution, importable as ``module``, in ``<repo>/<dirname>``."""

    dirname: str
    distribution: str
    version: str
    module: str
    extra: tuple[str, ...] = ()  # further requirements the client needs but does not declare

    @property
    def path(self) -> Path:
        return REPO / self.dirname

    @property
    def python(self) -> Path:
        return self.bin("python")

    def bin(self, name: str) -> Path:
        """A script of the venv (``python``, a client's CLI)."""
        return self.path / "bin" / name

    @property
    def requirements(self) -> list[str]:
        return [f"{self.distribution}=={self.version}", *self.extra]

    def ready(self) -> bool:
        """Whether the venv exists and imports the pinned version."""
        if not self.python.exists():
            return False
        check = (
            f"import {self.module}, importlib.metadata as m; "
            f"assert m.version({self.distribution!r}) == {self.version!r}"
        )
        return (
            subprocess.run([str(self.python), "-c", check], capture_output=True, timeout=120).returncode == 0
        )

    def ensure(self) -> Path:
        """The venv's interpreter; built with ``python -m venv`` + pip when missing or broken.

        Raises :class:`IndexUnreachable` when the package index cannot be reached and :class:`InstallError`
        for any other install failure."""
        if self.ready():
            return self.python
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(self.path)], check=True, timeout=120)
        pip = subprocess.run(
            [
                str(self.python),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                *self.requirements,
            ],
            capture_output=True,
            text=True,
            timeout=540,
        )
        if pip.returncode != 0:
            log = pip.stdout + pip.stderr
            if any(marker in log for marker in UNREACHABLE):
                raise IndexUnreachable(
                    f"package index unreachable, cannot install {self.requirements}: {log[-500:]}"
                )
            raise InstallError(f"pip install {self.requirements} into {self.path} failed:\n{log[-3000:]}")
        if not self.ready():
            raise InstallError(
                f"{self.distribution} {self.version} installed into {self.path} but not importable; delete it to rebuild"
            )
        return self.python


DIMO_SDK = ClientVenv(".venv-dimo-sdk", "dimo-python-sdk", "1.8.0", "dimo", extra=("typing_extensions",))
VASTAI = ClientVenv(".venv-vastai", "vastai", "1.9.1", "vastai")
IONET = ClientVenv(".venv-ionet", "ionet-cloud", "0.4.1", "iocloud")
# DuckDB's own Delta reader (delta_scan): the extension ships as a PyPI wheel built for DuckDB 1.4.4 only
DUCKDB_DELTA = ClientVenv(
    ".venv-duckdb-delta", "duckdb-ext-delta", "1.4.4.20260205", "duckdb_ext", extra=("duckdb==1.4.4",)
)


def obtain(venv: ClientVenv, ensure: Callable[[], Path] | None = None) -> Path:
    """For a test: the client's interpreter. Failing to install it fails the test when the env var CI is set;
    without CI an unreachable (or hanging) package index skips, and any other install failure still fails."""
    import pytest

    try:
        return (ensure or venv.ensure)()
    except (IndexUnreachable, subprocess.TimeoutExpired) as exc:
        if "CI" in os.environ:
            pytest.fail(f"CI is set, so {venv.distribution} must be installable: {exc}", pytrace=False)
        pytest.skip(f"{venv.distribution} not installable here (set CI to make this a failure): {exc}")
    except (InstallError, subprocess.CalledProcessError, OSError) as exc:
        pytest.fail(f"could not install {venv.distribution}: {exc}", pytrace=False)
