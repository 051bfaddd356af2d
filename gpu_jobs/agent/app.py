"""The worker agent's HTTP API (Starlette): blobs in, jobs run by ``LocalRunner``, results and checkpoints out.

Data directory layout:

- ``blobs/<sha256>`` content-addressed uploads (``blobs/.partial/`` while incomplete, see ``_blobs``)
- ``jobs/<job_id>/`` the ``LocalRunner`` job directories (spec, status, log, checkpoints, result)
- ``staging/<job_id>/inputs/<i>/…`` the job's inputs, hard links to (or copies of) the blobs;
  ``staging/<job_id>/resume/`` checkpoint files to resume from; ``staging/<job_id>/submit.json`` the request
- ``out/<job_id>/`` the job's output directory; ``manifests/<job_id>.json`` its file manifest (sha256, size)
- ``tokens.json`` job-token digests (mode 0600)

Errors have the gateway's shape, ``{"error": {"code", "message", "field"?}}`` (``gpu_jobs.errors.AgentHttpError``).
The spec's local paths (inputs, ``outputs.dir``, ``checkpoint.resume_from``) are rewritten to this disk; none of
them is part of ``spec_hash``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from depin_core.errors import ConfigError
from depin_core.fs import atomic_write_bytes
from gpu_jobs.agent._auth import Principal, TokenStore
from gpu_jobs.agent._blobs import SHA256_RE, BlobStore
from gpu_jobs.agent._health import NodeInfo
from gpu_jobs.errors import AgentHttpError, AgentTokenError, BlobError, JobNotFinished, JobNotFound
from gpu_jobs.local import LocalRunner
from gpu_jobs.runner import CHECKPOINTS, RESULT, SPEC, JobStatus, now
from gpu_jobs.spec import AttemptRecord, FailureKind, JobResult, JobSpec, JobState, sha256_file

log = logging.getLogger(__name__)

JOB_ID_RE = re.compile(r"^[0-9a-f]{12}-[0-9a-f]{8}$")
CKPT_NAME_RE = re.compile(r"^ckpt-(\d{9})\.(json|safetensors)$")
_JSON_BODY_LIMIT = 16 * 2**20
_MAX_TTL_S = 30 * 86400
_STREAM_CHUNK = 1 << 20
_VERDICT_WAIT_S = 10.0  # the runner records its verdict within moments of the worker's exit
_M = TypeVar("_M", bound=BaseModel)


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status, headers=headers, media_type="application/json")


def _answer(exc: AgentHttpError) -> Response:
    return _json(exc.body(), exc.status, exc.headers)


# ---- wire models ---------------------------------------------------------------------------------------------
class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResumeFile(_Wire):
    name: str = Field(pattern=CKPT_NAME_RE.pattern)
    sha256: str = Field(pattern=SHA256_RE.pattern)


class SubmitRequest(_Wire):
    job_id: str = Field(pattern=JOB_ID_RE.pattern)
    attempt: int = Field(1, ge=1)
    spec: JobSpec
    resume: list[ResumeFile] = Field(default_factory=list)


class TokenRequest(_Wire):
    job_id: str = Field(pattern=JOB_ID_RE.pattern)
    ttl_s: float = Field(3600.0, gt=0, le=_MAX_TTL_S)


class AgentSettings(_Wire):
    """Where the agent keeps its data and how much it accepts."""

    data_dir: Path
    max_parallel: int = Field(1, ge=1, description="jobs running at once; more wait PENDING")
    max_blob_bytes: int = Field(20 * 2**30, gt=0, description="largest blob accepted (bytes)")
    kill_grace_s: float = Field(5.0, gt=0, description="SIGTERM → SIGKILL grace for a cancelled worker")


# ---- the agent ------------------------------------------------------------------------------------------------
class Agent:
    """One agent: token store, blob store, a ``LocalRunner`` and the Starlette ``app``."""

    def __init__(self, settings: AgentSettings, admin_digest: str) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for sub in ("staging", "out", "manifests"):
            (self.data_dir / sub).mkdir(exist_ok=True)
        self.tokens = TokenStore(admin_digest, self.data_dir / "tokens.json")
        self.blobs = BlobStore(self.data_dir / "blobs", max_bytes=settings.max_blob_bytes)
        self.jobs_root = self.data_dir / "jobs"
        self._fail_orphans()
        self.runner = LocalRunner(
            self.jobs_root, max_parallel=settings.max_parallel, kill_grace_s=settings.kill_grace_s
        )
        self.node = NodeInfo(self.data_dir)
        self._submit_lock = threading.Lock()
        self._manifest_lock = threading.Lock()
        self.app = Starlette(
            routes=[
                Route("/v1/health", self.health, methods=["GET"]),
                Route("/v1/tokens", self.mint_token, methods=["POST"]),
                Route("/v1/blobs/{sha256}", self.blob, methods=["HEAD", "PUT"]),
                Route("/v1/jobs", self.submit, methods=["POST"]),
                Route("/v1/jobs/{job_id}", self.job_status, methods=["GET"]),
                Route("/v1/jobs/{job_id}/logs", self.job_logs, methods=["GET"]),
                Route("/v1/jobs/{job_id}/result", self.job_result, methods=["GET"]),
                Route("/v1/jobs/{job_id}/artifacts/{path:path}", self.job_artifact, methods=["GET"]),
                Route("/v1/jobs/{job_id}/checkpoints/{name}", self.job_checkpoint, methods=["GET"]),
                Route("/v1/jobs/{job_id}/cancel", self.job_cancel, methods=["POST"]),
                Route("/v1/jobs/{job_id}/data", self.job_purge, methods=["DELETE"]),
            ],
            exception_handlers={
                AgentHttpError: self._api_error,
                HTTPException: self._http_error,
                Exception: self._internal_error,
            },
            lifespan=self._lifespan,
        )

    # ---- lifecycle -------------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await run_in_threadpool(self.close)

    def close(self) -> None:
        """Cancel every running job and wait for its worker to exit (SIGTERM, SIGKILL after the grace)."""
        self.runner.close()

    def _fail_orphans(self) -> None:
        """Jobs a previous agent process left without a result (it was killed): FAILED(infra), so callers do
        not wait for a heartbeat that will never come."""
        if not self.jobs_root.is_dir():
            return
        for job_dir in self.jobs_root.iterdir():
            if (
                not JOB_ID_RE.match(job_dir.name)
                or (job_dir / RESULT).exists()
                or not (job_dir / SPEC).exists()
            ):
                continue
            with contextlib.suppress(OSError, ValueError):
                spec = JobSpec.model_validate_json((job_dir / SPEC).read_bytes())
                reason = (
                    "the worker agent restarted while the job ran; its checkpoints remain available "
                    "(GET /v1/jobs/<id>): resume from them under a new job id"
                )
                record = AttemptRecord(
                    attempt=1,
                    runner="local",
                    node=socket.gethostname(),
                    started=now(),
                    ended=now(),
                    state=JobState.FAILED,
                    failure=FailureKind.INFRA,
                    reason=reason,
                )
                res = JobResult(
                    job_id=job_dir.name,
                    spec_hash=spec.spec_hash,
                    state=JobState.FAILED,
                    failure=FailureKind.INFRA,
                    attempts=[record],
                    error=reason,
                )
                atomic_write_bytes(job_dir / RESULT, res.model_dump_json(indent=2).encode())

    # ---- errors ----------------------------------------------------------------------------------------------
    async def _api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, AgentHttpError)
        return _answer(exc)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return _answer(AgentHttpError(exc.status_code, message, headers=dict(exc.headers or {})))

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        log.error("agent: %s %s failed", request.method, request.url.path, exc_info=exc)
        return _answer(AgentHttpError(500, f"internal error ({type(exc).__name__}); see the agent log"))

    # ---- auth ------------------------------------------------------------------------------------------------
    def _auth(self, request: Request, job_id: str | None = None, *, admin: bool = False) -> Principal:
        try:
            who = self.tokens.check(request.headers.get("authorization"))
        except AgentTokenError as e:
            raise AgentHttpError(e.status, e.message, field="Authorization") from None
        if admin and not who.admin:
            raise AgentHttpError(
                403, "this route needs the agent's admin token, not a job token", field="Authorization"
            )
        if job_id is not None and not who.may_access(job_id):
            raise AgentHttpError(
                403, f"the token is for job {who.job_id}, not {job_id}", field="Authorization"
            )
        return who

    def _job_dir(self, request: Request) -> tuple[str, Path]:
        job_id = request.path_params["job_id"]
        if not JOB_ID_RE.match(job_id):
            raise AgentHttpError(
                400, f"job id {job_id!r} is malformed (12 + 8 lowercase hex digits)", field="job_id"
            )
        self._auth(request, job_id)
        job_dir = self.jobs_root / job_id
        if not (job_dir / SPEC).is_file():
            raise AgentHttpError(
                404, f"no job {job_id} on this agent; submit it first (POST /v1/jobs)", field="job_id"
            )
        return job_id, job_dir

    # ---- routes: health, tokens ------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        self._auth(request)
        return _json(self.node.snapshot(self._jobs_running()))

    def _jobs_running(self) -> int:
        return self.runner.active_jobs()

    async def mint_token(self, request: Request) -> Response:
        self._auth(request, admin=True)
        req = _parse(TokenRequest, await _read_json(request))
        token, expires = self.tokens.mint(req.job_id, req.ttl_s)
        from datetime import UTC, datetime

        expires_at = datetime.fromtimestamp(expires, UTC).isoformat()
        return _json({"token": token, "job_id": req.job_id, "expires_at": expires_at}, 201)

    # ---- routes: blobs ---------------------------------------------------------------------------------------
    async def blob(self, request: Request) -> Response:
        self._auth(request)
        sha = request.path_params["sha256"]
        if not SHA256_RE.match(sha):
            raise AgentHttpError(
                400, "the blob name must be a sha256: 64 lowercase hex digits", field="sha256"
            )
        if request.method == "HEAD":
            size = self.blobs.size(sha)
            if size is not None:
                return Response(status_code=200, headers={"Content-Length": str(size)})
            return Response(status_code=404, headers={"Upload-Offset": str(self.blobs.offset(sha))})
        offset = _int_header(request, "Upload-Offset", default=0)
        total = _int_header(request, "Upload-Length", default=None)
        try:
            out = await self.blobs.put(sha, offset, total, request.stream())
        except BlobError as e:
            raise AgentHttpError(e.status, e.message, code=e.code, field=e.field, headers=e.headers) from None
        except ClientDisconnect:
            log.info(
                "blob %s: client dropped at %d bytes (kept for resume)", sha[:12], self.blobs.offset(sha)
            )
            return Response(status_code=400)  # nobody is listening any more
        if not out.complete:
            headers = {"Upload-Offset": str(out.size)}
            return _json({"sha256": sha, "offset": out.size}, 202, headers)
        return _json({"sha256": sha, "size": out.size}, 200 if out.existed else 201)

    # ---- routes: jobs ----------------------------------------------------------------------------------------
    async def submit(self, request: Request) -> Response:
        who = self._auth(request)
        req = _parse(SubmitRequest, await _read_json(request))
        if not who.may_access(req.job_id):
            raise AgentHttpError(403, f"the token is for job {who.job_id}, not {req.job_id}", field="job_id")
        status, body = await run_in_threadpool(self._submit, req)
        return _json(body, status)

    def _submit(self, req: SubmitRequest) -> tuple[int, dict[str, Any]]:
        spec = req.spec
        with self._submit_lock:
            known = self._known_spec_hash(req.job_id)
            if known is not None:
                if known != spec.spec_hash:
                    raise AgentHttpError(
                        409,
                        f"job {req.job_id} exists with another spec (spec_hash {known[:16]}…, this one "
                        f"{spec.spec_hash[:16]}…); submit it under a new job id",
                        field="spec",
                    )
                state = self.runner.status(req.job_id).state
                return 200, {"job_id": req.job_id, "state": state, "created": False}
            wanted = [ref.sha256 for ref in spec.inputs if not ref.files]
            wanted += [f.sha256 for ref in spec.inputs for f in ref.files]
            wanted += [r.sha256 for r in req.resume]
            missing = self.blobs.missing(wanted)
            if missing:
                raise AgentHttpError(
                    422,
                    f"missing blobs: upload {len(missing)} blob(s) first (PUT /v1/blobs/<sha256>)",
                    code="missing_blobs",
                    field="spec.inputs",
                    extra={"missing": missing},
                )
            local = self._stage(req)
            try:
                self.runner.submit(local, job_id=req.job_id)
            except ConfigError as e:
                raise AgentHttpError(409, str(e), field="job_id") from None
        return 201, {"job_id": req.job_id, "state": self.runner.status(req.job_id).state, "created": True}

    def _known_spec_hash(self, job_id: str) -> str | None:
        path = self.jobs_root / job_id / SPEC
        if not path.is_file():
            return None
        return JobSpec.model_validate_json(path.read_bytes()).spec_hash

    def _stage(self, req: SubmitRequest) -> JobSpec:
        """Place the job's inputs and resume checkpoints (hard links to the blobs) and rewrite the spec's paths."""
        stage = self.data_dir / "staging" / req.job_id
        if stage.exists():  # a previous submit that failed half-way
            shutil.rmtree(stage)
        inputs_dir = stage / "inputs"
        refs = []
        for i, ref in enumerate(req.spec.inputs):
            base = inputs_dir / str(i)
            if not ref.files:
                name = PurePosixPath(ref.path.replace("\\", "/")).name
                dest = base / (name if _safe_name(name) else "input")
                self._place(ref.sha256, dest)
                refs.append(ref.model_copy(update={"path": str(dest)}))
                continue
            for j, f in enumerate(ref.files):
                rel = PurePosixPath(f.path)
                if not _safe_relpath(f.path):
                    raise AgentHttpError(
                        422,
                        f"input {i} file {f.path!r}: paths must be relative, without '..' or empty parts",
                        field=f"spec.inputs.{i}.files.{j}.path",
                    )
                self._place(f.sha256, base.joinpath(*rel.parts))
            base.mkdir(parents=True, exist_ok=True)
            refs.append(ref.model_copy(update={"path": str(base)}))
        resume_from = None
        if req.resume:
            resume = stage / "resume"
            for r in req.resume:
                self._place(r.sha256, resume / r.name)
            resume_from = str(resume)
        out_dir = self.data_dir / "out" / req.job_id
        if out_dir.exists():
            shutil.rmtree(out_dir)
        atomic_write_bytes(stage / "submit.json", req.model_dump_json().encode())
        checkpoint = req.spec.checkpoint.model_copy(update={"resume_from": resume_from})
        outputs = req.spec.outputs.model_copy(update={"dir": str(out_dir)})
        local = req.spec.model_copy(update={"inputs": refs, "outputs": outputs, "checkpoint": checkpoint})
        return JobSpec.model_validate(local.model_dump())

    def _place(self, sha256: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        src = self.blobs.path(sha256)
        try:
            os.link(src, dest)
        except FileExistsError:
            pass
        except OSError:
            shutil.copyfile(src, dest)

    async def job_status(self, request: Request) -> Response:
        job_id, job_dir = self._job_dir(request)
        st: JobStatus = self.runner.status(job_id)
        if st.state.terminal:
            # the worker reports its end a moment before the runner records its verdict: wait for the verdict,
            # so that a terminal state here always means /result answers
            await run_in_threadpool(self._verdict, job_id)
            st = self.runner.status(job_id)
        checkpoint = await run_in_threadpool(_newest_checkpoint, job_dir / CHECKPOINTS)
        return _json({"status": st.model_dump(mode="json"), "checkpoint": checkpoint})

    async def job_logs(self, request: Request) -> Response:
        job_id, _ = self._job_dir(request)
        raw = request.query_params.get("offset", "0")
        try:
            offset = int(raw)
            if offset < 0:
                raise ValueError
        except ValueError:
            raise AgentHttpError(400, f"offset {raw!r} must be an integer ≥ 0", field="offset") from None
        text, nxt = await run_in_threadpool(self.runner.logs, job_id, offset)
        return _json({"text": text, "next_offset": nxt})

    def _verdict(self, job_id: str, timeout: float = _VERDICT_WAIT_S) -> JobResult | None:
        """The runner's final result, waiting up to ``timeout`` s; None when the job is not finished."""
        try:
            return self.runner.result(job_id, timeout=timeout)
        except (JobNotFinished, JobNotFound):
            return None

    async def _finished(self, job_id: str) -> JobResult:
        """The job's final result, or 409 while the runner has not reached its verdict."""
        wait = _VERDICT_WAIT_S if self.runner.status(job_id).state.terminal else 0.0
        result = await run_in_threadpool(self._verdict, job_id, wait)
        if result is None:
            state = self.runner.status(job_id).state
            raise AgentHttpError(
                409,
                f"job {job_id} is {state}, not finished; ask again later",
                code="not_finished",
                field="job_id",
            )
        return result

    async def job_result(self, request: Request) -> Response:
        job_id, _ = self._job_dir(request)
        result = await self._finished(job_id)
        manifest = await run_in_threadpool(self._manifest, job_id)
        out_dir = (self.data_dir / "out" / job_id).resolve()
        artifacts: dict[str, str] = {}
        for path, sha in result.artifacts.items():
            try:
                artifacts[Path(path).resolve().relative_to(out_dir).as_posix()] = sha
            except ValueError:
                log.warning("job %s: artifact %s is outside its output directory; not served", job_id, path)
        res = result.model_copy(update={"artifacts": artifacts})
        return _json({"result": res.model_dump(mode="json"), "files": manifest})

    def _manifest(self, job_id: str) -> list[dict[str, Any]]:
        """``[{"path", "sha256", "size"}]`` of every file in the job's output directory (computed once)."""
        path = self.data_dir / "manifests" / f"{job_id}.json"
        with self._manifest_lock:
            if path.is_file():
                return json.loads(path.read_bytes())
            out_dir = self.data_dir / "out" / job_id
            files = []
            if out_dir.is_dir():
                for f in sorted(p for p in out_dir.rglob("*") if p.is_file() and not p.is_symlink()):
                    rel = f.relative_to(out_dir).as_posix()
                    files.append({"path": rel, "sha256": sha256_file(f), "size": f.stat().st_size})
            atomic_write_bytes(path, json.dumps(files).encode())
            return files

    async def job_artifact(self, request: Request) -> Response:
        job_id, _ = self._job_dir(request)
        rel = request.path_params["path"]
        await self._finished(job_id)
        manifest = await run_in_threadpool(self._manifest, job_id)
        entry = next((f for f in manifest if f["path"] == rel), None)
        if entry is None:
            raise AgentHttpError(
                404, f"{rel!r} is not an output file of job {job_id}; see its result's files", field="path"
            )
        return _file_response(self.data_dir / "out" / job_id / rel, f"artifact {rel}")

    async def job_checkpoint(self, request: Request) -> Response:
        _, job_dir = self._job_dir(request)
        name = request.path_params["name"]
        if not CKPT_NAME_RE.match(name):
            raise AgentHttpError(
                400,
                f"{name!r} is not a checkpoint file name (ckpt-NNNNNNNNN.json|.safetensors)",
                field="name",
            )
        return _file_response(job_dir / CHECKPOINTS / name, f"checkpoint {name}")

    async def job_cancel(self, request: Request) -> Response:
        job_id, _ = self._job_dir(request)
        self.runner.cancel(job_id)
        return _json({"state": self.runner.status(job_id).state}, 202)

    async def job_purge(self, request: Request) -> Response:
        """``DELETE /v1/jobs/{id}/data``: remove every file of a finished job (inputs, checkpoints, outputs, log,
        and the blobs no other job uses) and revoke its job tokens; idempotent. Answers what was removed and what of the job remains."""
        job_id = request.path_params["job_id"]
        if not JOB_ID_RE.match(job_id):
            raise AgentHttpError(
                400, f"job id {job_id!r} is malformed (12 + 8 lowercase hex digits)", field="job_id"
            )
        self._auth(request, job_id)
        if (self.jobs_root / job_id / SPEC).is_file() and not self.runner.status(job_id).state.terminal:
            raise AgentHttpError(409, f"job {job_id} is still running; cancel it first", field="job_id")
        removed, remaining = await run_in_threadpool(self._purge, job_id)
        return _json({"job_id": job_id, "removed": removed, "remaining": remaining})

    def _purge(self, job_id: str) -> tuple[list[str], list[str]]:
        with self._submit_lock:
            mine = self._job_blobs(job_id)
            others: set[str] = set()
            for d in self.jobs_root.iterdir() if self.jobs_root.is_dir() else []:
                if d.name != job_id and JOB_ID_RE.match(d.name):
                    others |= self._job_blobs(d.name)
            paths = [
                self.jobs_root / job_id,
                self.data_dir / "staging" / job_id,
                self.data_dir / "out" / job_id,
                self.data_dir / "manifests" / f"{job_id}.json",
            ]
            removed = [p.relative_to(self.data_dir).as_posix() for p in paths if p.exists()]
            for p in paths:
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
            for sha in sorted(mine - others):
                if self.blobs.path(sha).exists():
                    self.blobs.path(sha).unlink()
                    removed.append(f"blobs/{sha}")
            remaining = [p.relative_to(self.data_dir).as_posix() for p in paths if p.exists()]
            revoked = self.tokens.revoke(job_id)  # nothing left to reach with them
        log.info(
            "job %s: removed %d item(s) of its data, revoked %d job token(s)", job_id, len(removed), revoked
        )
        return removed, remaining

    def _job_blobs(self, job_id: str) -> set[str]:
        """The blobs a job's submit request names (inputs and resume checkpoints)."""
        shas: set[str] = set()
        for path in (self.data_dir / "staging" / job_id / "submit.json", self.jobs_root / job_id / SPEC):
            with contextlib.suppress(OSError, ValueError):
                doc = json.loads(path.read_bytes())
                spec = doc.get("spec", doc)
                for ref in spec.get("inputs") or []:
                    shas |= {f["sha256"] for f in ref.get("files") or []} or {ref["sha256"]}
                shas |= {r["sha256"] for r in doc.get("resume") or []}
        return {s for s in shas if SHA256_RE.match(s)}


# ---- helpers --------------------------------------------------------------------------------------------------
def _safe_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\x00" not in name


def _safe_relpath(path: str) -> bool:
    """True for a relative POSIX path without '..', '.', empty parts, backslashes or NULs."""
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        return False
    parts = path.split("/")
    return all(p not in ("", ".", "..") for p in parts) and not PurePosixPath(path).is_absolute()


def _newest_checkpoint(directory: Path) -> dict[str, Any] | None:
    """The newest complete checkpoint pair: ``{"step", "files": [{"name", "sha256", "size"}]}`` or None.

    The JSON file is written last and carries the safetensors digest (see ``gpu_jobs.checkpoint``), so a pair
    whose JSON parses is complete; a pair removed meanwhile (``keep_last``) is skipped."""
    if not directory.is_dir():
        return None
    steps = sorted(
        (
            int(m.group(1))
            for p in directory.iterdir()
            if (m := CKPT_NAME_RE.match(p.name)) and m.group(2) == "json"
        ),
        reverse=True,
    )
    for step in steps:
        stem = f"ckpt-{step:09d}"
        try:
            meta_bytes = (directory / f"{stem}.json").read_bytes()
            meta = json.loads(meta_bytes)
            tensors_sha = meta["tensors_sha256"]
            tensors_size = (directory / f"{stem}.safetensors").stat().st_size
        except (OSError, ValueError, KeyError, TypeError):
            continue
        files = [
            {
                "name": f"{stem}.json",
                "sha256": hashlib.sha256(meta_bytes).hexdigest(),
                "size": len(meta_bytes),
            },
            {"name": f"{stem}.safetensors", "sha256": tensors_sha, "size": tensors_size},
        ]
        return {"step": step, "files": files}
    return None


def _file_response(path: Path, what: str) -> Response:
    """Stream ``path`` from an already open descriptor (so a concurrent delete cannot cut the download)."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the generator
    except (FileNotFoundError, IsADirectoryError):
        raise AgentHttpError(404, f"{what} is not (or no longer) on this agent", field="path") from None
    size = os.fstat(fh.fileno()).st_size

    def chunks() -> Iterator[bytes]:
        with fh:
            while data := fh.read(_STREAM_CHUNK):
                yield data

    return StreamingResponse(
        chunks(), media_type="application/octet-stream", headers={"Content-Length": str(size)}
    )


def _int_header(request: Request, name: str, *, default: int | None) -> int:
    raw = request.headers.get(name)
    if raw is None:
        if default is None:
            raise AgentHttpError(
                400, f"the {name} header is required (the blob's total size in bytes)", field=name
            )
        return default
    try:
        value = int(raw)
        if value < 0:
            raise ValueError
    except ValueError:
        raise AgentHttpError(400, f"{name} {raw!r} must be an integer ≥ 0", field=name) from None
    return value


async def _read_json(request: Request) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > _JSON_BODY_LIMIT:
        raise AgentHttpError(413, f"the body is over {_JSON_BODY_LIMIT} bytes; send less", field="body")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _JSON_BODY_LIMIT:
            raise AgentHttpError(413, f"the body is over {_JSON_BODY_LIMIT} bytes; send less", field="body")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise AgentHttpError(
            400, f"the body is not JSON ({e}); send a JSON object", code="invalid_json", field="body"
        ) from None


def _parse(model: type[_M], data: Any) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise AgentHttpError(422, f"{where}: {err['msg']}", field=where) from None
