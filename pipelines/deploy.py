"""Register the deployments on a Prefect **process** work pool, so that workers run them (``depin deploy``).

``depin up`` serves the deployments in its own process; here they are registered on a work pool instead and
``prefect worker start --pool NAME`` on any host with this package installed picks their runs up. The
entrypoints are module paths (``pipelines.flows.ingest_telemetry``) with no storage: the worker imports the
flows from the installed package, nothing is pulled or built. Re-running updates the deployments in place
(same names, same ids) and leaves an existing process pool as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel

from depin_core.errors import ConfigError, TransientError
from pipelines.deployments import ScheduleSettings, deployments

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

POOL_TYPE = "process"


class DeploymentInfo(BaseModel):
    """One registered deployment: ``flow/deployment`` name, id and its cron schedules."""

    name: str
    id: str
    schedules: list[str]


def _unreachable(exc: Exception) -> TransientError:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value() or "(PREFECT_API_URL not set)"
    return TransientError(
        f"Prefect API at {url} is not reachable ({type(exc).__name__}); start it with `depin up` "
        "or set PREFECT_API_URL to a running server's /api"
    )


def ensure_process_pool(pool: str) -> bool:
    """Create the process work pool ``pool`` if it does not exist; True if it was created.

    An existing pool of another type is a :class:`ConfigError` (a process worker could not run its jobs)."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    if not pool.strip():
        raise ConfigError("--pool: the work pool name is empty; give e.g. --pool depin")
    try:
        with get_client(sync_client=True) as client:
            try:
                existing = client.read_work_pool(pool)
            except ObjectNotFound:
                try:
                    client.create_work_pool(
                        WorkPoolCreate(
                            name=pool,
                            type=POOL_TYPE,
                            base_job_template=ProcessWorker.get_default_base_job_template(),
                        )
                    )
                    return True
                except ObjectAlreadyExists:  # created meanwhile by another `depin deploy`
                    existing = client.read_work_pool(pool)
    except httpx.TransportError as exc:
        raise _unreachable(exc) from exc
    if existing.type != POOL_TYPE:
        raise ConfigError(
            f"--pool: work pool {pool!r} exists with type {existing.type!r}, not {POOL_TYPE!r}; "
            "pick another pool name or delete it (`prefect work-pool delete`)"
        )
    return False


def check_pool(pool: str) -> None:
    """Raise unless the Prefect API answers and ``pool`` exists as a process pool (what a worker needs)."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            failed = client.api_healthcheck()
            if failed is not None:
                raise _unreachable(failed)
            try:
                existing = client.read_work_pool(pool)
            except ObjectNotFound:
                raise ConfigError(
                    f"--pool: no work pool {pool!r} on the Prefect API; create it and its deployments "
                    f"with `depin deploy --pool {pool}`"
                ) from None
    except httpx.TransportError as exc:
        raise _unreachable(exc) from exc
    if existing.type != POOL_TYPE:
        raise ConfigError(
            f"--pool: work pool {pool!r} has type {existing.type!r}; a process worker needs a {POOL_TYPE!r} pool"
        )


def _crons(d: RunnerDeployment) -> list[str]:
    return [str(getattr(s.schedule, "cron", s.schedule)) for s in d.schedules or []]


def deploy_to_pool(
    pool: str,
    *,
    settings: ScheduleSettings | None = None,
    extra: Sequence[RunnerDeployment] = (),
) -> list[DeploymentInfo]:
    """Create the process pool ``pool`` if missing, then register every deployment of
    :func:`~pipelines.deployments.deployments` (and ``extra``) on it; re-running updates them in place."""
    import httpx

    ensure_process_pool(pool)
    infos = []
    try:
        for d in [*deployments(settings), *extra]:
            # apply() reads the deployment by name first: an existing one is updated, never duplicated
            dep_id = d.apply(work_pool_name=pool)
            infos.append(DeploymentInfo(name=d.full_name, id=str(dep_id), schedules=_crons(d)))
    except httpx.TransportError as exc:
        raise _unreachable(exc) from exc
    return infos


__all__ = ["DeploymentInfo", "check_pool", "deploy_to_pool", "ensure_process_pool"]
