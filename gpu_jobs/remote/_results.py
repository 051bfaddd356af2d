"""A finished job's result: its outputs downloaded into ``spec.outputs.dir`` and checked (size, sha256,
manifest) before they are moved into place; FAILED(verify) or FAILED(infra) otherwise."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from urllib.parse import quote

from depin_core.errors import TransientError
from gpu_jobs.errors import AgentAuthError, AgentRefused, JobNotFound
from gpu_jobs.remote._client import AgentClient, _error_of, _Mismatch, log
from gpu_jobs.remote._state import _Job, _safe_relpath
from gpu_jobs.runner import now
from gpu_jobs.spec import AttemptRecord, FailureKind, JobResult, JobState


class _Results(AgentClient):
    """Bringing a finished job's result home: download, check against the agent's manifest, move into place."""

    # --- results ---------------------------------------------------------------------------------------------
    def _record(
        self, job: _Job, state: JobState, failure: FailureKind | None, reason: str | None
    ) -> AttemptRecord:
        return AttemptRecord(
            attempt=job.attempt,
            runner=self.name,
            node=self.node or self.url,
            started=job.started,
            ended=now(),
            state=state,
            failure=failure,
            reason=reason,
        )

    def _lost_result(self, job: _Job, reason: str) -> JobResult:
        st = job.status
        return JobResult(
            job_id=job.job_id,
            spec_hash=job.spec.spec_hash if job.spec else "",
            state=JobState.FAILED,
            failure=FailureKind.INFRA,
            metrics=dict(st.metrics) if st else {},
            attempts=[self._record(job, JobState.FAILED, FailureKind.INFRA, reason[:500])],
            error=reason,
        )

    def _fetch_result(self, job: _Job) -> JobResult:
        if job.spec is None:
            raise JobNotFound(
                f"job {job.job_id}: no spec under {self.root / job.job_id}; fetch the result with the runner "
                "(workdir_root) that submitted it"
            )
        try:
            deadline = time.monotonic() + self.retry_budget_s
            # the agent may report the worker's terminal state a moment before its runner has the result (409)
            while (
                r := self._request("GET", f"/v1/jobs/{job.job_id}/result", ok=(200, 409), job_id=job.job_id)
            ).status_code == 409:
                if time.monotonic() > deadline:
                    raise TransientError(
                        f"the agent still has no result for job {job.job_id}: {_error_of(r)[0]}"
                    )
                time.sleep(self.poll_s)
            body = r.json()
            res = JobResult.model_validate(body["result"])
            manifest = {str(f["path"]): (str(f["sha256"]), f.get("size")) for f in body.get("files") or []}
        except TransientError as exc:
            return self._lost_result(job, f"agent unreachable while fetching the result: {exc}")
        except (KeyError, TypeError, ValueError) as exc:
            return self._verify_failed(job, None, f"the agent's result answer is malformed ({exc})")
        attempts = list(res.attempts)
        if attempts:
            attempts[-1] = attempts[-1].model_copy(
                update={"runner": self.name, "node": self.node or attempts[-1].node}
            )
        res = res.model_copy(update={"job_id": job.job_id, "attempts": attempts})
        if res.state != JobState.SUCCEEDED:
            return res.model_copy(update={"artifacts": {}})
        if res.spec_hash != job.spec.spec_hash:
            return self._verify_failed(
                job, res, f"the agent reports spec_hash {res.spec_hash}, the job's is {job.spec.spec_hash}"
            )
        problems = [
            f"{p!r} is not a relative path inside the output dir" for p in manifest if not _safe_relpath(p)
        ]
        problems += [
            f"artifact {rel}: sha256 {sha} is not in the agent's manifest (manifest: "
            f"{manifest.get(rel, ('absent',))[0]})"
            for rel, sha in res.artifacts.items()
            if manifest.get(rel, (None,))[0] != sha
        ]
        if problems:
            return self._verify_failed(job, res, "; ".join(problems[:5]))
        out = Path(job.spec.outputs.dir).resolve()
        staging = out / f".incoming-{job.job_id}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            for rel, (sha, size) in manifest.items():
                dest = staging / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                self._download(f"/v1/jobs/{job.job_id}/artifacts/{quote(rel)}", dest, sha, size, job.job_id)
            for rel in manifest:  # all verified: move them into place
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / rel, out / rel)
        except _Mismatch as exc:
            return self._verify_failed(
                job, res, f"downloaded artifact does not match the agent's manifest: {exc}"
            )
        except AgentAuthError:
            raise
        except AgentRefused as exc:  # a file it listed but will not serve
            return self._verify_failed(job, res, f"the agent did not serve a listed artifact: {exc}")
        except TransientError as exc:
            return self._lost_result(job, f"agent unreachable while downloading the artifacts: {exc}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        artifacts = {str((out / rel).resolve()): sha for rel, sha in res.artifacts.items()}
        return res.model_copy(update={"artifacts": artifacts})

    def _verify_failed(self, job: _Job, res: JobResult | None, problem: str) -> JobResult:
        reason = (
            f"verification failed on {self.node or self.url}: {problem}; the node's outputs were discarded"
        )
        log.warning("%s: job %s: %s", self.name, job.job_id, reason)
        assert job.spec is not None
        base = res or JobResult(job_id=job.job_id, spec_hash=job.spec.spec_hash, state=JobState.FAILED)
        prior = base.attempts[:-1] if base.attempts else []
        record = self._record(job, JobState.FAILED, FailureKind.VERIFY, reason[:500])
        if base.attempts:
            record = base.attempts[-1].model_copy(
                update={"state": JobState.FAILED, "failure": FailureKind.VERIFY, "reason": reason[:500]}
            )
        return base.model_copy(
            update={
                "state": JobState.FAILED,
                "failure": FailureKind.VERIFY,
                "artifacts": {},
                "attempts": [*prior, record],
                "error": reason,
            }
        )
