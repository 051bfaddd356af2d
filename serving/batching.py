"""Dynamic batching of row-level requests for one (function, version).

Requests carry columns (one 1-D array per field, all the same length). The batcher queues them, concatenates
the queued columns into one batch, runs the model once in an executor (off the event loop) and splits the
outputs back by row counts. A batch is dispatched

* at once when the model is idle (nothing in flight): a lone request never waits;
* when the queued rows reach ``max_batch_rows`` (the batch is full);
* when the oldest queued request has waited ``max_wait_ms`` while an earlier batch is still running.

One exception to "off the event loop": with ``inline_max_ms`` > 0, a lone request on an idle model (still
alone one loop iteration after it arrived, so concurrent requests keep batching) runs on the loop itself when
the model's measured batch time is at most ``inline_max_ms``. For small models the hop to the inference
thread and back costs more than the inference (measured on one core: ~40 µs hop plus slower torch ops after
the switch, against ~75 µs of inference), while the loop is blocked no longer than ``inline_max_ms`` and only
when nothing else is queued. ``inline_max_ms=0`` keeps every batch on the executor.

At most ``max_in_flight`` batches are handed to the executor at a time (default 2: the next batch is ready
when the model thread finishes the current one). Everything is counted in rows, not requests. The queue is
bounded (``max_queue_rows`` waiting rows): beyond it ``submit`` raises ``Overloaded`` (HTTP 429) with a
``retry_after`` estimate; after ``aclose`` it raises ``Overloaded(draining=True)`` (HTTP 503). A request whose
deadline passes before its batch finishes gets ``DeadlineExceeded`` (HTTP 504); if it was still queued it is
never run. An exception raised by ``run`` reaches exactly the requests of that batch.

All methods except ``run`` execute on the event loop; no locks are needed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from depin_core.errors import ConfigError
from serving.errors import DeadlineExceeded, Overloaded

Columns = dict[str, np.ndarray]
# ``run`` may return columns (split per column) or a sequence of per-row results (split as a sequence).
RunOutput = Columns | Sequence[Any]


@dataclass
class BatcherStats:
    """Counters since the batcher started (read them; the batcher updates them)."""

    requests: int = 0  # accepted by submit
    rows: int = 0  # rows accepted by submit
    batches: int = 0  # batches that finished (ok or failed)
    batch_rows: int = 0  # rows run in those batches
    failed_batches: int = 0  # batches whose run raised
    rejected: int = 0  # requests refused with Overloaded
    expired: int = 0  # requests that got DeadlineExceeded
    max_batch: int = 0  # the largest batch run, in rows
    busy_s: float = 0.0  # seconds spent inside run (incl. concatenation and splitting)
    inline_batches: int = 0  # lone requests run on the event loop (see ``inline_max_ms``)

    @property
    def mean_batch_rows(self) -> float:
        return self.batch_rows / self.batches if self.batches else 0.0


class _Item:
    __slots__ = ("cols", "enqueued", "future", "n", "queued", "timer")

    def __init__(self, cols: Columns, n: int, future: asyncio.Future[Any], enqueued: float) -> None:
        self.cols = cols
        self.n = n
        self.future = future
        self.enqueued = enqueued
        self.queued = True
        self.timer: asyncio.TimerHandle | None = None


def row_count(cols: Columns) -> int:
    """Rows in ``cols`` (0 for no columns); ``ValueError`` when the columns' lengths differ."""
    lengths = {len(value) for value in cols.values()}
    if len(lengths) > 1:
        raise ValueError(
            f"columns have different lengths {sorted(lengths)}; every column needs one value per row"
        )
    return lengths.pop() if lengths else 0


def _concat(parts: Sequence[Columns]) -> Columns:
    if len(parts) == 1:
        return parts[0]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _split(out: RunOutput, counts: Sequence[int]) -> list[Any]:
    total = sum(counts)
    if isinstance(out, dict):
        for key, value in out.items():
            if len(value) != total:
                raise RuntimeError(f"the model returned {len(value)} rows of {key!r} for {total} input rows")
        if len(counts) == 1:
            return [out]
        pieces: list[Any] = []
        start = 0
        for n in counts:
            pieces.append({key: value[start : start + n] for key, value in out.items()})
            start += n
        return pieces
    if len(out) != total:
        raise RuntimeError(f"the model returned {len(out)} rows for {total} input rows")
    if len(counts) == 1:
        return [out]
    pieces = []
    start = 0
    for n in counts:
        pieces.append(out[start : start + n])
        start += n
    return pieces


class DynamicBatcher:
    """Queue, batch and run requests for one model; see the module docstring for the policy.

    ``run(columns) -> columns`` is called in ``executor`` (for the gateway: one dedicated inference thread);
    it must return as many rows as it got. ``on_batch(rows, seconds)`` is called on the loop after each batch.
    """

    # Times each batch; the measured time drives ``retry_after`` and the inline decision. Tests replace it (on
    # the class or an instance) with a fake clock, which makes those decisions independent of machine load.
    clock: Callable[[], float] = staticmethod(time.perf_counter)

    def __init__(
        self,
        run: Callable[[Columns], RunOutput],
        *,
        max_batch_rows: int,
        max_wait_ms: float,
        max_queue_rows: int,
        executor: concurrent.futures.Executor,
        max_in_flight: int = 2,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "batcher",
        inline_max_ms: float = 0.0,
    ) -> None:
        if max_batch_rows < 1:
            raise ConfigError(f"max_batch_rows must be ≥ 1, got {max_batch_rows}")
        if max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must be ≥ 0, got {max_wait_ms}")
        if max_queue_rows < max_batch_rows:
            raise ConfigError(
                f"max_queue_rows ({max_queue_rows}) must be ≥ max_batch_rows ({max_batch_rows}), "
                "else a full-size request could never be queued; raise max_queue_rows"
            )
        if max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be ≥ 1, got {max_in_flight}")
        if inline_max_ms < 0:
            raise ConfigError(f"inline_max_ms must be ≥ 0, got {inline_max_ms}")
        self.inline_max_s = inline_max_ms / 1000.0
        self._inline_pending = False
        self.name = name
        self.max_batch_rows = max_batch_rows
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue_rows = max_queue_rows
        self.max_in_flight = max_in_flight
        self.stats = BatcherStats()
        self._run = run
        self._executor = executor
        self.on_batch = on_batch
        self._queue: deque[_Item] = deque()
        self._queue_rows = 0
        self._in_flight = 0
        self._in_flight_rows = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = math.inf
        self._closing = False
        self._flush = False
        self._idle: asyncio.Event | None = None
        self._batch_s_ewma = 0.0  # seconds per batch, for retry_after

    # ---- state -------------------------------------------------------------------------------------------
    @property
    def queue_rows(self) -> int:
        """Rows waiting for a batch (not yet handed to the executor)."""
        return self._queue_rows

    @property
    def in_flight_rows(self) -> int:
        """Rows in batches handed to the executor and not finished yet."""
        return self._in_flight_rows

    @property
    def closed(self) -> bool:
        """True once ``aclose`` was called: ``submit`` refuses new work."""
        return self._closing

    def retry_after(self) -> float:
        """Seconds until the current backlog is probably gone (≥ 0.05)."""
        batches = self._in_flight + math.ceil(self._queue_rows / self.max_batch_rows)
        return max(0.05, batches * self._batch_s_ewma)

    # ---- submit ------------------------------------------------------------------------------------------
    async def submit(self, cols: Columns, *, deadline: float | None = None) -> Any:
        """Queue ``cols`` (n rows) and return the model's n output rows (columns, as ``run`` returned them).

        ``deadline`` is an absolute ``time.monotonic()`` time. Raises ``Overloaded``, ``DeadlineExceeded``,
        ``ValueError`` (malformed columns or more than ``max_batch_rows`` rows) or what ``run`` raised.
        """
        n = row_count(cols)
        if n > self.max_batch_rows:
            raise ValueError(f"{n} rows exceed max_batch_rows={self.max_batch_rows}; split the request")
        if self._closing:
            self.stats.rejected += 1
            raise Overloaded(
                f"{self.name} is shutting down; retry (another version or replica will answer)",
                retry_after=1.0,
                draining=True,
            )
        if self._queue_rows + n > self.max_queue_rows:
            self.stats.rejected += 1
            raise Overloaded(
                f"{self.name} is overloaded: {self._queue_rows} rows already queued (limit "
                f"{self.max_queue_rows}); retry later",
                retry_after=self.retry_after(),
            )
        loop = asyncio.get_running_loop()
        item = _Item(cols, n, loop.create_future(), loop.time())
        if deadline is not None:
            delay = deadline - time.monotonic()
            if delay <= 0:
                self.stats.expired += 1
                raise DeadlineExceeded(f"{self.name}: the request deadline passed before it was queued")
            item.timer = loop.call_later(delay, self._expire, item)
        self.stats.requests += 1
        self.stats.rows += n
        self._queue.append(item)
        self._queue_rows += n
        self._maybe_dispatch()
        try:
            return await item.future
        except asyncio.CancelledError:
            self._discard(item)
            raise
        finally:
            if item.timer is not None:
                item.timer.cancel()

    def _discard(self, item: _Item) -> None:
        if item.queued:
            item.queued = False
            self._queue_rows -= item.n
            item.cols = {}

    def _expire(self, item: _Item) -> None:
        if item.future.done():
            return
        was_queued = item.queued
        self._discard(item)
        self.stats.expired += 1
        where = "in the queue" if was_queued else "while its batch was running"
        item.future.set_exception(DeadlineExceeded(f"{self.name}: the request deadline passed {where}"))
        if was_queued:
            self._maybe_dispatch()  # the queue head may have changed

    # ---- dispatch ----------------------------------------------------------------------------------------
    def _maybe_dispatch(self, *, allow_inline: bool = True) -> None:
        queue = self._queue
        while queue and self._in_flight < self.max_in_flight:
            while queue and not queue[0].queued:
                queue.popleft()
            if not queue:
                break
            if self._in_flight and not self._flush and self._queue_rows < self.max_batch_rows:
                due = queue[0].enqueued + self.max_wait_s
                loop = asyncio.get_running_loop()
                if loop.time() < due:
                    self._arm(loop, due)
                    return
            if allow_inline and not self._in_flight and self._inline_ok():
                if not self._inline_pending:  # look again once the loop has read what else arrived
                    self._inline_pending = True
                    asyncio.get_running_loop().call_soon(self._dispatch_idle)
                return
            self._dispatch_one()

    def _inline_ok(self) -> bool:
        return 0.0 < self._batch_s_ewma <= self.inline_max_s and not self._closing

    def _dispatch_idle(self) -> None:
        """Still idle with one lone request: run it on the loop; otherwise batch as usual."""
        self._inline_pending = False
        queue = self._queue
        while queue and not queue[0].queued:
            queue.popleft()
        if queue and not self._in_flight and self._queue_rows == queue[0].n and self._inline_ok():
            item = queue.popleft()
            item.queued = False
            self._queue_rows -= item.n
            self._in_flight += 1
            self._in_flight_rows += item.n
            parts, counts = [item.cols], [item.n]
            item.cols = {}
            done: concurrent.futures.Future[Any] = concurrent.futures.Future()
            try:
                done.set_result(self._run_batch(parts, counts))
            except Exception as exc:
                done.set_exception(exc)
            self.stats.inline_batches += 1
            self._batch_done([item], counts[0], done)  # dispatches whatever arrived meanwhile
            return
        self._maybe_dispatch(allow_inline=False)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None and self._timer_when <= when:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_when = when
        self._timer = loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_when = math.inf
        self._maybe_dispatch()

    def _dispatch_one(self) -> None:
        queue = self._queue
        items: list[_Item] = []
        rows = 0
        while queue:
            item = queue[0]
            if not item.queued:
                queue.popleft()
                continue
            if rows + item.n > self.max_batch_rows:
                break
            queue.popleft()
            item.queued = False
            items.append(item)
            rows += item.n
        if not items:
            return
        self._queue_rows -= rows
        self._in_flight += 1
        self._in_flight_rows += rows
        parts = [item.cols for item in items]
        counts = [item.n for item in items]
        for item in items:
            item.cols = {}
        loop = asyncio.get_running_loop()
        try:
            cfut = self._executor.submit(self._run_batch, parts, counts)
        except RuntimeError as exc:  # executor shut down
            cfut = concurrent.futures.Future()
            cfut.set_exception(exc)
        # back on the loop with one call_soon_threadsafe (cheaper than asyncio.wrap_future's two-way chaining)
        cfut.add_done_callback(lambda f: loop.call_soon_threadsafe(self._batch_done, items, rows, f))

    def _run_batch(self, parts: list[Columns], counts: list[int]) -> tuple[list[Any], float]:
        """Runs in the executor: concatenate, run, split."""
        t0 = self.clock()
        keys = [tuple(p) for p in parts]
        if all(k == keys[0] for k in keys):
            results = _split(self._run(_concat(parts)), counts)
        else:  # requests with different optional fields: run each group of equal field sets once
            results = [None] * len(parts)
            groups: dict[tuple[str, ...], list[int]] = {}
            for i, k in enumerate(keys):
                groups.setdefault(tuple(sorted(k)), []).append(i)
            for idx in groups.values():
                sub = [parts[i] for i in idx]
                for i, piece in zip(
                    idx, _split(self._run(_concat(sub)), [counts[i] for i in idx]), strict=True
                ):
                    results[i] = piece
        return results, self.clock() - t0

    def _batch_done(self, items: list[_Item], rows: int, fut: concurrent.futures.Future[Any]) -> None:
        self._in_flight -= 1
        self._in_flight_rows -= rows
        stats = self.stats
        stats.batches += 1
        stats.batch_rows += rows
        stats.max_batch = max(stats.max_batch, rows)
        exc = (
            fut.exception() if not fut.cancelled() else RuntimeError(f"{self.name}: the batch was cancelled")
        )
        if exc is not None:
            stats.failed_batches += 1
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
        else:
            results, seconds = fut.result()
            stats.busy_s += seconds
            ewma = self._batch_s_ewma
            self._batch_s_ewma = seconds if ewma == 0.0 else 0.8 * ewma + 0.2 * seconds
            for item, result in zip(items, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
            if self.on_batch is not None:
                self.on_batch(rows, seconds)
        self._maybe_dispatch()
        if self._idle is not None and not self._in_flight and not self._queue_rows:
            self._idle.set()

    # ---- shutdown ----------------------------------------------------------------------------------------
    async def aclose(self, *, drain: bool = True) -> None:
        """Refuse new requests; with ``drain`` run everything queued at once, else fail it with
        ``Overloaded(draining=True)``. Returns when no batch is in flight."""
        self._closing = True
        if not drain:
            while self._queue:
                item = self._queue.popleft()
                if item.queued:
                    self._discard(item)
                    if not item.future.done():
                        item.future.set_exception(
                            Overloaded(f"{self.name} was closed; retry", retry_after=1.0, draining=True)
                        )
        self._flush = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_when = math.inf
        self._maybe_dispatch()
        if self._in_flight or self._queue_rows:
            if self._idle is None:
                self._idle = asyncio.Event()
            await self._idle.wait()
