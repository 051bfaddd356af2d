"""``LocalRunner``: each job runs in its own ``python -m gpu_jobs.worker`` subprocess on this machine.

The worker picks CUDA when available, else CPU. A subprocess keeps a crash, an OOM kill or a hung CUDA kernel
away from the caller. The runner enforces ``limits.max_wall_s`` per attempt (SIGTERM, then SIGKILL after a grace
period → FAILED(infra) "timed out after N s"), cancels the same way (→ CANCELLED), and turns a worker that dies
without a result (killed by a signal, e.g. the OOM killer) into FAILED(infra). Such abrupt deaths are retried up to
``max_attempts`` times in the same job directory, so the new attempt resumes from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from depin_core.errors import ConfigError
from depin_core.fs import atomic_write_bytes
from gpu_jobs.errors import JobNotFinished, JobNotFound
from gpu_jobs.runner import (
    CHECKPOINTS,
    LOG,
    RESULT,
    SPEC,
    STATUS,
    JobStatus,
    now,
    read_attempts,
    write_attempts,
)
from gpu_jobs.spec import AttemptRecord, FailureKind, JobResult, JobSpec, JobState

_JOB_ID = re.compile(r"^[0-9a-f]{12}-[0-9a-f]{8}$")
_LOG_CHUNK = 1 << 20
_CKPT_FILE = re.compile(r"^ckpt-\d{9}\.(json|safetensors)$")


@dataclass
class _Job:
    job_id: str
    dir: Path
    spec: JobSpec
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    result: JobResult | None = None
    thread: threading.Thread | None = None


class LocalRunner:
    """A ``JobRunner`` that runs jobs as subprocesses under ``workdir_root/<job_id>/``."""

    name = "local"

    def __init__(
        self,
        workdir_root: Path | str,
        *,
        max_parallel: int = 1,
        max_attempts: int = 1,
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
        kill_grace_s: float = 5.0,
        poll_s: float = 0.05,
    ) -> None:
        if max_parallel < 1 or max_attempts < 1:
            raise ConfigError("LocalRunner: max_parallel and max_attempts must be ≥ 1")
        self.root = Path(workdir_root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_attempts = max_attempts
        self.env = dict(env or {})
        self.python = python
        self.kill_grace_s = kill_grace_s
        self.poll_s = poll_s
        self._slots = threading.Semaphore(max_parallel)
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()

    # --- JobRunner -------------------------------------------------------------------------------------------
    def submit(self, spec: JobSpec, *, job_id: str | None = None) -> str:
        """Create the job directory, write ``spec.json`` and start the job (queued while all slots are busy).

        ``job_id``: a caller-chosen id (``<12 hex>-<8 hex>``, e.g. ``f"{spec.spec_hash[:12]}-{token_hex(4)}"``);
        submitting an id that already exists under the root returns it unchanged when its spec_hash is the same
        (idempotent) and raises ``ConfigError`` when it differs. ``spec.checkpoint.resume_from`` files are
        copied into ``<job_dir>/checkpoints`` first, so the worker resumes from them.
        """
        if job_id is None:
            job_id = f"{spec.spec_hash[:12]}-{secrets.token_hex(4)}"
        elif not _JOB_ID.match(job_id):
            raise ConfigError(
                f"job_id {job_id!r} is malformed; use 12 + 8 lowercase hex digits, "
                "e.g. f'{spec.spec_hash[:12]}-{secrets.token_hex(4)}'"
            )
        job_dir = self.root / job_id
        with self._lock:
            existing = _read_spec(job_dir)
            if existing is not None:
                if existing.spec_hash != spec.spec_hash:
                    raise ConfigError(
                        f"job_id {job_id} already exists with another spec (spec_hash "
                        f"{existing.spec_hash[:16]}…, this one {spec.spec_hash[:16]}…); use a new job id"
                    )
                return job_id
            resume = spec.checkpoint.resume_from
            if resume is not None and not Path(resume).is_dir():
                raise ConfigError(
                    f"checkpoint.resume_from {resume}: no such directory; pass the checkpoint directory of an "
                    "earlier attempt (runner.checkpoint_dir(job_id)) or leave it unset"
                )
            job_dir.mkdir(parents=True, exist_ok=True)  # left without spec.json by a crash: start over
            if resume is not None:
                _copy_checkpoints(Path(resume), job_dir / CHECKPOINTS)
            # spec.json last: it marks the job directory complete
            self._write_status(job_dir, JobStatus(job_id=job_id, state=JobState.PENDING, heartbeat=now()))
            atomic_write_bytes(job_dir / SPEC, spec.model_dump_json(indent=2).encode())
            job = _Job(job_id, job_dir, spec)
            job.thread = threading.Thread(target=self._run, args=(job,), name=f"job-{job_id}", daemon=True)
            self._jobs[job_id] = job
        job.thread.start()
        return job_id

    def checkpoint_dir(self, job_id: str) -> Path | None:
        """The job's checkpoint directory (its newest checkpoint files), or None when it has none yet."""
        path = self._dir(job_id) / CHECKPOINTS
        return path if path.is_dir() else None

    def status(self, job_id: str) -> JobStatus:
        job_dir = self._dir(job_id)
        job = self._jobs.get(job_id)
        result = job.result if job else self._read_result(job_dir)
        st = self._read_status(job_dir) or JobStatus(job_id=job_id, state=JobState.PENDING)
        if result is not None:  # the runner's verdict wins over what a killed worker last wrote
            st = st.model_copy(update={"state": result.state, "message": _message(result)})
        return st

    def logs(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        job_dir = self._dir(job_id)
        try:
            with open(job_dir / LOG, "rb") as fh:
                fh.seek(offset)
                data = fh.read(_LOG_CHUNK)
        except FileNotFoundError:
            return "", offset
        job = self._jobs.get(job_id)
        running = job is not None and not job.done.is_set()
        if running and len(data) and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1  # whole lines only while the worker may still be writing
            data = data[:cut]
        return data.decode("utf-8", errors="replace"), offset + len(data)

    def result(self, job_id: str, timeout: float | None = None) -> JobResult:
        job_dir = self._dir(job_id)
        job = self._jobs.get(job_id)
        if job is None:
            done = self._read_result(job_dir)
            if done is None:
                raise JobNotFound(f"job {job_id} has no result and is not running under this runner")
            return done
        if not job.done.wait(timeout):
            raise JobNotFinished(
                f"job {job_id} still {self.status(job_id).state} after {timeout} s; ask again later"
            )
        assert job.result is not None
        return job.result

    def cancel(self, job_id: str) -> None:
        self._dir(job_id)
        job = self._jobs.get(job_id)
        if job is not None:
            job.cancel.set()

    def active_jobs(self) -> int:
        """Jobs submitted to this runner that have not finished (running or waiting for a slot)."""
        with self._lock:
            return sum(1 for job in self._jobs.values() if not job.done.is_set())

    # --- lifecycle -------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Cancel every unfinished job and wait for its worker to exit."""
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel.set()
        for job in jobs:
            if job.thread is not None:
                job.thread.join()

    def __enter__(self) -> LocalRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------------------------
    def _dir(self, job_id: str) -> Path:
        if not _JOB_ID.match(job_id) or not (self.root / job_id).is_dir():
            raise JobNotFound(f"no job {job_id!r} under {self.root}; use an id returned by submit()")
        return self.root / job_id

    @staticmethod
    def _read_result(job_dir: Path) -> JobResult | None:
        try:
            return JobResult.model_validate_json((job_dir / RESULT).read_bytes())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _read_status(job_dir: Path) -> JobStatus | None:
        try:
            return JobStatus.model_validate_json((job_dir / STATUS).read_bytes())
        except (OSError, ValueError):  # not written yet
            return None

    @staticmethod
    def _write_status(job_dir: Path, status: JobStatus) -> None:
        atomic_write_bytes(job_dir / STATUS, status.model_dump_json().encode())

    def _run(self, job: _Job) -> None:
        attempts: list[AttemptRecord] = []
        result: JobResult | None = None
        try:
            if self._acquire_slot(job):
                try:
                    for attempt in range(1, self.max_attempts + 1):
                        if job.cancel.is_set():
                            break
                        result, retryable = self._attempt(job, attempt)
                        attempts = result.attempts
                        if not (retryable and attempt < self.max_attempts):
                            break
                        write_attempts(job.dir, attempts)
                finally:
                    self._slots.release()
        except Exception as e:
            # the runner itself failed (spawn error, disk full): report, never hang result()
            result = _failed(job, attempts, FailureKind.INFRA, f"local runner error: {type(e).__name__}: {e}")
        if result is None:  # cancelled before the first attempt started
            result = JobResult(
                job_id=job.job_id,
                spec_hash=job.spec.spec_hash,
                state=JobState.CANCELLED,
                error="cancelled before start",
            )
        job.result = result
        try:
            atomic_write_bytes(job.dir / RESULT, result.model_dump_json(indent=2).encode())
            # keep the worker's last progress, set the runner's verdict
            st = self._read_status(job.dir) or JobStatus(job_id=job.job_id, state=result.state)
            update = {
                "state": result.state,
                "attempt": len(result.attempts),
                "heartbeat": now(),
                "message": _message(result),
            }
            self._write_status(job.dir, st.model_copy(update=update))
        finally:
            job.done.set()

    def _acquire_slot(self, job: _Job) -> bool:
        """Wait for a free slot (the job stays PENDING); False when the job is cancelled meanwhile."""
        while not self._slots.acquire(timeout=0.2):
            if job.cancel.is_set():
                return False
        return True

    def _attempt(self, job: _Job, attempt: int) -> tuple[JobResult, bool]:
        """Run one worker process to its end; return its result and whether a retry may help."""
        (job.dir / RESULT).unlink(missing_ok=True)
        started = now()
        cmd = [self.python, "-m", "gpu_jobs.worker", "--job-dir", str(job.dir), "--attempt", str(attempt)]
        env = {**os.environ, **self.env}
        with open(job.dir / LOG, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + job.spec.limits.max_wall_s
        cancelled = timed_out = False
        while proc.poll() is None:
            if job.cancel.wait(self.poll_s):
                cancelled = True
            elif time.monotonic() > deadline:
                timed_out = True
            if cancelled or timed_out:
                self._terminate(proc)
        rc = proc.returncode
        worker = self._read_result(job.dir)
        if worker is not None and (not worker.attempts or worker.attempts[-1].attempt != attempt):
            worker = None
        retryable = False
        if worker is not None and worker.state == JobState.SUCCEEDED:
            return worker, False  # it finished just as the cancel/timeout arrived
        if cancelled:
            state, failure, reason = JobState.CANCELLED, None, "cancelled by the caller"
        elif timed_out:
            state, failure = JobState.FAILED, FailureKind.INFRA
            reason = (
                f"timed out after {job.spec.limits.max_wall_s:g} s (limits.max_wall_s); the worker was killed"
            )
        elif worker is not None:
            return worker, False
        elif rc < 0:
            sig = signal.Signals(-rc).name
            hint = " (out of memory?)" if -rc == signal.SIGKILL else ""
            state, failure, reason = JobState.FAILED, FailureKind.INFRA, f"worker killed by {sig}{hint}"
            retryable = True
        else:
            state, failure = JobState.FAILED, FailureKind.INFRA
            reason = f"worker exited with code {rc} without a result; see the job log"
            retryable = True
        prior = worker.attempts[:-1] if worker else read_attempts(job.dir)
        last = worker.attempts[-1] if worker else None
        record = AttemptRecord(
            attempt=attempt,
            runner=self.name,
            node=last.node if last else socket.gethostname(),
            started=last.started if last else started,
            ended=now(),
            state=state,
            failure=failure,
            reason=reason,
            device=last.device if last else None,
        )
        base = worker or JobResult(job_id=job.job_id, spec_hash=job.spec.spec_hash, state=state)
        result = base.model_copy(
            update={
                "state": state,
                "failure": failure,
                "artifacts": {},
                "attempts": [*prior, record],
                "error": reason,
            }
        )
        return result, retryable

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM the worker's process group, SIGKILL it after the grace period."""
        for sig, wait in ((signal.SIGTERM, self.kill_grace_s), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def _read_spec(job_dir: Path) -> JobSpec | None:
    try:
        return JobSpec.model_validate_json((job_dir / SPEC).read_bytes())
    except FileNotFoundError:
        return None


def _copy_checkpoints(src: Path, dest: Path) -> None:
    """Copy the checkpoint files (``ckpt-*.json`` / ``ckpt-*.safetensors``) of ``src`` into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if _CKPT_FILE.match(f.name) and f.is_file():
            tmp = dest / f".{f.name}.tmp"
            shutil.copyfile(f, tmp)
            os.replace(tmp, dest / f.name)


def _message(result: JobResult) -> str | None:
    """The tail of the failure message, for ``JobStatus.message``."""
    return result.error and result.error[-500:]


def _failed(job: _Job, attempts: list[AttemptRecord], kind: FailureKind, message: str) -> JobResult:
    return JobResult(
        job_id=job.job_id,
        spec_hash=job.spec.spec_hash,
        state=JobState.FAILED,
        failure=kind,
        attempts=attempts,
        error=message,
    )
