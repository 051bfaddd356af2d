"""The fake Dynex service for the charging tests: ``fake_dynex(**kwargs)`` starts one (key :data:`KEY` unless
given), all are stopped after the test. The fake is built on the Dynex SDK's own stubs, so without the SDK the
tests that use it are skipped (and fail when CI is set)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from tests.gpu_jobs.charging.helpers import KEY, require_sdk

if TYPE_CHECKING:
    from tests.support.fakes.dynex import FakeDynex


@pytest.fixture
def fake_dynex() -> Iterator[Callable[..., FakeDynex]]:
    """Starts fakes (``FakeDynex(**kwargs)``, key ``KEY`` unless given); all are stopped after the test."""
    require_sdk()
    from tests.support.fakes.dynex import FakeDynex

    with contextlib.ExitStack() as stack:

        def start(**kwargs: Any) -> FakeDynex:
            kwargs.setdefault("key", KEY)
            return stack.enter_context(FakeDynex(**kwargs))

        yield start
