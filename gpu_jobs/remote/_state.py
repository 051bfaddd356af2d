"""The runner's per-job record and its workdir layout (``<job_id>/spec.json``, ``checkpoints/``,
``result.json``)."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from gpu_jobs.runner import JobStatus, now
from gpu_jobs.spec import JobResult, JobSpec, JobState

ACTIVE = frozenset({JobState.STAGING, JobState.RUNNING, JobState.UPLOADING})
_JOB_ID = re.compile(r"^[0-9a-f]{12}-[0-9a-f]{8}$")
_CKPT_FILE = re.compile(r"^ckpt-(\d{9})\.(json|safetensors)$")
_SPEC, _RESULT, _CHECKPOINTS = "spec.json", "result.json", "checkpoints"


def _safe_relpath(rel: str) -> PurePosixPath | None:
    """``rel`` as a relative POSIX path that stays inside its directory, else None."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or any(part in ("..", "") for part in p.parts) or "\\" in rel:
        return None
    return p


@dataclass
class _Job:
    job_id: str
    spec: JobSpec | None
    attempt: int
    started: datetime = field(default_factory=now)
    lock: threading.RLock = field(default_factory=threading.RLock)
    status: JobStatus | None = None
    last_contact: float = field(default_factory=time.monotonic)
    beat: datetime | None = None
    beat_seen: float = field(default_factory=time.monotonic)
    lost: str | None = None
    ckpt_step: int | None = None
    log_offset: int = 0
    result: JobResult | None = None
    submitted: bool = False  # created by this runner's submit (so a 404 means the node lost it)
    refreshed: float = 0.0  # monotonic time of the last status fetch
    ckpt_listing: Any = None  # the agent's last {"step", "files"} answer
    mirror_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def active(self) -> bool:
        return self.result is None and self.lost is None and not (self.status and self.status.state.terminal)


def _newest_step(d: Path) -> int | None:
    """The newest step with a JSON marker in checkpoint directory ``d`` (None when there is none)."""
    if not d.is_dir():
        return None
    steps = [int(m.group(1)) for p in d.iterdir() if (m := _CKPT_FILE.match(p.name)) and m.group(2) == "json"]
    return max(steps, default=None)
