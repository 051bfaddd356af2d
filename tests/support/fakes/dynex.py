"""A fake Dynex service (``dynex.sdk.v2.SDK``, gRPC) on loopback, built on the stubs the ``dynex`` SDK ships
(``dynex.proto.sdk_pb2[_grpc]``, ``sampleset_batch_pb2``, ``solution_envelope_pb2``), so the wire format is the
SDK's own. It really solves what it receives, with dwave-samplers' simulated annealing.

What the official ``DynexSampler`` 1.4.7 does on the wire, and what this fake answers:

1. ``CreateJob`` (client stream), metadata ``authorization: Bearer <key>`` and ``dynex-sdk-version``:
   ``init`` (``JobNewOpts``: ``max_steps`` = annealing_time, ``num_reads``, ``block_fee`` in nanoDNX, ``rank``,
   ``shots``, ``compute_backend``, ...) then one ``job_data`` (the QUBO as ``row``/``col``/``val`` arrays over
   variable indexes, ``offset``, ``num_vars``; the SDK's 8 sentinel clauses stay on the client). A
   server answering ``INVALID_ARGUMENT "unsupported payload"`` makes the SDK send the same QUBO again as
   ``chunk``s of text (``p qubo <num_vars> <n> <offset>`` then ``<row> <col> <val>`` lines, ``%g``):
   ``legacy_wcnf=True`` answers so. The reply carries ``job_id`` and ``real_price_per_block`` (nanoDNX).
2. ``SubscribeJob(job_id, from_seq)`` (server stream): ``JOB_STATUS`` running, ``PROGRESS``, then one
   ``SOLUTION_NEW`` whose ``envelope`` is an inline (base64 of zstd) ``SampleSetBatch``
   (``format="sampleset-batch-v1"``: voltages bit-packed LSB first, one energy per solution, the ``rank``
   best reads), or an ``ERROR`` event. Events after ``from_seq`` only; the stream stays open until the client
   cancels it (the SDK does once it has its solutions).
3. ``FinishJob(job_id, min_loc, min_energy)``, or ``CancelJob`` when the SDK gives up (error, timeout).
   ``UpdateJob`` and ``ListAtomics`` are answered too; ``DownloadSolution`` (not used for inline
   envelopes) is not implemented.

Simplified: one in-memory job table; no presigned URLs, chunked batches, clones, QPU matrix stats or QASM;
a wrong key is refused with ``UNAUTHENTICATED`` on every call; the price check (a job whose ``block_fee``
is non-zero and below ``price_per_block`` is refused with ``FAILED_PRECONDITION``) is this fake's choice, as
Dynex does not document what its service does with too low a fee.

Failure injection (``failure=``): ``unavailable`` (``CreateJob`` answers ``UNAVAILABLE``), ``timeout`` (the job
never finishes), ``error`` (an ``ERROR`` event), ``wrong`` (a poor assignment, its true energy), ``lie`` (the same
poor assignment claiming the best energy found), ``short`` (solutions missing the last variable),
``unauthenticated`` (every key refused).
Seen: ``calls`` (RPC name and metadata of each call), ``jobs`` (what each ``CreateJob`` carried).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Literal

import dimod
import grpc
import numpy as np
import zstandard
from dwave.samplers import SimulatedAnnealingSampler
from dynex.proto import sampleset_batch_pb2, sdk_pb2, sdk_pb2_grpc, solution_envelope_pb2

Failure = Literal["unavailable", "timeout", "error", "wrong", "lie", "short", "unauthenticated"]
FAILURES: tuple[str, ...] = ("unavailable", "timeout", "error", "wrong", "lie", "short", "unauthenticated")
Event = sdk_pb2.JobEvent


@dataclass
class Call:
    name: str
    metadata: dict[str, str]


@dataclass
class Job:
    """One ``CreateJob``: its options, how the QUBO came (``job_data`` or ``wcnf`` chunks), the QUBO itself."""

    job_id: str
    opts: Any  # sdk_pb2.JobNewOpts
    payload: str
    qubo: dimod.BinaryQuadraticModel
    num_vars: int
    events: list[Any] = field(default_factory=list)
    state: str = "running"  # running | finished | cancelled | failed
    finish: tuple[int, float] | None = None


def qubo_from_arrays(
    num_vars: int, rows: Any, cols: Any, vals: Any, offset: float
) -> dimod.BinaryQuadraticModel:
    """The QUBO over variables ``0..num_vars-1`` that ``row``/``col``/``val`` entries describe."""
    bqm = dimod.BinaryQuadraticModel(dimod.BINARY)
    bqm.add_variables_from((v, 0.0) for v in range(num_vars))
    for r, c, v in zip(rows, cols, vals, strict=True):
        if r == c:
            bqm.add_linear(int(r), float(v))
        else:
            bqm.add_quadratic(int(r), int(c), float(v))
    bqm.offset = float(offset)
    return bqm


def qubo_from_wcnf(text: str) -> tuple[int, dimod.BinaryQuadraticModel]:
    """``p qubo <num_vars> <entries> <offset>`` then ``<row> <col> <val>`` lines (the SDK's legacy upload)."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    head = lines[0]
    if head[:2] != ["p", "qubo"] or len(lines) - 1 != int(head[3]):
        raise ValueError(f"not a QUBO upload: {' '.join(head)!r}")
    num_vars = int(head[2])
    entries = [(int(r), int(c), float(v)) for r, c, v in lines[1:]]
    rows, cols, vals = zip(*entries, strict=True) if entries else ((), (), ())
    return num_vars, qubo_from_arrays(num_vars, rows, cols, vals, float(head[4]))


def pack_voltages(samples: np.ndarray) -> bytes:
    """Solutions (rows of 0/1) bit-packed LSB first, ``ceil(num_variables/8)`` bytes each."""
    return np.packbits(samples.astype(np.uint8), axis=1, bitorder="little").tobytes()


class _Servicer(sdk_pb2_grpc.SDKServicer):
    def __init__(self, fake: FakeDynex) -> None:
        self.fake = fake

    # -- helpers --
    def _enter(self, name: str, context: grpc.ServicerContext) -> None:
        metadata = {k: v for k, v in context.invocation_metadata()}
        with self.fake.cond:
            self.fake.calls.append(Call(name, metadata))
        bearer = metadata.get("authorization", "")
        if self.fake.failure == "unauthenticated" or bearer != f"Bearer {self.fake.key}":
            detail = f"invalid API key ({bearer})" if self.fake.echo_auth else "invalid API key"
            context.abort(grpc.StatusCode.UNAUTHENTICATED, detail)

    def _job(self, job_id: str, context: grpc.ServicerContext) -> Job:
        with self.fake.cond:
            job = self.fake.jobs.get(job_id)
        if job is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"job {job_id!r} not found")
        return job

    # -- RPCs --
    def CreateJob(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        self._enter("CreateJob", context)
        if self.fake.failure == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "no workers available")
        init, data, chunks = None, None, []
        for request in request_iterator:
            kind = request.WhichOneof("payload")
            if kind == "init":
                init = request.init
            elif kind == "job_data":
                if self.fake.legacy_wcnf:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unsupported payload: job_data")
                data = request.job_data
            elif kind == "chunk":
                chunks.append(request.chunk.data)
        if init is None or (data is None and not chunks):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a job needs init, then job_data or chunks")
        if data is not None:
            payload, num_vars = "job_data", int(data.num_vars)
            qubo = qubo_from_arrays(num_vars, data.row, data.col, data.val, data.offset)
        else:
            payload = "wcnf"
            try:
                num_vars, qubo = qubo_from_wcnf(b"".join(chunks).decode())
            except (ValueError, IndexError, UnicodeDecodeError) as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unreadable job file: {exc}")
        price = self.fake.price_nano
        if price and init.opts.block_fee and init.opts.block_fee < price:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"block_fee {init.opts.block_fee} is below the current price per block {price}",
            )
        job = Job(f"job-{next(self.fake.ids)}", init.opts, payload, qubo, num_vars)
        with self.fake.cond:
            self.fake.jobs[job.job_id] = job
        self.fake.start_solving(job)
        return sdk_pb2.CreateJobReply(job_id=job.job_id, real_price_per_block=price)

    def SubscribeJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("SubscribeJob", context)
        job = self._job(request.job_id, context)
        sent = int(request.from_seq)
        while True:
            with self.fake.cond:
                # Bounded wait: a client that cancels is noticed by polling context.is_active().
                while not self.fake.stopping and context.is_active() and len(job.events) <= sent:
                    self.fake.cond.wait(0.2)
                if self.fake.stopping or not context.is_active():
                    return
                batch = job.events[sent:]
            for event in batch:
                sent = event.seq
                yield event

    def FinishJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("FinishJob", context)
        job = self._job(request.job_id, context)
        with self.fake.cond:
            job.state, job.finish = "finished", (request.min_loc, request.min_energy)
        return sdk_pb2.FinishJobReply(
            job_id=job.job_id, min_loc=request.min_loc, min_energy=request.min_energy
        )

    def CancelJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("CancelJob", context)
        job = self._job(request.job_id, context)
        with self.fake.cond:
            job.state = "cancelled"
            self.fake.cond.notify_all()
        return sdk_pb2.CancelJobReply(job_id=job.job_id)

    def UpdateJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("UpdateJob", context)
        job = self._job(request.job_id, context)
        return sdk_pb2.UpdateJobReply(job_id=job.job_id)

    def ListAtomics(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("ListAtomics", context)
        self._job(request.job_id, context)
        return sdk_pb2.ListAtomicsReply()


class FakeDynex:
    """The fake service on ``127.0.0.1:<free port>`` (``endpoint``); a context manager that always stops it.

    ``key`` is the one SDK key accepted; ``price_per_block`` (DNX) the price it quotes; ``echo_auth`` puts the
    ``authorization`` it got into its refusal (a careless service); ``seed`` makes the annealing repeatable."""

    def __init__(
        self,
        *,
        key: str = "fake-dynex-sdk-key-0123456789",
        failure: Failure | None = None,
        price_per_block: float = 0.0,
        legacy_wcnf: bool = False,
        echo_auth: bool = False,
        seed: int = 7,
    ) -> None:
        if failure is not None and failure not in FAILURES:
            raise ValueError(f"failure must be one of {FAILURES}, not {failure!r}")
        self.key, self.failure, self.legacy_wcnf, self.seed = key, failure, legacy_wcnf, seed
        self.echo_auth = echo_auth
        self.price_nano = round(price_per_block * 1_000_000_000)
        self.calls: list[Call] = []
        self.jobs: dict[str, Job] = {}
        self.ids = itertools.count(1)
        self.cond = threading.Condition()
        self.stopping = False
        self.endpoint = ""
        self._server: grpc.Server | None = None
        self._workers: list[threading.Thread] = []

    # -- lifecycle --
    def start(self) -> FakeDynex:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="fake-dynex"))
        sdk_pb2_grpc.add_SDKServicer_to_server(_Servicer(self), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server, self.endpoint = server, f"127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self._server is not None:
            self._server.stop(grace=None).wait(10)
            self._server = None
        for worker in self._workers:
            worker.join(10)

    def __enter__(self) -> FakeDynex:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests read --
    def rpc_names(self) -> list[str]:
        with self.cond:
            return [c.name for c in self.calls]

    def last_job(self) -> Job:
        with self.cond:
            return list(self.jobs.values())[-1]

    # -- solving --
    def start_solving(self, job: Job) -> None:
        worker = threading.Thread(
            target=self._solve, args=(job,), daemon=True, name=f"fake-dynex-{job.job_id}"
        )
        self._workers.append(worker)
        worker.start()

    def _emit(self, job: Job, kind: int, **payload: Any) -> None:
        with self.cond:
            event = Event(job_id=job.job_id, seq=len(job.events) + 1, type=kind, **payload)
            event.ts.GetCurrentTime()
            job.events.append(event)
            self.cond.notify_all()

    def _solve(self, job: Job) -> None:
        self._emit(job, Event.JOB_STATUS, status=sdk_pb2.JobStatus(state="RUNNING"))
        self._emit(
            job, Event.PROGRESS, progress=sdk_pb2.Progress(percent=0.0, phase="annealing", backend="fake")
        )
        if self.failure == "timeout":
            return  # running for ever
        if self.failure == "error":
            with self.cond:
                job.state = "failed"
            self._emit(
                job, Event.ERROR, error=sdk_pb2.ErrorInfo(code="WORKER_FAILED", message="all workers failed")
            )
            return
        samples, energies = self._anneal(job)
        self._emit(
            job, Event.PROGRESS, progress=sdk_pb2.Progress(percent=100.0, phase="done", backend="fake")
        )
        self._emit(job, Event.SOLUTION_NEW, envelope=self._envelope(job, samples, energies))

    def _anneal(self, job: Job) -> tuple[np.ndarray, list[float]]:
        """The ``rank`` best reads and their energies."""
        labels = list(range(job.num_vars))
        reads, sweeps = max(int(job.opts.num_reads), 1), max(int(job.opts.max_steps), 10)
        sampler = SimulatedAnnealingSampler()
        best = sampler.sample(job.qubo, num_reads=reads, num_sweeps=sweeps, seed=self.seed)
        source = best
        if self.failure in ("wrong", "lie"):
            # A poor assignment: the best of the negated model is about the worst of the model.
            negated = dimod.BinaryQuadraticModel(
                {v: -b for v, b in job.qubo.linear.items()},
                {uv: -b for uv, b in job.qubo.quadratic.items()},
                -job.qubo.offset,
                dimod.BINARY,
            )
            source = sampler.sample(negated, num_reads=reads, num_sweeps=sweeps, seed=self.seed)
        chosen = source.truncate(max(int(job.opts.rank), 1))
        rows = chosen.record.sample[:, [chosen.variables.index(v) for v in labels]].astype(np.uint8)
        energies = [float(e) for e in job.qubo.energies((rows, labels))]
        if self.failure == "lie":
            energies = [float(best.first.energy)] * len(energies)
        if self.failure == "short":
            rows = rows[:, :-1]
        return rows, energies

    def _envelope(self, job: Job, rows: np.ndarray, energies: list[float]) -> Any:
        batch = sampleset_batch_pb2.SampleSetBatch(
            num_variables=rows.shape[1], packed_voltages=pack_voltages(rows), energies=energies
        )
        raw = batch.SerializeToString()
        packed = zstandard.ZstdCompressor().compress(raw)
        return solution_envelope_pb2.SolutionEnvelope(
            job_id=job.job_id,
            kind="inline",
            data=base64.b64encode(packed).decode(),
            name=f"{job.job_id}.batch",
            size=len(raw),
            compressed_size=len(packed),
            compression="zstd",
            checksum=hashlib.sha256(raw).hexdigest(),
            valid=True,
            format="sampleset-batch-v1",
            chunk_index=0,
            chunk_count=1,
            first_solution_index=0,
            total_solutions=len(energies),
        )


__all__ = ["FAILURES", "Call", "FakeDynex", "Job", "pack_voltages", "qubo_from_arrays", "qubo_from_wcnf"]
