"""Sending a job's inputs to the agent: the blobs of a spec and resumable, streamed uploads."""

from __future__ import annotations

import re
import time
from functools import partial
from pathlib import Path

from depin_core.errors import ConfigError, TransientError
from depin_core.retry import Retryable
from gpu_jobs.remote._client import (
    RETRY_POLICY,
    AgentClient,
    _error_of,
    _Failures,
    _int_header,
    file_chunks,
    log,
)
from gpu_jobs.remote._state import _CKPT_FILE, _safe_relpath
from gpu_jobs.spec import JobSpec, sha256_file

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Blobs(AgentClient):
    """Input blobs: what a spec sends, and uploading one the agent lacks (resumed from its ``Upload-Offset``)."""

    def ensure_blob(self, path: Path | str, sha256: str) -> bool:
        """Make sure the agent holds blob ``sha256`` with the bytes of ``path``; True when bytes were sent.

        A partial upload the agent already holds is resumed from its ``Upload-Offset``; a dropped connection
        is resumed the same way (within ``retry_budget_s``).
        """
        if not _SHA256.match(sha256):
            raise ConfigError(f"blob sha256 {sha256!r} must be 64 lowercase hex digits")
        where = f"PUT {self.url}/v1/blobs/{sha256[:12]}…"
        tries = RETRY_POLICY.attempts(self.retry_budget_s)
        sent, restarted, conflicts = False, False, 0
        while True:
            head = self._request("HEAD", f"/v1/blobs/{sha256}", ok=(200, 404))
            if head.status_code == 200:
                return sent
            path = Path(path)
            try:
                size = path.stat().st_size
            except OSError:
                raise ConfigError(
                    f"input {path} is missing (blob {sha256[:12]}… is not on the agent either); stage the file "
                    "or rebuild the spec"
                ) from None
            offset = _int_header(head, "upload-offset")
            if offset > size:
                raise ConfigError(
                    f"{path}: the agent holds {offset} bytes of blob {sha256[:12]}… but the file has {size}; "
                    "the file is not the one the spec names — rebuild the spec (DatasetRef.from_path)"
                )
            headers = {
                "Upload-Offset": str(offset),
                "Upload-Length": str(size),
                "Content-Length": str(size - offset),
                "Content-Type": "application/octet-stream",
            }
            try:
                r = RETRY_POLICY.attempt(
                    partial(
                        self._call,
                        "PUT",
                        f"/v1/blobs/{sha256}",
                        headers=headers,
                        content=file_chunks(path, offset),
                    ),
                    _Failures(self, "PUT", f"/v1/blobs/{sha256}"),
                    ok=(200, 201, 202, 409, 422),
                )
                if r.status_code == 202:
                    # the body ended early and the agent kept what arrived: resume from HEAD's Upload-Offset
                    raise Retryable(f"upload incomplete at {_int_header(r, 'upload-offset')} of {size} bytes")
            except Retryable as exc:
                delay = tries.next_delay(exc.retry_after)
                if delay is None:
                    raise TransientError(
                        f"{where}: {exc.problem}; gave up after {tries.failures} attempts — is the agent still "
                        "running?",
                        retry_after=exc.retry_after,
                    ) from None
                log.info("%s: %s; resuming in %.2fs", where, exc.problem, delay)
                time.sleep(delay)
                continue
            sent = True
            if r.status_code in (200, 201):
                return True
            if r.status_code == 409 and conflicts < 5:  # another upload moved the partial on
                conflicts += 1
                time.sleep(RETRY_POLICY.delay(conflicts + 1))
                continue
            if r.status_code == 409:
                raise TransientError(
                    f"{where}: the agent keeps answering 409 (a concurrent upload?); retry later"
                )
            if offset > 0 and not restarted:  # 422: a bad partial from elsewhere, now deleted: once more
                restarted = True
                continue
            raise ConfigError(
                f"{path}: its bytes do not match sha256 {sha256} ({_error_of(r)[0]}); the file changed "
                "after the spec was made — rebuild the spec (DatasetRef.from_path) or restore the file"
            )

    # --- inputs ----------------------------------------------------------------------------------------------
    @staticmethod
    def _input_blobs(spec: JobSpec) -> dict[str, Path]:
        """sha256 → local file for every input (a file ref is one blob, a directory ref one per file)."""
        blobs: dict[str, Path] = {}
        for ref in spec.inputs:
            if not ref.files:
                blobs.setdefault(ref.sha256, Path(ref.path))
            for f in ref.files:
                if _safe_relpath(f.path) is None:
                    raise ConfigError(f"input {ref.path}: file {f.path!r} must be a relative path inside it")
                blobs.setdefault(f.sha256, Path(ref.path) / f.path)
        return blobs

    @staticmethod
    def _resume_blobs(spec: JobSpec) -> list[tuple[dict[str, str], Path]]:
        """[({"name", "sha256"}, path)] for the checkpoint files of ``spec.checkpoint.resume_from``."""
        src = spec.checkpoint.resume_from
        if not src:
            return []
        d = Path(src)
        if not d.is_dir():
            raise ConfigError(
                f"checkpoint.resume_from {d} is not a directory; pass a runner's checkpoint_dir()"
            )
        files = sorted(p for p in d.iterdir() if p.is_file() and _CKPT_FILE.match(p.name))
        return [({"name": p.name, "sha256": sha256_file(p)}, p) for p in files]
