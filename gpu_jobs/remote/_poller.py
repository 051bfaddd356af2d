"""Watching submitted jobs: a status poller that detects lost jobs (heartbeat), mirrors the newest checkpoint
pair and streams log lines."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from typing import Any

from depin_core.errors import PermanentError, TransientError
from gpu_jobs.errors import JobNotFound
from gpu_jobs.remote._client import AgentClient, _Mismatch, log
from gpu_jobs.remote._state import (
    _CHECKPOINTS,
    _CKPT_FILE,
    _JOB_ID,
    _RESULT,
    _SPEC,
    ACTIVE,
    _Job,
    _newest_step,
)
from gpu_jobs.runner import JobStatus
from gpu_jobs.spec import JobResult, JobSpec, JobState


class _Poller(AgentClient):
    """The runner's job records and the background poller: status, lost jobs, the checkpoint mirror and log
    lines."""

    _jobs: dict[str, _Job]
    _lock: threading.Lock
    _stop: threading.Event
    _poller: threading.Thread | None

    # --- jobs ------------------------------------------------------------------------------------------------
    def _job(self, job_id: str) -> _Job:
        """The job's record; an id this runner did not submit is attached (its spec read from the workdir)."""
        if not _JOB_ID.match(job_id):
            raise JobNotFound(
                f"no job {job_id!r}: ids look like '<12 hex>-<8 hex>'; use an id returned by submit()"
            )
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                spec = None
                with contextlib.suppress(OSError, ValueError):
                    spec = JobSpec.model_validate_json((self.root / job_id / _SPEC).read_bytes())
                job = _Job(job_id, spec, 1, ckpt_step=_newest_step(self.root / job_id / _CHECKPOINTS))
                with contextlib.suppress(OSError, ValueError):
                    job.result = JobResult.model_validate_json((self.root / job_id / _RESULT).read_bytes())
                self._jobs[job_id] = job
            return job

    def _view(self, job: _Job) -> JobStatus:
        st = job.status or JobStatus(job_id=job.job_id, state=JobState.PENDING)
        if job.lost:
            return st.model_copy(update={"state": JobState.FAILED, "message": job.lost})
        if job.result is not None and st.state != job.result.state:
            return st.model_copy(update={"state": job.result.state, "message": job.result.error})
        return st

    def _refresh(self, job: _Job, max_age: float = 0.0) -> JobStatus:
        """Fetch the job's status (unless fetched less than ``max_age`` s ago), detect a lost job, mirror a
        newer checkpoint."""
        st = self._fetch_status(job, max_age)
        self._mirror(job, blocking=False)  # outside the job lock: status() never waits for a download
        return st

    def _fetch_status(self, job: _Job, max_age: float) -> JobStatus:
        with job.lock:
            if not job.active or time.monotonic() - job.refreshed < max_age:
                return self._view(job)
            job.refreshed = time.monotonic()
            path = f"/v1/jobs/{job.job_id}"
            try:
                r = self._request("GET", path, budget_s=0, timeout=self._poll_timeout, job_id=job.job_id)
            except TransientError as exc:
                silent = time.monotonic() - job.last_contact
                if silent > self.heartbeat_timeout_s:
                    self._mark_lost(
                        job, f"heartbeat lost: agent {self.url} unreachable for {silent:.0f} s ({exc})"
                    )
                return self._view(job)
            except JobNotFound:
                if not job.submitted:
                    raise
                self._mark_lost(
                    job, f"heartbeat lost: the agent at {self.url} no longer knows job {job.job_id}"
                )
                return self._view(job)
            body = r.json()
            st = JobStatus.model_validate(body["status"])
            t = time.monotonic()
            job.last_contact = t
            job.status = st
            if st.heartbeat != job.beat:
                job.beat, job.beat_seen = st.heartbeat, t
            elif st.state in ACTIVE and t - job.beat_seen > self.heartbeat_timeout_s:
                self._mark_lost(
                    job,
                    f"heartbeat lost: job {job.job_id} on {self.url} is {st.state} but its heartbeat has not moved "
                    f"for {t - job.beat_seen:.0f} s (last {st.heartbeat})",
                )
                with contextlib.suppress(Exception):  # do not leave it running on a node we gave up on
                    self._request("POST", f"{path}/cancel", ok=(200, 202, 404), budget_s=0)
            job.ckpt_listing = body.get("checkpoint")
            return self._view(job)

    def _mark_lost(self, job: _Job, reason: str) -> None:
        job.lost = reason
        log.warning("%s: %s", self.name, reason)

    def _mirror(self, job: _Job, *, blocking: bool) -> None:
        """Copy the agent's newest checkpoint pair into the local mirror when it is newer than ours (one
        mirror at a time per job: without ``blocking`` a call returns at once while another one runs)."""
        if not job.mirror_lock.acquire(blocking=blocking):
            return
        try:
            self._mirror_locked(job, job.ckpt_listing)
        finally:
            job.mirror_lock.release()

    def _mirror_locked(self, job: _Job, ckpt: Any) -> None:
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("step"), int):
            return
        step = ckpt["step"]
        if job.ckpt_step is not None and step <= job.ckpt_step:
            return
        files = [f for f in ckpt.get("files") or [] if isinstance(f, dict)]
        names = [str(f.get("name")) for f in files]
        if (
            not files
            or not all(_CKPT_FILE.match(n) for n in names)
            or not any(n.endswith(".json") for n in names)
        ):
            log.warning(
                "%s: job %s: ignoring a malformed checkpoint listing %s", self.name, job.job_id, names
            )
            return
        dest = self.root / job.job_id / _CHECKPOINTS
        incoming = self.root / job.job_id / ".checkpoint-incoming"
        shutil.rmtree(incoming, ignore_errors=True)
        incoming.mkdir(parents=True)
        try:
            for f in files:
                self._download(
                    f"/v1/jobs/{job.job_id}/checkpoints/{f['name']}",
                    incoming / f["name"],
                    str(f["sha256"]),
                    f.get("size"),
                    job.job_id,
                    budget_s=min(self.retry_budget_s, self.heartbeat_timeout_s),
                )
        except (TransientError, PermanentError, _Mismatch, OSError) as exc:
            # rotated away meanwhile, a dying node or a bad copy: keep the previous mirror, try the next one
            log.info("%s: job %s: checkpoint %d not mirrored (%s)", self.name, job.job_id, step, exc)
            shutil.rmtree(incoming, ignore_errors=True)
            return
        dest.mkdir(parents=True, exist_ok=True)
        for name in sorted(names, key=lambda n: n.endswith(".json")):  # the JSON commit marker last
            os.replace(incoming / name, dest / name)
        for old in dest.iterdir():
            if (m := _CKPT_FILE.match(old.name)) and int(m.group(1)) != step:
                old.unlink(missing_ok=True)
        shutil.rmtree(incoming, ignore_errors=True)
        job.ckpt_step = step
        log.info("%s: job %s: mirrored checkpoint step %d", self.name, job.job_id, step)

    def _pump_logs(self, job: _Job) -> None:
        """Forward new log lines to ``on_log`` / this module's logger (only when someone listens)."""
        if self.on_log is None and not log.isEnabledFor(logging.INFO):
            return
        with job.lock:
            try:
                r = self._request(
                    "GET",
                    f"/v1/jobs/{job.job_id}/logs",
                    params={"offset": job.log_offset},
                    budget_s=0,
                    timeout=self._poll_timeout,
                    job_id=job.job_id,
                )
                body = r.json()
            except (TransientError, PermanentError):
                return
            job.log_offset = int(body["next_offset"])
            for line in str(body["text"]).splitlines():
                if self.on_log is not None:
                    self.on_log(line)
                else:
                    log.info("%s %s: %s", self.name, job.job_id, line)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                jobs = [j for j in self._jobs.values() if j.active and j.submitted]
            for job in jobs:
                try:
                    self._refresh(job, max_age=self.poll_s / 2)
                    self._pump_logs(job)
                except Exception as exc:  # never let the poller die; status()/result() surface errors
                    log.debug("%s: polling job %s failed: %s", self.name, job.job_id, exc)
