"""The ``JobRunner`` seam and the status type runners share.

Every argument and return value is a JSON-able value (pydantic models, str, int), so a remote runner (an HTTP
agent on a GPU node) implements the same protocol by shipping them over the wire.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from depin_core.fs import atomic_write_bytes
from gpu_jobs.spec import AttemptRecord, JobResult, JobSpec, JobState

# The job directory layout shared by the local runner and the worker (see gpu_jobs.worker).
SPEC, STATUS, LOG, ATTEMPTS, RESULT = "spec.json", "status.json", "log.txt", "attempts.json", "result.json"
CHECKPOINTS, WORK = "checkpoints", "work"


def now() -> datetime:
    """The current time, UTC."""
    return datetime.now(UTC)


def read_attempts(job_dir: Path) -> list[AttemptRecord]:
    """Earlier attempts recorded in ``job_dir/attempts.json`` (empty when there were none)."""
    path = job_dir / ATTEMPTS
    if not path.is_file():
        return []
    return [AttemptRecord.model_validate(a) for a in json.loads(path.read_bytes())]


def write_attempts(job_dir: Path, attempts: list[AttemptRecord]) -> None:
    """Replace ``job_dir/attempts.json`` (atomically)."""
    data = json.dumps([a.model_dump(mode="json") for a in attempts], indent=2).encode()
    atomic_write_bytes(job_dir / ATTEMPTS, data)


class JobStatus(BaseModel):
    """A job's live state: what the worker last reported (progress, metrics) and when (heartbeat)."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    state: JobState
    attempt: int = 0
    step: int = 0
    total: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)  # the last ``ctx.report`` metrics (loss, epoch, …)
    checkpoint_step: int | None = None
    heartbeat: datetime | None = None
    message: str | None = None
    worker_pid: int | None = None  # meaningful only on the worker's host


@runtime_checkable
class JobRunner(Protocol):
    """Runs ``JobSpec``s somewhere and reports on them by job id."""

    name: str

    def submit(self, spec: JobSpec) -> str:
        """Queue the job and return its id at once."""
        ...

    def status(self, job_id: str) -> JobStatus:
        """The job's current state, progress and heartbeat."""
        ...

    def logs(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        """Log text from byte ``offset`` (whole lines while the job runs) and the offset to ask for next."""
        ...

    def result(self, job_id: str, timeout: float | None = None) -> JobResult:
        """Wait for a terminal state (raise ``JobNotFinished`` after ``timeout`` s) and return the result."""
        ...

    def cancel(self, job_id: str) -> None:
        """Stop the job; it ends CANCELLED (a no-op once it is terminal)."""
        ...
