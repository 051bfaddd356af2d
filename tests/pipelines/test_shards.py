"""Sharded ingest's parts, against the session's real Prefect test server: the stable split, the fleet-wide
rate limits, the crash-detection automation, and the parent's protocol with its child runs (idempotency keys,
a retried parent reschedules only failed shards, a crashed shard is rescheduled, results read back from the
server). The whole path with real workers is tests/e2e/test_fleet.py."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from typing import Any

import pytest
from pydantic import ValidationError

from connectors.dimo.errors import DimoTransientError
from depin_core.errors import ConfigError
from pipelines import fleet_rate, shards
from pipelines.params import IngestParams

pytestmark = pytest.mark.usefixtures("prefect_backend")

DEADLINE_S = 60.0


def test_the_split_is_stable_complete_and_even() -> None:
    ids = list(range(10_000, 11_000))
    parts = shards.split(ids, 4)
    assert sorted(t for p in parts for t in p) == ids and all(p == sorted(p) for p in parts)
    assert all(200 <= len(p) <= 300 for p in parts), [len(p) for p in parts]
    assert shards.split(list(reversed(ids)), 4) == parts  # order of discovery does not matter
    # the published mapping: sha256 of the decimal id, first 8 bytes big-endian, modulo N (same on every host)
    assert [shards.shard_of(t, 4) for t in (1, 2, 3, 10_000, 123_456_789)] == [1, 2, 3, 0, 3]
    assert Counter(shards.shard_of(t, 1) for t in ids) == {0: 1000}


def test_params_are_checked() -> None:
    with pytest.raises(ValidationError, match="shards"):
        IngestParams(shards=0)
    with pytest.raises(ValidationError, match="rate_limit_scope"):
        IngestParams(rate_limit_scope="world")  # type: ignore[arg-type]
    assert IngestParams().shards == 1 and IngestParams().rate_limit_scope == "run"


def test_fleet_rate_limits_follow_the_license_rate() -> None:
    from prefect.client.orchestration import get_client

    assert [fleet_rate.burst(r) for r in (0.5, 1, 2, 10, 25)] == [1, 1, 1, 5, 12]
    assert fleet_rate.ensure_limits(0) == []

    def stored() -> dict[str, tuple[int, float]]:
        with get_client(sync_client=True) as client:
            limits = [
                client.read_global_concurrency_limit_by_name(fleet_rate.limit_name(s))
                for s in fleet_rate.SERVICES
            ]
        return {lim.name: (lim.limit, lim.slot_decay_per_second) for lim in limits}

    names = sorted(fleet_rate.limit_name(s) for s in fleet_rate.SERVICES)
    fleet_rate.ensure_limits(10)  # created, or set from an earlier test's rate
    # a request occupies UNITS slots (Prefect drops the fraction of a slot decayed at every write)
    assert fleet_rate.UNITS == 100
    assert stored() == {n: (500, 1000.0) for n in names}
    assert fleet_rate.ensure_limits(10) == []  # nothing to change
    assert sorted(fleet_rate.ensure_limits(4)) == names
    assert stored() == {n: (200, 400.0) for n in names}
    fleet_rate.ensure_limits(10)


async def test_admit_takes_a_slot_of_the_service_limit() -> None:
    from prefect.client.orchestration import get_client

    fleet_rate.ensure_limits(10)
    await fleet_rate.admit("telemetry")
    async with get_client() as client:
        limit = await client.read_global_concurrency_limit_by_name("dimo-rate-telemetry")
    assert limit.slot_decay_per_second == 1000.0  # a rate limit: the slots decay, nothing to release
    assert 0 < limit.active_slots <= 5 * fleet_rate.UNITS  # requests in UNITS, at most the burst of 5
    # a slot the server cannot grant is a transient DIMO error: the client retries that request with backoff
    with pytest.raises(DimoTransientError, match="fleet rate limit dimo-rate-no-such-service"):
        await fleet_rate.admit("no-such-service")


def test_crash_automation_is_idempotent_and_arms_on_start_too() -> None:
    from prefect.client.orchestration import get_client

    from pipelines.deploy import CRASH_AUTOMATION, HEARTBEAT_S, ensure_crash_automation

    first = ensure_crash_automation(75)
    assert ensure_crash_automation(60) == first
    with get_client(sync_client=True) as client:
        [auto] = client.read_automations_by_name(CRASH_AUTOMATION)
    trigger: Any = auto.trigger
    assert trigger.within.total_seconds() == 60 and trigger.posture == "Proactive"
    assert {
        "prefect.flow-run.heartbeat",
        "prefect.flow-run.Pending",
        "prefect.flow-run.Running",
    } <= trigger.after
    assert {"prefect.flow-run.Completed", "prefect.flow-run.AwaitingRetry"} <= trigger.expect
    assert "prefect.flow-run.Pending" not in trigger.expect
    assert [a.type for a in auto.actions] == ["change-flow-run-state"]
    with pytest.raises(ConfigError, match="--crash-after"):
        ensure_crash_automation(HEARTBEAT_S)


# ------------------------------------------------------------------------ the parent and its child runs


@pytest.fixture(scope="module")
def child_deployment() -> str:
    """A deployment nobody runs: the test plays the workers by setting the child runs' states."""
    from prefect.deployments.runner import EntrypointType

    from tests.support.worker_flows import worker_probe

    dep = worker_probe.to_deployment(name="shards-probe", entrypoint_type=EntrypointType.MODULE_PATH)
    dep.apply()
    return "worker-probe/shards-probe"


def _params(i: int, ids: list[int]) -> dict[str, Any]:
    return {"out": f"shard-{i}:{','.join(map(str, ids))}"}


def _set(run_id: uuid.UUID, state: Any) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, state, force=True)


def _state(run_id: uuid.UUID) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    return run.state.type.value if run.state else ""


def _result(run_id: uuid.UUID, rows: int) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    with get_client(sync_client=True) as client:
        client.create_artifact(
            ArtifactCreate(
                key=shards.RESULT_ARTIFACT, type="table", data=[{"new_rows": rows}], flow_run_id=run_id
            )
        )


def test_a_retried_parent_finds_its_shards_and_reschedules_only_the_failed(child_deployment: str) -> None:
    from prefect.states import Completed, Failed

    parent = uuid.uuid4()
    parts = [[1, 5], [], [2], [3, 4]]
    first = shards.start_shards(child_deployment, parent, parts, _params)
    assert [r.index for r in first] == [0, 2, 3]  # an empty shard starts nothing
    assert [r.flow_run_name for r in first] == ["shard-0-of-4", "shard-2-of-4", "shard-3-of-4"]

    _set(first[0].flow_run_id, Completed())
    _set(first[1].flow_run_id, Failed(message="boom"))
    again = shards.start_shards(child_deployment, parent, parts, _params)
    assert [r.flow_run_id for r in again] == [r.flow_run_id for r in first]  # found by key, not new runs
    assert [r.reruns for r in again] == [0, 1, 0]
    assert [_state(r.flow_run_id) for r in again] == ["COMPLETED", "SCHEDULED", "SCHEDULED"]
    other = shards.start_shards(child_deployment, uuid.uuid4(), parts, _params)
    assert not {r.flow_run_id for r in other} & {r.flow_run_id for r in first}  # another parent: its own


def test_the_parent_reruns_a_crashed_shard_and_reads_the_results(child_deployment: str) -> None:
    from prefect.states import Completed, Crashed, Failed

    runs = shards.start_shards(child_deployment, uuid.uuid4(), [[1], [2], [3]], _params)
    a, b, c = (r.flow_run_id for r in runs)
    seen: list[tuple[int, str]] = []
    done: list[list[shards.ShardRun]] = []
    waiter = threading.Thread(
        target=lambda: done.append(
            shards.wait_shards(runs, poll_s=0.05, on_change=lambda r: seen.append((r.index, r.state)))
        ),
        daemon=True,
    )
    _result(a, 7)
    _set(a, Completed())
    _set(b, Crashed(message="no heartbeat"))
    _set(c, Failed(message="bad data"))
    waiter.start()
    deadline = time.monotonic() + DEADLINE_S
    while _state(b) != "SCHEDULED":  # the waiter put the crashed shard back for another worker
        assert time.monotonic() < deadline and waiter.is_alive()
        time.sleep(0.05)
    _result(b, 5)
    _set(b, Completed())
    waiter.join(DEADLINE_S)
    assert not waiter.is_alive() and done
    by_index = {r.index: r for r in done[0]}
    assert (by_index[0].state, by_index[0].result.get("new_rows")) == ("COMPLETED", 7)
    assert (by_index[1].state, by_index[1].reruns, by_index[1].result.get("new_rows")) == ("COMPLETED", 1, 5)
    assert (by_index[2].state, by_index[2].message) == ("FAILED", "bad data")
    assert (1, "SCHEDULED") in seen and not by_index[2].ok
    error = shards.ShardsFailed([by_index[2]])
    assert "shard-2-of-3: Failed" in str(error) and "retry this flow run" in str(error)
