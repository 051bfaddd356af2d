"""Fixtures of the bootstrap tests: the requirement on the project's wheel (built once per run)."""

from __future__ import annotations

import pytest

from tests.support.node_image import wheel_requirement


@pytest.fixture(scope="session")
def wheel_req() -> str:
    """``depin-pipeline @ file:///…whl``: the package source every bootstrap here installs."""
    return wheel_requirement()
