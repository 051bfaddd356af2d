"""The Prefect UI's work pool page in a real browser (Debian's chromium driven by Playwright), without a fleet:
on a Prefect server of its own, a process pool, two workers' heartbeats sent through the API (what
``prefect worker start`` sends) and four runs of a deployment on the pool named like the shards of a sharded
ingest. ``tests/e2e/test_fleet.py`` checks the same page on a real fleet.

Screenshots go to ``.depin/test-artifacts/ui-pool/`` (and the pytest tmp dir).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright import sync_api

from depin_core.net import free_port
from depin_core.proc import Child
from pipelines.stack.up import http_ok, prefect_server_command, wait_ready
from tests.support.browser import launch_chromium, require_browser
from tests.support.ui_pool import FAILURE_SHOT, check_work_pool
from tests.support.up_stack import clean_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

ARTIFACTS = Path(__file__).resolve().parents[2] / ".depin" / "test-artifacts" / "ui-pool"
WORKERS = ["host-a", "host-b"]
SHARDS = [f"shard-{i}-of-4" for i in range(4)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """``prefect server start`` as ``depin up`` starts it (SQLite, a free port; the test harness serves no UI):
    (UI URL, API URL). Stopped after the module."""
    require_browser()  # before the server's start-up, which is most of this test's time
    home = tmp_path_factory.mktemp("prefect-ui-pool")
    cmd, env, api = prefect_server_command("127.0.0.1", free_port(), home / "prefect", clean_env())
    cmd = [*cmd, "--no-services"]  # the API and the UI are all this needs: it starts sooner
    child = Child("prefect server", cmd, log_path=home / "server.log", env=env, cwd=home).start()
    try:
        wait_ready(child, "the Prefect server", lambda: http_ok(f"{api}/health"), timeout_s=120)
        yield api.removesuffix("/api"), api
    finally:
        child.stop()


def _pool_with_workers_and_runs(api: str) -> tuple[str, str]:
    """A process pool, its two workers' heartbeats, the four shard runs (Completed) under a parent run.
    Returns the pool's name and the parent run's id."""
    from prefect import task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Completed

    task_stub = task(name="run_deployment")(lambda: None)

    pool = f"ui-pool-{uuid.uuid4().hex[:6]}"
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        for worker in WORKERS:
            client.send_worker_heartbeat(pool, worker, heartbeat_interval_seconds=60)
        flow_id = client.create_flow_from_name("ingest-telemetry")
        deployment = client.create_deployment(flow_id, f"on-demand-{pool}", work_pool_name=pool)
        parent = client.create_flow_run_from_deployment(deployment, name=f"parent-{pool}")
        # the task run a shard's run hangs under in its parent (``run_deployment`` makes one)
        anchor = client.create_task_run(task_stub, flow_run_id=parent.id, dynamic_key="0")
        for name in SHARDS:
            run = client.create_flow_run_from_deployment(
                deployment, name=name, tags=["depin-shard"], parent_task_run_id=anchor.id
            )
            client.set_flow_run_state(run.id, Completed(), force=True)
        # a run not started has no Subflow Runs tab on its page
        client.set_flow_run_state(parent.id, Completed(), force=True)
    return pool, str(parent.id)


def test_work_pool_page_shows_the_pool_its_workers_and_the_shard_runs(
    server: tuple[str, str], tmp_path: Path
) -> None:
    ui, api = server
    pool, parent = _pool_with_workers_and_runs(api)
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    with sync_api.sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            try:
                check_work_pool(page, ui, pool, WORKERS, SHARDS, tmp_path, run_state="Completed",
                                parent_run_id=parent)  # fmt: skip
            finally:
                shutil.copytree(tmp_path, ARTIFACTS, dirs_exist_ok=True)

            # what is missing fails, naming it (each list has loaded: no wait for what never comes)
            with pytest.raises(AssertionError, match=r"Workers tab .* does not list \['host-c'\]"):
                check_work_pool(page, ui, pool, ["host-a", "host-c"], [], tmp_path / "no-worker")
            with pytest.raises(AssertionError, match=r"Runs tab .* does not list \['shard-4-of-4'\]"):
                check_work_pool(page, ui, pool, WORKERS, [*SHARDS, "shard-4-of-4"], tmp_path / "no-run")
            assert (tmp_path / "no-run" / FAILURE_SHOT).exists()
        finally:
            browser.close()
