"""Register the deployments on a Prefect **process** work pool, so that workers run them (``depin deploy``).

``depin up`` serves the deployments in its own process; here they are registered on a work pool instead and
``prefect worker start --pool NAME`` on any host with this package installed picks their runs up. The
entrypoints are module paths (``pipelines.flows.ingest_telemetry``) with no storage: the worker imports the
flows from the installed package, nothing is pulled or built. Re-running updates the deployments in place
(same names, same ids) and leaves an existing process pool as it is.

**A worker that dies** (its host lost, the process killed) leaves its flow runs Running forever: nothing
reports their end. So every deployment's runs send a heartbeat every :data:`HEARTBEAT_S` seconds (Prefect's
flow-run heartbeats, set through the deployments' job variables), and :func:`ensure_crash_automation`
creates the automation Prefect documents for this, widened: a run that has not sent a heartbeat (or moved on)
for ``crash_after_s`` seconds since it went Pending, Running or last beat is set to Crashed. Prefect's recipe
arms only on a heartbeat, which misses a worker lost while starting a run (measured here: killed in the
second between Running and the first beat, the run stayed Running for good). A sharded ingest then runs its
crashed shards again (``pipelines.shards``).
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
HEARTBEAT_S = 30  # Prefect's minimum; the detection time is crash_after_s minus the time since the last beat
CRASH_AFTER_S = 90.0
CRASH_AUTOMATION = "depin-crash-silent-runs"
# states after which a run no longer beats, rightly: finished, or waiting (paused, rescheduled, cancelling)
# (event names are state names: Retrying is a Running state, AwaitingRetry and Late are Scheduled ones)
_MOVED_ON = ("Completed", "Failed", "Cancelled", "Crashed", "Cancelling", "Paused", "Suspended", "Scheduled",
             "AwaitingRetry", "AwaitingConcurrencySlot", "Late")  # fmt: skip
_BEATING = ("heartbeat", "Pending", "Running", "Retrying")  # from these on, a live run beats


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


def ensure_crash_automation(crash_after_s: float = CRASH_AFTER_S) -> str:
    """Create (or update) the automation that sets a flow run to Crashed when its heartbeat has not come for
    ``crash_after_s`` seconds (more than :data:`HEARTBEAT_S`); return its id."""
    from datetime import timedelta

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    if crash_after_s <= HEARTBEAT_S:
        raise ConfigError(
            f"--crash-after: {crash_after_s:g} s is not longer than the heartbeat interval ({HEARTBEAT_S} s); "
            f"healthy runs would be marked crashed. Use more than {HEARTBEAT_S}, e.g. {CRASH_AFTER_S:g}"
        )
    automation = AutomationCore(
        name=CRASH_AUTOMATION,
        description=f"A flow run with no heartbeat for {crash_after_s:g} s lost its worker: set it to Crashed.",
        trigger=EventTrigger(
            after={f"prefect.flow-run.{e}" for e in _BEATING},
            expect={f"prefect.flow-run.{e}" for e in ("heartbeat", "Running", "Retrying", *_MOVED_ON)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=crash_after_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {crash_after_s:g} s: its worker is gone",
            )
        ],
    )
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(CRASH_AUTOMATION)
        if existing:
            client.update_automation(existing[0].id, automation)
            return str(existing[0].id)
        return str(client.create_automation(automation))


def deploy_to_pool(
    pool: str,
    *,
    settings: ScheduleSettings | None = None,
    extra: Sequence[RunnerDeployment] = (),
    crash_after_s: float = CRASH_AFTER_S,
) -> list[DeploymentInfo]:
    """Create the process pool ``pool`` if missing, then register every deployment of
    :func:`~pipelines.deployments.deployments` (and ``extra``) on it, their runs sending heartbeats, and the
    crash-detection automation; re-running updates them in place."""
    import httpx

    ensure_process_pool(pool)
    infos = []
    try:
        ensure_crash_automation(crash_after_s)
        for d in [*deployments(settings), *extra]:
            env = {**d.job_variables.get("env", {}), "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}
            d.job_variables = {**d.job_variables, "env": env}
            # apply() reads the deployment by name first: an existing one is updated, never duplicated
            dep_id = d.apply(work_pool_name=pool)
            infos.append(DeploymentInfo(name=d.full_name, id=str(dep_id), schedules=_crons(d)))
    except httpx.TransportError as exc:
        raise _unreachable(exc) from exc
    return infos


__all__ = [
    "CRASH_AUTOMATION",
    "DeploymentInfo",
    "check_pool",
    "deploy_to_pool",
    "ensure_crash_automation",
    "ensure_process_pool",
]
