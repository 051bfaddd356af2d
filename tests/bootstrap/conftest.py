"""Fixtures of the bootstrap tests: the project's wheel (built once per run) and the requirement on it."""

from __future__ import annotations

import os

import pytest

from tests.support.node_image import wheel_requirement


def require(problem: str | None) -> None:
    """Skip with ``problem`` (fail when ``CI`` is set: there, every bootstrap must run)."""
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"{problem} (CI is set: this must run there)")
        pytest.skip(problem)


@pytest.fixture(scope="session")
def wheel_req() -> str:
    """``depin-pipeline @ file:///…whl``: the package source every bootstrap here installs."""
    return wheel_requirement()
