"""``deploy_to_pool``/``depin deploy``: deployments registered on a process work pool and run by a real
``prefect worker`` process, against the session's Prefect test server over loopback HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from depin_core.errors import ConfigError
from depin_core.proc.tree import stop_tree
from pipelines.deployments import ScheduleSettings

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_backend")]

REPO = Path(__file__).resolve().parents[2]
RUN_DEADLINE_S = 90.0


def _probe_deployment() -> Any:
    from prefect.deployments.runner import EntrypointType

    from tests.support.worker_flows import worker_probe

    return worker_probe.to_deployment(name="probe", entrypoint_type=EntrypointType.MODULE_PATH)


@pytest.fixture
def pool() -> str:
    return f"test-pool-{uuid.uuid4().hex[:8]}"


WORKER_COMMANDS = {
    "prefect": ["-m", "prefect", "worker", "start"],
    "depin-pool-worker": ["-m", "pipelines.cli", "pool-worker"],  # checks, then execs the one above
}


@pytest.fixture(params=sorted(WORKER_COMMANDS))
def worker(request: pytest.FixtureRequest, pool: str, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A worker on POOL (``prefect worker start`` or ``depin pool-worker``) in its own directory and Prefect
    home, talking to the test server over HTTP. The pool must exist before (``depin pool-worker`` checks)."""
    from prefect.settings import PREFECT_API_URL

    home, cwd = tmp_path / "worker-home", tmp_path / "worker-cwd"
    home.mkdir()
    cwd.mkdir()
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_HOME": str(home),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        # the probe flow lives in the tests package; the pipelines flows come from the installed package
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, *WORKER_COMMANDS[request.param], "--pool", pool, "--name", "test-worker"],
        cwd=cwd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        stop_tree([proc.pid], [proc.pid])
        proc.wait()
        log.close()


def _read_deployments(ids: list[str]) -> dict[str, Any]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {i: client.read_deployment(uuid.UUID(i)) for i in ids}


def test_deploy_to_pool_is_idempotent_and_keeps_schedules(pool: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName

    from pipelines.deploy import deploy_to_pool, ensure_process_pool

    settings = ScheduleSettings(ingest_cron="5 1 * * *", ingest_since="3d", active=False)
    assert ensure_process_pool(pool) is True
    first = deploy_to_pool(pool, settings=settings)
    second = deploy_to_pool(pool, settings=settings)
    assert ensure_process_pool(pool) is False

    assert [(d.name, d.id) for d in first] == [(d.name, d.id) for d in second]
    by_name = {d.name: d for d in second}
    assert len(by_name) == len(second) == 8
    assert by_name["ingest-telemetry/nightly"].schedules == ["5 1 * * *"]
    assert by_name["train-and-publish/weekly"].schedules == ["0 3 * * 1"]
    assert by_name["batch-score/on-demand"].schedules == []

    stored = _read_deployments([d.id for d in second])
    assert {s.work_pool_name for s in stored.values()} == {pool}
    assert all(s.pull_steps == [] or s.pull_steps is None for s in stored.values())
    nightly = stored[by_name["ingest-telemetry/nightly"].id]
    assert nightly.entrypoint == "pipelines.flows.ingest_telemetry"
    assert nightly.parameters["params"]["since"] == "3d"
    assert [s.schedule.cron for s in nightly.schedules] == ["5 1 * * *"]  # updated, not appended
    assert [s.active for s in nightly.schedules] == [False]

    with get_client(sync_client=True) as client:
        pools = client.read_work_pools(work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])))
    assert [(p.name, p.type) for p in pools] == [(pool, "process")]


def test_existing_pool_of_another_type_is_an_error(pool: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from pipelines.deploy import deploy_to_pool

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="kubernetes"))
    with pytest.raises(ConfigError, match=r"--pool: work pool .* type 'kubernetes', not 'process'"):
        deploy_to_pool(pool)


@pytest.fixture
def deployed(pool: str) -> list[Any]:
    from pipelines.deploy import deploy_to_pool

    return deploy_to_pool(pool, extra=[_probe_deployment()])


def test_worker_runs_a_deployment_from_the_pool(
    pool: str, deployed: list[Any], worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client

    infos = deployed
    probe = next(i for i in infos if i.name == "worker-probe/probe")
    out = tmp_path / "probe.json"
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(uuid.UUID(probe.id), parameters={"out": str(out)})
        deadline = time.monotonic() + RUN_DEADLINE_S
        while True:
            run = client.read_flow_run(run.id)
            if run.state is not None and run.state.is_final():
                break
            assert worker.poll() is None, f"worker exited with {worker.returncode}"
            assert time.monotonic() < deadline, f"flow run still {run.state_name} after {RUN_DEADLINE_S} s"
            time.sleep(0.2)

    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert run.state is not None and run.state.is_completed(), f"{run.state}\n{log[-3000:]}"
    ran = json.loads(out.read_text())
    assert ran["pid"] not in (os.getpid(), worker.pid)
    assert run.work_pool_name == pool
    assert run.infrastructure_pid is not None and run.infrastructure_pid.endswith(str(ran["pid"]))
    assert ran["ppid"] == worker.pid, "the flow ran in a process the worker started"


def test_depin_deploy_cli_prints_the_pool_and_deployments(pool: str) -> None:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "DO_NOT_TRACK": "1"}
    cmd = [sys.executable, "-m", "pipelines.cli", "deploy", "--pool", pool, "--json"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert (out["pool"], out["created"], len(out["deployments"])) == (pool, True, 8)
    nightly = next(d for d in out["deployments"] if d["name"] == "ingest-telemetry/nightly")
    assert nightly["schedules"] == ["0 2 * * *"]
    stored = _read_deployments([d["id"] for d in out["deployments"]])
    assert {s.work_pool_name for s in stored.values()} == {pool}
    assert f"prefect worker start --pool {pool}" in res.stderr


@pytest.mark.parametrize("command", ["deploy", "pool-worker"])
def test_cli_names_an_unreachable_server(command: str, tmp_path: Path) -> None:
    from depin_core.net import free_port

    url = f"http://127.0.0.1:{free_port()}/api"
    env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(tmp_path), "DO_NOT_TRACK": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", command, "--pool", "p"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert f"Prefect API at {url} is not reachable" in res.stderr


def test_pool_worker_refuses_a_missing_pool(pool: str) -> None:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "DO_NOT_TRACK": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "pool-worker", "--pool", pool],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert f"no work pool {pool!r}" in res.stderr and f"depin deploy --pool {pool}" in res.stderr
