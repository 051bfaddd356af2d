"""The job worker process: ``python -m gpu_jobs.worker --job-dir DIR [--attempt N]``.

Job directory layout (shared with the runners):

- ``spec.json``      the ``JobSpec`` (written by the runner)
- ``status.json``    the live ``JobStatus`` (atomic rewrites: on state changes, at most every 0.2 s of progress,
  and a heartbeat every 0.5 s)
- ``log.txt``        everything the worker prints (stdout and stderr are redirected here, append-only)
- ``attempts.json``  earlier attempts' ``AttemptRecord``s (kept by the runner across retries)
- ``result.json``    the ``JobResult`` (the worker writes it; the runner may rewrite it after a kill/timeout)
- ``checkpoints/``   ``FileCheckpointer`` files; a restarted worker resumes from the newest one
- ``work/``          scratch space for the family (``ctx.workdir``)

Steps: STAGING (verify input sha256s, pick the device, seed, load the family) → RUNNING (``family.train`` /
``family.infer``) → UPLOADING (write and re-verify the model artifact) → SUCCEEDED. Failures: ``JobError`` keeps
its kind; an exception in family code is FAILED(user) with the traceback; out-of-memory and machinery errors
are FAILED(infra); SIGTERM ends the job CANCELLED. The worker also stops itself (CANCELLED) when its parent
process dies, e.g. a worker agent that was SIGKILLed: FAILED(infra) (see :func:`watch_parent`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from depin_core.fs import atomic_write_bytes
from gpu_jobs.artifacts import MANIFEST, load_artifact, write_artifact
from gpu_jobs.checkpoint import FileCheckpointer
from gpu_jobs.context import InferOutput, JobContext, TrainOutput
from gpu_jobs.device import select_device
from gpu_jobs.errors import ArtifactIntegrityError, FailureKind, JobError
from gpu_jobs.registry import load_family
from gpu_jobs.runner import CHECKPOINTS, LOG, RESULT, SPEC, STATUS, WORK, JobStatus, now, read_attempts
from gpu_jobs.spec import (
    AttemptRecord,
    DeviceInfo,
    JobKind,
    JobResult,
    JobSpec,
    JobState,
    sha256_file,
)

HEARTBEAT_S = 0.5
PROGRESS_WRITE_S = 0.2
PROGRESS_LOG_S = 1.0
EXIT_CODES = {JobState.SUCCEEDED: 0, JobState.FAILED: 1, JobState.CANCELLED: 3}


class JobCancelled(BaseException):
    """Raised in the main thread on SIGTERM; a BaseException so family ``except Exception`` cannot swallow it."""


_orphaned = threading.Event()  # set by watch_parent: the SIGTERM it sends means "runner gone", not "cancel"


class StatusFile:
    """The worker's ``status.json``: atomic rewrites, throttled for progress, plus a heartbeat thread."""

    def __init__(self, path: Path, status: JobStatus) -> None:
        self.path = path
        self.status = status
        self._lock = threading.Lock()
        self._last_write = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self.write()
        self._thread.start()

    def update(self, *, force: bool = False, **fields: Any) -> None:
        with self._lock:
            self.status = self.status.model_copy(update=fields)
            due = force or time.monotonic() - self._last_write >= PROGRESS_WRITE_S
        if due:
            self.write()

    def write(self) -> None:
        with self._lock:
            self.status = self.status.model_copy(update={"heartbeat": now()})
            data = self.status.model_dump_json().encode()
            atomic_write_bytes(self.path, data)
            self._last_write = time.monotonic()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.write()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.write()


class _WorkerContext(JobContext):
    cancel_requested: bool = False

    def cancelled(self) -> bool:
        return self.cancel_requested


def log(message: str) -> None:
    """One timestamped line on stdout (the job log)."""
    sys.stdout.write(f"{now().strftime('%Y-%m-%dT%H:%M:%S.%fZ')[:-4]}Z {message}\n")
    sys.stdout.flush()


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor | np.generic):
        return v.item()
    if isinstance(v, bool | int | float | str) or v is None:
        return v
    return str(v)


def _make_report(status: StatusFile) -> Callable[..., None]:
    last_log = [0.0]

    def report(step: int, total: int | None = None, **metrics: Any) -> None:
        clean = {k: _jsonable(v) for k, v in metrics.items()}
        status.update(step=int(step), total=total, metrics=clean, force=total is not None and step >= total)
        t = time.monotonic()
        if t - last_log[0] >= PROGRESS_LOG_S or (total is not None and step >= total):
            last_log[0] = t
            shown = " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in clean.items())
            log(f"step {step}/{total if total is not None else '?'} {shown}".rstrip())

    return report


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's global RNG and python ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _hash_output(path: Path) -> dict[str, str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p.resolve()): sha256_file(p) for p in files}


def run_job(job_dir: Path, attempt: int = 1, runner: str = "local") -> JobResult:
    """Run the job in ``job_dir`` in this process and write its ``result.json``; never raises for job failures."""
    t_start = time.monotonic()
    started = now()
    spec = JobSpec.model_validate_json((job_dir / SPEC).read_bytes())
    job_id = job_dir.name
    status = StatusFile(
        job_dir / STATUS,
        JobStatus(job_id=job_id, state=JobState.STAGING, attempt=attempt, worker_pid=os.getpid()),
    )
    log(f"job {job_id} attempt {attempt}: {spec.kind} {spec.model.family} spec_hash={spec.spec_hash[:16]}")
    timings: dict[str, float] = {}
    device: DeviceInfo | None = None
    metrics: dict[str, Any] = {}
    artifacts: dict[str, str] = {}
    state, failure, error = JobState.SUCCEEDED, None, None
    phase, t_phase = "staging", time.monotonic()
    ctx: _WorkerContext | None = None

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if ctx is not None:
            ctx.cancel_requested = True
        raise JobCancelled

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        verified = [(ref, ref.verify()) for ref in spec.inputs]
        choice = select_device(spec.resources)
        device = choice.info
        log(
            f"device {device.label} ({device.name}), torch {device.torch_version}, {device.threads} CPU thread(s)"
        )
        seed_everything(spec.seed)
        family = load_family(spec.model.family)
        out_dir = Path(spec.outputs.dir)
        ckpt = FileCheckpointer(
            job_dir / CHECKPOINTS,
            spec.checkpoint.every_steps,
            spec.checkpoint.keep_last,
            on_save=lambda step: status.update(checkpoint_step=step, force=True),
        )
        (job_dir / WORK).mkdir(exist_ok=True)
        ctx = _WorkerContext(
            spec=spec,
            workdir=job_dir / WORK,
            device=choice.device,
            checkpointer=ckpt,
            log=log,
            report=_make_report(status),
            autocast=choice.autocast,
            inputs=[f for ref, fs in verified if ref.role != "model" for f in fs],
        )
        timings["staging_s"] = time.monotonic() - t_phase

        phase, t_phase = "running", time.monotonic()
        status.update(state=JobState.RUNNING, force=True)
        if spec.kind == JobKind.TRAIN:
            trained: TrainOutput = family.train(ctx)
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            scored: InferOutput = family.infer(ctx, Path(spec.inputs_with_role("model")[0].path))
        timings["running_s"] = time.monotonic() - t_phase

        phase, t_phase = "uploading", time.monotonic()
        status.update(state=JobState.UPLOADING, force=True)
        if spec.kind == JobKind.TRAIN:
            metrics = dict(trained.metrics)
            timings_so_far = {**timings, "total_s": time.monotonic() - t_start}
            artifacts = write_artifact(
                out_dir,
                state_dict=trained.state_dict,
                model_config=trained.model_config,
                metrics=metrics,
                spec=spec,
                device=device,
                timings=timings_so_far,
                files=getattr(trained, "files", None) or None,
            )
            manifest_sha = artifacts[str(out_dir.resolve() / MANIFEST)]
            try:
                load_artifact(out_dir, expected_manifest_sha256=manifest_sha)
            except ArtifactIntegrityError as e:
                raise JobError(f"the written artifact does not verify: {e}", FailureKind.VERIFY) from e
        else:
            metrics = {**scored.metrics, "rows": scored.rows}
            artifacts = _hash_output(Path(scored.output))
        timings["uploading_s"] = time.monotonic() - t_phase
        log(f"{spec.kind} done: {json.dumps(metrics, default=str)[:2000]}")
    except JobCancelled:
        if _orphaned.is_set():
            state, failure = JobState.FAILED, FailureKind.INFRA
            error = "the process that ran the worker (runner or agent) died; the job was stopped"
            log(f"FAILED(infra) in {phase}: {error}")
        else:
            state, error = JobState.CANCELLED, "cancelled (SIGTERM)"
            log("cancelled")
    except JobError as e:
        state, failure, error = JobState.FAILED, e.kind, str(e)
        log(f"FAILED({e.kind}) in {phase}: {e}")
    except (torch.OutOfMemoryError, MemoryError):
        state, failure, error = JobState.FAILED, FailureKind.INFRA, traceback.format_exc()
        log(f"FAILED(infra) in {phase}: out of memory\n{error}")
    except Exception:
        # the family's code runs in the "running" phase: its exceptions are the user's to fix
        kind = FailureKind.USER if phase == "running" else FailureKind.INFRA
        state, failure, error = JobState.FAILED, kind, traceback.format_exc()
        log(f"FAILED({kind}) in {phase}:\n{error}")
    finally:
        signal.signal(signal.SIGTERM, previous)
    timings["total_s"] = time.monotonic() - t_start
    record = AttemptRecord(
        attempt=attempt,
        runner=runner,
        node=socket.gethostname(),
        started=started,
        ended=now(),
        state=state,
        failure=failure,
        reason=None if error is None else error.strip().splitlines()[-1][:500],
        device=device,
    )
    result = JobResult(
        job_id=job_id,
        spec_hash=spec.spec_hash,
        state=state,
        failure=failure,
        artifacts=artifacts if state == JobState.SUCCEEDED else {},
        metrics=metrics,
        device=device,
        timings=timings,
        attempts=[*read_attempts(job_dir), record],
        error=error,
    )
    atomic_write_bytes(job_dir / RESULT, result.model_dump_json(indent=2).encode())
    status.update(state=state, message=record.reason)
    status.close()
    return result


def watch_parent(interval_s: float = HEARTBEAT_S, grace_s: float = 10.0) -> threading.Thread:
    """Stop this worker when the process that started it dies (e.g. a SIGKILLed worker agent), so no job keeps
    running unsupervised: once ``os.getppid()`` changes (the worker was re-parented), SIGTERM self (the job ends
    FAILED(infra)), and exit hard if that has not ended the process ``grace_s`` later (a hung kernel)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        log(f"the parent process {parent} is gone; stopping the job")
        _orphaned.set()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(EXIT_CODES[JobState.FAILED])

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    """Entry point: redirect stdout/stderr to the job log, run the job, exit 0/1/3 (succeeded/failed/cancelled)."""
    parser = argparse.ArgumentParser(prog="python -m gpu_jobs.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--job-dir", required=True, type=Path)
    parser.add_argument("--attempt", type=int, default=1)
    parser.add_argument("--runner", default="local")
    args = parser.parse_args(argv)
    job_dir: Path = args.job_dir.resolve()
    fd = os.open(job_dir / LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    watch_parent()
    result = run_job(job_dir, args.attempt, args.runner)
    return EXIT_CODES[result.state]


if __name__ == "__main__":
    sys.exit(main())
