"""One Prefect test server per pytest process, shared by every fixture that asks for it.

``prefect_session()`` starts ``prefect_test_harness`` (a temporary SQLite server) on first use and stops it
when the last user is done, so the flow tests (tests/pipelines) and the e2e test of ``train_and_publish``
(tests/e2e) run against the same single server even though pytest sees two fixture definitions.

Fast settings, given as settings rather than environment variables so that nothing leaks
into other tests' processes (e.g. the real server of ``depin up``): no flow heartbeats, and the two server
services whose SQLite writes stall the next flow (task-run recorder, event persister) off — so tests cannot
query task runs; they assert on results, artifacts and side effects instead. ``FAST_PREFECT_TESTS=0`` keeps
those services. Results and the home directory live in a temp dir, never in ``~/.prefect``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_users = 0
_stack: contextlib.ExitStack | None = None


def _fast_settings(home: Path) -> dict[Any, Any]:
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_HOME,
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED,
        PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED,
    )

    updates: dict[Any, Any] = {
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
        PREFECT_HOME: home,
        PREFECT_LOCAL_STORAGE_PATH: home / "storage",
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
    }
    if os.environ.get("FAST_PREFECT_TESTS", "1") == "1":
        updates[PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED] = False
        updates[PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED] = False
    return updates


def _create_dimo_limit() -> None:
    """The ``dimo-api`` global concurrency limit, as ``depin up`` creates it (so ingestion takes a real slot)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from pipelines.params import DIMO_CONCURRENCY_LIMIT

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=DIMO_CONCURRENCY_LIMIT, limit=1)
        )


def _start() -> contextlib.ExitStack:
    from prefect.settings import temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = Path(tempfile.mkdtemp(prefix="depin-prefect-home-"))
    stack = contextlib.ExitStack()
    stack.callback(shutil.rmtree, home, ignore_errors=True)
    try:
        stack.enter_context(
            temporary_settings(_fast_settings(home))
        )  # before the server starts: it reads them
        stack.enter_context(prefect_test_harness(server_startup_timeout=60))
        _create_dimo_limit()
    except BaseException:
        stack.close()
        raise
    return stack


@contextlib.contextmanager
def prefect_session() -> Iterator[None]:
    """Use the process's Prefect test server (started on first use, stopped after the last)."""
    global _users, _stack
    if _stack is None:
        _stack = _start()
    _users += 1
    try:
        yield
    finally:
        _users -= 1
        if _users == 0 and _stack is not None:
            stack, _stack = _stack, None
            stack.close()


def artifacts(key: str) -> list[Any]:
    """The artifacts stored under ``key``, newest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC
        )


def table(artifact: Any) -> list[dict[str, Any]]:
    """The rows of a table artifact (stored as JSON text or as a list)."""
    data = artifact.data
    return json.loads(data) if isinstance(data, str) else data
