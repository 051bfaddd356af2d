"""Sharded ingest: the fleet split by a stable hash into child runs of the ingest deployment, run by workers.

``ingest_telemetry(shards=N)`` splits the fleet with :func:`split`. The parent ingests the first non-empty
shard itself (the license's rate would otherwise sit unused while the other shards' processes start); every
other non-empty shard becomes one flow run of the ingest deployment (:func:`start_shards`: ``run_deployment``,
linked to the parent as a subflow) with the shard's vehicles; whichever workers of the deployment's pool are
free run them, all writing to the same table (the store's exactly-once commits make that safe). The parent
polls their states (:func:`wait_shards`), and:

- a shard that ends **Crashed** (its worker died: Prefect's heartbeat automation marks it, see
  ``pipelines.deploy``) is set back to Scheduled, up to ``max_attempts`` times, so another worker runs it
  again; its vehicles resume from their watermarks, so the table ends as a clean run would;
- a shard that **fails** is reported, the others still finish; the parent then fails naming those shards.

Each child's flow run has the idempotency key ``<parent run id>:shard-<i>-of-<N>``: when the parent run is
retried, the shards that completed are found by their keys and not run again, and the failed ones are
rescheduled, so a retry redoes only them. A child reports its numbers in a table artifact
(:data:`RESULT_ARTIFACT`): workers share no disk, the Prefect server is what they share.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

from depin_core.errors import PermanentError

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

RESULT_ARTIFACT = "ingest-result"
FINAL_OK = "COMPLETED"
RERUN_STATES = frozenset({"CRASHED"})  # infrastructure lost: run again elsewhere
FAILED_STATES = frozenset({"FAILED", "CANCELLED", "CRASHED"})
FINAL_STATES = frozenset({FINAL_OK, *FAILED_STATES})


class ShardsFailed(PermanentError):
    """Some shards of a sharded ingest did not complete; retrying the parent run redoes only those."""

    def __init__(self, failed: Sequence[ShardRun]) -> None:
        names = ", ".join(f"{s.index} ({s.flow_run_name}: {s.state.title()})" for s in failed)
        super().__init__(
            f"shards: {len(failed)} shard(s) did not complete: {names}; see their runs' logs, then retry this "
            "flow run (the shards that completed are not run again)"
        )
        self.failed = list(failed)


def shard_of(token_id: int, shards: int) -> int:
    """The shard of a vehicle: sha256 of its decimal token id, modulo ``shards`` (the same on every host)."""
    digest = hashlib.sha256(str(int(token_id)).encode()).digest()
    return int.from_bytes(digest[:8], "big") % shards


def split(token_ids: Sequence[int], shards: int) -> list[list[int]]:
    """``token_ids`` in ``shards`` lists by :func:`shard_of`, each sorted (some may be empty)."""
    out: list[list[int]] = [[] for _ in range(shards)]
    for t in sorted(token_ids):
        out[shard_of(t, shards)].append(t)
    return out


@dataclass
class ShardRun:
    """One shard's child flow run, as the parent last saw it."""

    index: int
    vehicles: list[int]
    flow_run_id: UUID
    flow_run_name: str
    state: str = "SCHEDULED"
    message: str = ""
    reruns: int = 0
    result: dict[str, Any] = field(default_factory=dict)
    in_parent: bool = False  # ingested by the parent run itself, not a child run

    @property
    def ok(self) -> bool:
        return self.state == FINAL_OK

    def row(self) -> dict[str, Any]:
        """A line of the parent's ``ingest-shards`` table artifact."""
        return {
            "shard": self.index,
            "vehicles": len(self.vehicles),
            "flow_run": f"{self.flow_run_name} (the parent)" if self.in_parent else self.flow_run_name,
            "state": self.state.title(),
            "reruns": self.reruns,
            "new_rows": self.result.get("new_rows"),
            "requests": self.result.get("requests"),
            "seconds": self.result.get("seconds"),
            "message": self.message[:200],
        }


def idempotency_key(parent: UUID | str, index: int, shards: int) -> str:
    return f"{parent}:shard-{index}-of-{shards}"


def start_shards(
    deployment: str,
    parent: UUID | str,
    parts: Sequence[Sequence[int]],
    make_params: Callable[[int, list[int]], dict[str, Any]],
) -> list[ShardRun]:
    """Create (or find, by idempotency key) the child run of every non-empty shard; reschedule the ones a
    previous attempt of the parent left failed or crashed. Returns at once."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Scheduled

    runs = []
    with get_client(sync_client=True) as client:
        for i, ids in enumerate(parts):
            if not ids:
                continue
            # called from sync code: the FlowRun (Prefect types it as that | a coroutine)
            fr = cast(
                "FlowRun",
                run_deployment(
                    deployment,
                    parameters=make_params(i, list(ids)),
                    idempotency_key=idempotency_key(parent, i, len(parts)),
                    flow_run_name=f"shard-{i}-of-{len(parts)}",
                    timeout=0,
                    tags=["depin-shard"],
                ),
            )
            run = ShardRun(i, list(ids), fr.id, fr.name)
            if _state_of(fr) in FAILED_STATES:  # a retried parent: this shard failed last time
                client.set_flow_run_state(fr.id, Scheduled(), force=True)
                run.reruns += 1
            runs.append(run)
    return runs


def wait_shards(
    runs: list[ShardRun],
    *,
    max_reruns: int = 2,
    poll_s: float = 1.0,
    on_change: Callable[[ShardRun], None] | None = None,
) -> list[ShardRun]:
    """Poll the shards' states until each is final; a Crashed one is rescheduled (at most ``max_reruns``
    times). Fills each shard's ``result`` from its :data:`RESULT_ARTIFACT`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import Scheduled

    pending = {r.flow_run_id: r for r in runs}
    with get_client(sync_client=True) as client:
        while pending:
            seen = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(pending))), limit=len(pending)
            )
            for fr in seen:
                run = pending[fr.id]
                state = _state_of(fr)
                changed = state != run.state
                run.state, run.message = state, (fr.state.message or "") if fr.state else ""
                if state in RERUN_STATES and run.reruns < max_reruns:
                    client.set_flow_run_state(
                        fr.id, Scheduled(message=f"rerun after {state.lower()}"), force=True
                    )
                    run.reruns += 1
                    run.state = "SCHEDULED"
                elif state in FINAL_STATES:
                    del pending[fr.id]
                    if state == FINAL_OK:
                        run.result = _shard_result(client, fr.id)
                if changed and on_change is not None:
                    on_change(run)
            if pending:
                time.sleep(poll_s)
    return runs


def _state_of(fr: FlowRun) -> str:
    return fr.state.type.value if fr.state else "SCHEDULED"


def _shard_result(client: Any, flow_run_id: UUID) -> dict[str, Any]:
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    arts = client.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[RESULT_ARTIFACT])),
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
    )
    if not arts:
        return {}
    data = arts[-1].data
    rows = json.loads(data) if isinstance(data, str) else data
    return dict(rows[0]) if rows else {}


__all__ = [
    "FINAL_STATES",
    "RESULT_ARTIFACT",
    "ShardRun",
    "ShardsFailed",
    "idempotency_key",
    "shard_of",
    "split",
    "start_shards",
    "wait_shards",
]
