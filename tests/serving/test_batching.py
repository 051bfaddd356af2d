"""DynamicBatcher: dispatch policy, row counting, back-pressure, deadlines, error routing, shutdown.

The model is a "gated" function: each call records its batch and then waits until the test releases it, so
the tests decide exactly when the model is busy and which requests share a batch (no timing assertions).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from depin_core.errors import ConfigError, TransientError
from serving.batching import Columns, DynamicBatcher, row_count
from serving.errors import DeadlineExceeded, Overloaded
from tests.support.fake_clock import TickingClock

# A deadline that passes while the request waits on a gated model; long enough that a busy machine never lets it
# pass between computing it and queueing the request (that would be "before it was queued").
QUEUED_DEADLINE_S = 0.5


class Gated:
    """A model whose every call blocks until ``release()``; records the x values of each batch."""

    def __init__(self, *, gated: bool = True) -> None:
        self.gated = gated
        self.batches: list[list[float]] = []
        self._sem = threading.Semaphore(0)
        self.threads: set[str] = set()

    def __call__(self, cols: Columns) -> Columns:
        self.batches.append(cols["x"].tolist())
        self.threads.add(threading.current_thread().name)
        if self.gated and not self._sem.acquire(timeout=20):
            raise TimeoutError("test never released the model")
        if (cols["x"] < 0).any():
            raise ValueError("negative x in batch")
        return {"y": cols["x"] * 2, "tag": cols["x"] + 0.5}

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self._sem.release()


@pytest.fixture
def executor() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    ex = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-infer")
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


def make(
    model: Callable[[Columns], Columns], executor: concurrent.futures.Executor, **kw: object
) -> DynamicBatcher:
    opts: dict[str, object] = {"max_batch_rows": 8, "max_wait_ms": 60_000.0, "max_queue_rows": 64}
    opts.update(kw)
    return DynamicBatcher(model, executor=executor, **opts)  # type: ignore[arg-type]


def cols(*xs: float) -> Columns:
    return {"x": np.asarray(xs, dtype=np.float64)}


async def until(pred: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


async def test_lone_request_never_waits_for_max_wait(executor: concurrent.futures.Executor) -> None:
    model = Gated(gated=False)
    b = make(model, executor, max_wait_ms=600_000.0)  # ten minutes: only idle dispatch can answer in time
    out = await asyncio.wait_for(b.submit(cols(1, 2, 3)), timeout=10)
    assert out["y"].tolist() == [2, 4, 6]
    assert model.batches == [[1, 2, 3]]
    assert model.threads == {"test-infer_0"}  # off the event loop, in the executor's thread
    await b.aclose()


async def test_full_batch_dispatched_while_model_busy(executor: concurrent.futures.Executor) -> None:
    model = Gated()
    b = make(model, executor, max_batch_rows=4, max_in_flight=2)
    first = asyncio.create_task(b.submit(cols(100)))
    await until(lambda: len(model.batches) == 1, "the first batch to start")
    rest = [asyncio.create_task(b.submit(cols(i))) for i in range(3)]
    await until(lambda: b.queue_rows == 3, "3 queued rows")
    assert b.in_flight_rows == 1  # not full yet, max_wait is long: they wait
    rest.append(asyncio.create_task(b.submit(cols(3))))
    await until(lambda: b.queue_rows == 0, "the full batch to be dispatched")
    assert b.in_flight_rows == 5
    model.release(2)
    assert (await first)["y"].tolist() == [200]
    assert [(await t)["y"].tolist() for t in rest] == [[0], [2], [4], [6]]
    assert model.batches == [[100], [0, 1, 2, 3]]
    await b.aclose()


async def test_max_wait_dispatches_partial_batch(executor: concurrent.futures.Executor) -> None:
    model = Gated()
    b = make(model, executor, max_batch_rows=8, max_wait_ms=5.0, max_in_flight=2)
    first = asyncio.create_task(b.submit(cols(1)))
    await until(lambda: len(model.batches) == 1, "the first batch")
    second = asyncio.create_task(b.submit(cols(2, 3)))
    await until(lambda: b.stats.requests == 2, "the second request")
    # the model is still busy and the batch is not full: only max_wait can dispatch it
    await until(lambda: b.queue_rows == 0, "max_wait to dispatch the partial batch")
    assert b.in_flight_rows == 3
    model.release(2)
    assert (await first)["y"].tolist() == [2]
    assert (await second)["y"].tolist() == [4, 6]
    assert model.batches == [[1], [2, 3]]
    await b.aclose()


async def test_batches_count_rows_not_requests(executor: concurrent.futures.Executor) -> None:
    model = Gated()
    b = make(model, executor, max_batch_rows=8, max_in_flight=1)
    first = asyncio.create_task(b.submit(cols(0)))
    await until(lambda: len(model.batches) == 1, "the first batch")
    tasks = [asyncio.create_task(b.submit(cols(*range(10 * i, 10 * i + 3)))) for i in range(1, 6)]
    await until(lambda: b.queue_rows == 15, "5 requests × 3 rows queued")
    model.release(10)
    await first
    for i, t in enumerate(tasks, start=1):
        assert (await t)["y"].tolist() == [2 * x for x in range(10 * i, 10 * i + 3)]
    # 3-row requests, 8-row batches: at most two requests per batch, in arrival order
    assert [len(batch) for batch in model.batches] == [1, 6, 6, 3]
    assert model.batches[1] == [10, 11, 12, 20, 21, 22]
    assert b.stats.max_batch == 6 and b.stats.batches == 4 and b.stats.rows == 16
    await b.aclose()


async def test_full_queue_raises_overloaded_with_retry_after(executor: concurrent.futures.Executor) -> None:
    model = Gated()
    b = make(model, executor, max_batch_rows=4, max_queue_rows=6, max_in_flight=1)
    first = asyncio.create_task(b.submit(cols(0)))
    await until(lambda: len(model.batches) == 1, "the first batch")
    queued = [asyncio.create_task(b.submit(cols(1, 2, 3))), asyncio.create_task(b.submit(cols(4, 5)))]
    await until(lambda: b.queue_rows == 5, "5 queued rows")
    with pytest.raises(Overloaded) as info:
        await b.submit(cols(6, 7))  # 5 + 2 > 6
    assert isinstance(info.value, TransientError)
    assert info.value.status == 429 and not info.value.draining
    assert info.value.retry_after is not None and info.value.retry_after > 0
    assert "queued" in str(info.value)
    ok = asyncio.create_task(b.submit(cols(6)))  # 5 + 1 fits
    await until(lambda: b.queue_rows == 6, "6 queued rows")
    model.release(10)
    await asyncio.gather(first, *queued, ok)
    assert b.stats.rejected == 1
    await b.aclose()


async def test_deadline_in_queue_is_never_run(executor: concurrent.futures.Executor) -> None:
    model = Gated()
    b = make(model, executor, max_in_flight=1)
    first = asyncio.create_task(b.submit(cols(1)))
    await until(lambda: len(model.batches) == 1, "the first batch")
    with pytest.raises(DeadlineExceeded, match="in the queue"):
        await b.submit(cols(-7), deadline=time.monotonic() + QUEUED_DEADLINE_S)
    assert b.queue_rows == 0
    later = asyncio.create_task(b.submit(cols(2)))
    model.release(2)
    await first
    assert (await later)["y"].tolist() == [4]
    assert model.batches == [[1], [2]]  # the expired -7 was never run (it would have failed the batch)
    assert b.stats.expired == 1
    await b.aclose()


async def test_deadline_while_running_and_already_past(executor: concurrent.futures.Executor) -> None:
    model = Gated()
    b = make(model, executor)
    with pytest.raises(DeadlineExceeded, match="before it was queued"):
        await b.submit(cols(1), deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded, match="while its batch was running"):
        await b.submit(cols(1), deadline=time.monotonic() + QUEUED_DEADLINE_S)
    model.release()
    await until(lambda: b.in_flight_rows == 0, "the abandoned batch to finish")
    assert (await asyncio.gather(b.submit(cols(3)), asyncio.to_thread(model.release)))[0]["y"].tolist() == [6]
    await b.aclose()


async def test_outputs_split_back_under_concurrency(executor: concurrent.futures.Executor) -> None:
    def model(c: Columns) -> Columns:
        time.sleep(0.002)  # give requests time to pile up
        return {"y": c["x"] * 2, "n": c["x"] + c["k"]}

    b = DynamicBatcher(model, max_batch_rows=32, max_wait_ms=1.0, max_queue_rows=10_000, executor=executor)
    rng = random.Random(7)
    requests = []
    for i in range(300):
        n = rng.randint(1, 7)
        x = np.arange(n, dtype=np.float64) + 1000 * i
        requests.append({"x": x, "k": np.full(n, float(i))})
    outs = await asyncio.gather(*(b.submit(r) for r in requests))
    for r, out in zip(requests, outs, strict=True):
        np.testing.assert_array_equal(out["y"], r["x"] * 2)
        np.testing.assert_array_equal(out["n"], r["x"] + r["k"])
    assert b.stats.requests == 300
    assert b.stats.batches < 300  # requests were batched together
    assert b.stats.max_batch <= 32
    await b.aclose()


async def test_run_error_reaches_exactly_its_batch(executor: concurrent.futures.Executor) -> None:
    model = Gated()
    b = make(model, executor, max_in_flight=1)
    first = asyncio.create_task(b.submit(cols(1)))
    await until(lambda: len(model.batches) == 1, "the first batch")
    a1 = asyncio.create_task(b.submit(cols(2)))
    a2 = asyncio.create_task(b.submit(cols(-3, 4)))
    await until(lambda: b.queue_rows == 3, "a1 and a2 queued")
    model.release()
    assert (await first)["y"].tolist() == [2]
    await until(lambda: len(model.batches) == 2, "the failing batch to start")
    c = asyncio.create_task(b.submit(cols(5)))
    await until(lambda: b.queue_rows == 1, "c queued")
    model.release(2)
    for t in (a1, a2):
        with pytest.raises(ValueError, match="negative x"):
            await t
    assert (await c)["y"].tolist() == [10]
    assert model.batches == [[1], [2, -3, 4], [5]]
    assert b.stats.failed_batches == 1
    await b.aclose()


async def test_cancelled_request_leaves_the_queue(executor: concurrent.futures.Executor) -> None:
    model = Gated()
    b = make(model, executor, max_in_flight=1)
    first = asyncio.create_task(b.submit(cols(1)))
    await until(lambda: len(model.batches) == 1, "the first batch")
    doomed = asyncio.create_task(b.submit(cols(-1, -2)))
    await until(lambda: b.queue_rows == 2, "doomed queued")
    doomed.cancel()
    await until(lambda: b.queue_rows == 0, "the cancelled rows to leave the queue")
    model.release(3)
    await first
    assert (await asyncio.gather(b.submit(cols(9)), asyncio.to_thread(model.release)))[0]["y"].tolist() == [
        18
    ]
    assert model.batches == [[1], [9]]
    await b.aclose()


async def test_aclose_drains_queued_work_then_refuses(executor: concurrent.futures.Executor) -> None:
    model = Gated()
    b = make(model, executor, max_in_flight=1)
    tasks = [asyncio.create_task(b.submit(cols(i))) for i in range(5)]
    await until(lambda: b.queue_rows == 4, "4 queued behind the first")
    closing = asyncio.create_task(b.aclose())
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as info:
        await b.submit(cols(1))
    assert info.value.draining and info.value.status == 503
    assert not closing.done()
    model.release(2)
    await asyncio.wait_for(closing, timeout=10)
    assert [(await t)["y"].tolist() for t in tasks] == [[0], [2], [4], [6], [8]]
    assert b.closed and b.queue_rows == 0 and b.in_flight_rows == 0


async def test_aclose_without_drain_fails_queued(executor: concurrent.futures.Executor) -> None:
    model = Gated()
    b = make(model, executor, max_in_flight=1)
    first = asyncio.create_task(b.submit(cols(1)))
    await until(lambda: len(model.batches) == 1, "the first batch")
    queued = asyncio.create_task(b.submit(cols(2)))
    await until(lambda: b.queue_rows == 1, "queued")
    closing = asyncio.create_task(b.aclose(drain=False))
    with pytest.raises(Overloaded):
        await queued
    model.release()
    await closing
    assert (await first)["y"].tolist() == [2]
    assert model.batches == [[1]]


async def test_requests_with_different_fields_are_run_per_field_set(
    executor: concurrent.futures.Executor,
) -> None:
    seen: list[tuple[str, ...]] = []

    def model(c: Columns) -> list[dict[str, float]]:
        seen.append(tuple(sorted(c)))
        extra = c.get("z", np.zeros(len(c["x"])))
        return [{"y": float(x + z)} for x, z in zip(c["x"], extra, strict=True)]

    gate = Gated()
    b = DynamicBatcher(
        lambda c: gate(c) if "block" in c else model(c),
        max_batch_rows=16,
        max_wait_ms=60_000,
        max_queue_rows=64,
        executor=executor,
        max_in_flight=1,
    )
    blocker = asyncio.create_task(b.submit({"x": np.zeros(1), "block": np.zeros(1)}))
    await until(lambda: len(gate.batches) == 1, "the blocker")
    t1 = asyncio.create_task(b.submit({"x": np.array([1.0, 2.0])}))
    t2 = asyncio.create_task(b.submit({"x": np.array([3.0]), "z": np.array([10.0])}))
    t3 = asyncio.create_task(b.submit({"x": np.array([4.0])}))
    await until(lambda: b.queue_rows == 4, "3 queued")
    gate.release()
    await blocker
    assert await t1 == [{"y": 1.0}, {"y": 2.0}]
    assert await t2 == [{"y": 13.0}]
    assert await t3 == [{"y": 4.0}]
    assert sorted(seen) == [("x",), ("x", "z")]  # one run per field set, in the same batch
    await b.aclose()


async def test_bad_arguments(executor: concurrent.futures.Executor) -> None:
    with pytest.raises(ConfigError, match="max_queue_rows"):
        make(Gated(), executor, max_batch_rows=8, max_queue_rows=4)
    with pytest.raises(ConfigError, match="max_batch_rows"):
        make(Gated(), executor, max_batch_rows=0)
    b = make(Gated(gated=False), executor, max_batch_rows=2)
    with pytest.raises(ValueError, match="max_batch_rows"):
        await b.submit(cols(1, 2, 3))
    with pytest.raises(ValueError, match="different lengths"):
        await b.submit({"x": np.zeros(2), "k": np.zeros(3)})
    assert row_count({}) == 0
    with pytest.raises(RuntimeError, match="returned 1 rows"):
        bad = DynamicBatcher(
            lambda c: {"y": c["x"][:1]}, max_batch_rows=4, max_wait_ms=0, max_queue_rows=4, executor=executor
        )
        await bad.submit(cols(1, 2))
    await b.aclose()


async def test_lone_request_on_an_idle_fast_model_runs_on_the_loop_concurrent_ones_batch(
    executor: concurrent.futures.ThreadPoolExecutor,
) -> None:
    model = Gated(gated=False)
    b = make(model, executor, inline_max_ms=1.0)
    b.clock = TickingClock(1e-6)  # every batch measures ~1 µs: fast, whatever the machine's load
    first = await b.submit({"x": np.array([1.0])})  # no measured batch time yet: the inference thread
    assert model.threads == {"test-infer_0"} and b.stats.inline_batches == 0
    model.threads.clear()
    lone = await b.submit({"x": np.array([2.0])})
    assert model.threads == {threading.current_thread().name} and b.stats.inline_batches == 1
    # requests arriving in the same loop iteration are not run one by one on the loop: they share a batch
    before = len(model.batches)
    outs = await asyncio.gather(*(b.submit({"x": np.array([float(i)])}) for i in range(5)))
    assert [o["y"].tolist() for o in outs] == [[2.0 * i] for i in range(5)]
    assert len(model.batches) - before == 1 and model.batches[-1] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert first["y"].tolist() == [2.0] and lone["y"].tolist() == [4.0]
    await b.aclose()


async def test_inline_disabled_or_slow_model_keeps_every_batch_on_the_executor(
    executor: concurrent.futures.ThreadPoolExecutor,
) -> None:
    model = Gated(gated=False)
    # inline disabled with a fast model (~1 µs per batch); a slow model (~1 s per batch) over inline_max_ms
    for inline_max_ms, step in ((0.0, 1e-6), (100.0, 1.0)):
        b = make(model, executor, inline_max_ms=inline_max_ms)
        b.clock = TickingClock(step)
        for i in range(3):
            await b.submit({"x": np.array([float(i)])})
        assert b.stats.inline_batches == 0
        await b.aclose()
    assert model.threads == {"test-infer_0"}


async def test_an_error_in_an_inline_batch_reaches_its_request_only(
    executor: concurrent.futures.ThreadPoolExecutor,
) -> None:
    b = make(Gated(gated=False), executor, inline_max_ms=1.0)
    b.clock = TickingClock(1e-6)
    await b.submit({"x": np.array([1.0])})
    with pytest.raises(ValueError, match="negative"):
        await b.submit({"x": np.array([-1.0])})
    assert b.stats.inline_batches == 1 and b.stats.failed_batches == 1
    assert (await b.submit({"x": np.array([3.0])}))["y"].tolist() == [6.0]
    await b.aclose()
