"""Skip or fail: a test whose prerequisite is missing skips on a developer's machine and fails under CI
(``CI`` set), where every prerequisite must be present."""

from __future__ import annotations

import os

import pytest


def require(problem: str | None, *, in_ci: str | None = None) -> None:
    """Skip with ``problem`` when it is not None; fail instead when ``CI`` is set (with ``in_ci`` if given)."""
    if problem:
        if os.environ.get("CI"):
            pytest.fail(in_ci or f"{problem} (CI is set: this must run there)")
        pytest.skip(problem)
