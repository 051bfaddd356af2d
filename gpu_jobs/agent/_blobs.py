"""Content-addressed blob storage with resumable uploads.

Layout under ``root``: ``<sha256>`` complete blobs (verified), ``.partial/<sha256>`` uploads in progress. An
upload appends the request body at ``Upload-Offset`` (which must equal the bytes already held) and, once the
held size reaches ``Upload-Length``, checks the sha256 and moves the file into place atomically. A body that
ends early (the client dropped) leaves the partial file for the next request to resume from. The digest of a
partial is carried across requests in memory while the agent runs (so completion never re-reads the file);
after a restart it is rebuilt from the partial file once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu_jobs.errors import BlobError

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_FLUSH = 1 << 20  # write (and hash) in 1 MiB pieces
_LOCK_WAIT_S = 10.0


@dataclass
class PutOutcome:
    """What a PUT achieved: ``complete`` (verified, 201; ``existed`` → 200) or still partial at ``offset``."""

    sha256: str
    size: int
    complete: bool
    existed: bool = False


class _Writer:
    """Appends pieces to a partial upload and hashes them in the store's I/O threads, one piece in flight, so
    the event loop keeps reading the socket meanwhile. ``size`` counts the bytes written (and hashed)."""

    def __init__(self, store: BlobStore, sha256: str, hasher: Any, held: int) -> None:
        self.store, self.sha256, self.hasher, self.size = store, sha256, hasher, held
        self.fh = open(store.partial_dir / sha256, "ab", buffering=0)  # noqa: SIM115 - closed by finish()
        self.pending: concurrent.futures.Future[None] | None = None
        self.queued = 0

    def _write(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[self.fh.write(view) :]
            self.hasher.update(chunk)

    def submit(self, chunks: list[bytes], n: int) -> None:
        assert self.pending is None
        self.pending = self.store._io.submit(self._write, chunks)
        self.queued = n

    async def drain(self) -> None:
        if self.pending is not None:
            await asyncio.wrap_future(self.pending)
            self._settle()

    def _settle(self) -> None:
        assert self.pending is not None
        pending, self.pending = self.pending, None
        pending.result()
        self.size += self.queued
        self.queued = 0
        self.store._hashers[self.sha256] = (self.size, self.hasher)

    def finish(self, last: list[bytes] | None) -> None:
        """Wait for the piece in flight, write ``last`` (None: discard it), close the file."""
        try:
            if self.pending is not None:
                self._settle()
            if last:
                self._write(last)
                self.size += sum(len(c) for c in last)
                self.store._hashers[self.sha256] = (self.size, self.hasher)
        finally:
            self.fh.close()


class BlobStore:
    """Blobs named by sha256 under ``root``; uploads larger than ``max_bytes`` are refused (413)."""

    def __init__(self, root: Path | str, *, max_bytes: int = 20 * 2**30) -> None:
        self.root = Path(root)
        self.partial_dir = self.root / ".partial"
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._hashers: dict[str, tuple[int, Any]] = {}  # sha → (bytes hashed, hashlib object)
        self._locks: dict[str, asyncio.Lock] = {}
        self._io = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="blob-io")

    # ---- queries -----------------------------------------------------------------------------------------
    def path(self, sha256: str) -> Path:
        """Where the complete blob ``sha256`` lives (it may not exist)."""
        return self.root / sha256

    def size(self, sha256: str) -> int | None:
        """The size of the complete blob, or None when it is not held."""
        with contextlib.suppress(FileNotFoundError):
            return self.path(sha256).stat().st_size
        return None

    def offset(self, sha256: str) -> int:
        """Bytes of a partial upload held (0 when none)."""
        with contextlib.suppress(FileNotFoundError):
            return (self.partial_dir / sha256).stat().st_size
        return 0

    def missing(self, digests: list[str]) -> list[str]:
        """The digests (in order, without duplicates) that are not held complete."""
        seen: set[str] = set()
        out = []
        for d in digests:
            if d not in seen and not self.path(d).is_file():
                out.append(d)
            seen.add(d)
        return out

    # ---- upload ------------------------------------------------------------------------------------------
    async def put(self, sha256: str, offset: int, total: int, body: AsyncIterator[bytes]) -> PutOutcome:
        """Append ``body`` at ``offset`` to the partial upload of ``sha256`` (``total`` bytes in all).

        Raises ``BlobError`` (409 wrong offset, 413 too large, 422 sha256 mismatch, 400 body past the end,
        507 disk full) and lets ``ClientDisconnect`` through (the partial is kept for a resume)."""
        if total > self.max_bytes:
            raise BlobError(
                413,
                f"Upload-Length {total} exceeds the agent's blob limit of {self.max_bytes} bytes; "
                "split the data or raise --max-blob-gb",
                field="Upload-Length",
            )
        existing = self.size(sha256)
        if existing is not None:
            return PutOutcome(sha256, existing, complete=True, existed=True)
        lock = self._locks.setdefault(sha256, asyncio.Lock())
        try:
            await asyncio.wait_for(lock.acquire(), _LOCK_WAIT_S)
        except TimeoutError:
            raise BlobError(
                409,
                f"another upload of {sha256} is in progress; retry later from HEAD's Upload-Offset",
                headers={"Upload-Offset": str(self.offset(sha256))},
            ) from None
        try:
            return await self._put_locked(sha256, offset, total, body)
        finally:
            lock.release()
            if not lock.locked():
                self._locks.pop(sha256, None)

    async def _put_locked(
        self, sha256: str, offset: int, total: int, body: AsyncIterator[bytes]
    ) -> PutOutcome:
        existing = self.size(sha256)
        if existing is not None:  # completed by a concurrent request meanwhile
            return PutOutcome(sha256, existing, complete=True, existed=True)
        part = self.partial_dir / sha256
        held = self.offset(sha256)
        if offset != held:
            raise BlobError(
                409,
                f"Upload-Offset {offset} does not match the {held} bytes held; resume from Upload-Offset {held}",
                field="Upload-Offset",
                headers={"Upload-Offset": str(held)},
            )
        if total < held:
            self._discard(sha256)
            raise BlobError(
                400, f"Upload-Length {total} is below the bytes already held", field="Upload-Length"
            )
        free = shutil.disk_usage(self.root).free
        if total - held > free:
            raise BlobError(
                507, f"not enough disk: {total - held} bytes needed, {free} free", field="Upload-Length"
            )
        hasher = self._hasher(sha256, held)
        writer = _Writer(self, sha256, hasher, held)
        buf: list[bytes] = []
        buffered = 0
        overflow = False
        try:
            async for chunk in body:
                if writer.size + writer.queued + buffered + len(chunk) > total:
                    overflow = True
                    break
                buf.append(chunk)
                buffered += len(chunk)
                if buffered >= _FLUSH:
                    # write + hash this piece in a thread while the next one arrives (one piece in flight)
                    await writer.drain()
                    writer.submit(buf, buffered)
                    buf, buffered = [], 0
        finally:
            # a dropped client (ClientDisconnect) lands here too: what arrived is kept for the resume
            writer.finish(None if overflow else buf)
        size = writer.size
        if overflow:
            self._discard(sha256)
            raise BlobError(
                400,
                f"the body runs past Upload-Length {total}; the partial upload was discarded, start over",
                field="Upload-Length",
            )
        if size < total:
            return PutOutcome(sha256, size, complete=False)
        actual = hasher.hexdigest()
        self._hashers.pop(sha256, None)
        if actual != sha256:
            part.unlink(missing_ok=True)
            raise BlobError(
                422,
                code="sha256_mismatch",
                message=f"sha256 mismatch: the {size} bytes received hash to {actual}, not {sha256}; "
                "the upload was discarded, send the right bytes from offset 0",
                field="body",
            )
        os.chmod(part, 0o444)  # jobs get hard links to blobs: read-only, so a job cannot alter the store
        os.replace(part, self.path(sha256))
        return PutOutcome(sha256, size, complete=True)

    def _hasher(self, sha256: str, held: int) -> Any:
        cached = self._hashers.get(sha256)
        if cached is not None and cached[0] == held:
            return cached[1]
        h = hashlib.sha256()
        with contextlib.suppress(FileNotFoundError), open(self.partial_dir / sha256, "rb") as fh:
            while chunk := fh.read(_FLUSH):
                h.update(chunk)
        return h

    def _discard(self, sha256: str) -> None:
        self._hashers.pop(sha256, None)
        (self.partial_dir / sha256).unlink(missing_ok=True)
