"""Fan-out overhead: one ingest of N vehicles as a single flow run, and as S shards run by W workers, on one
machine, through the same Prefect server and the same DIMO emulator.

Set-up (in a temp directory, all stopped at the end, also on Ctrl-C or an error): ``depin up --no-serve`` (a
SQLite Prefect server, or with ``--postgres`` one on a PostgreSQL started for the bench; the emulator with ``--vehicles N`` enforcing ``--rate`` requests/s per service, as
DIMO does), ``depin deploy --pool`` (a fresh process pool), a ``DimoCredentials`` block on the server (what
the workers resolve), and ``--workers`` ``prefect worker start --pool P --limit L`` processes, each with its
own working directory and Prefect home (``PREFECT_WORKER_QUERY_SECONDS`` = ``--worker-query-s``; Prefect's
default is 10). ``L`` defaults to enough slots for the parent and every shard at once. Use ``--postgres`` at the
default size: on SQLite (2026-12-07, 1,000 vehicles) the server answered 503 (database is locked) to shards'
rate-limit calls and two of the four shards failed (``pipelines.fleet_rate.admit`` now turns that into a
retried transient error; not re-measured on SQLite).

Both phases are flow runs of the deployment ``ingest-telemetry/on-demand``, picked up and run by the pool's
workers (a process per flow run, as in production), with the same window, signals, interval and rate:

- **sharded** (``shards=S``): the parent discovers the fleet, starts a child run for every shard but the first
  and ingests that one itself (``pipelines.shards``); every DIMO request of the shards is admitted by the
  fleet-wide Prefect rate limits (``pipelines.fleet_rate``);
- **single** (``shards=1``): one run ingests everything, its tasks sharing one pace per DIMO service (the normal
  single-host run).

The sharded phase runs first: vehicle-days the emulator simulates on first request and keeps (LRU) then
favour the single run, so the overhead is, if anything, overstated. Each phase is timed from creating the
flow run to seeing it final (polled every 0.2 s), into its own Delta table in a local directory (absolute
path: on one machine every worker writes the same table; object storage would only add its server's CPU to
both phases on a 2-core machine). Both tables must be equal (rows sorted, and the per-vehicle watermarks).

**The rate limit dominates**: each vehicle costs a token exchange and a telemetry query (more over long
windows), each service paced at ``--rate``, so a phase cannot take less than its busiest service's requests ÷
rate (about 100 s for 1,000 vehicles at DIMO's 10/s, 20 s for 200) whatever the number of shards. (Until
2026-12-07 each ingest task of 5 vehicles discovered the whole fleet again: 2,000 identity requests at 1,000
vehicles, the binding service; a run now discovers once and hands the vehicles to its tasks.) Sharding a license-bound ingest
cannot make it faster; it spreads the CPU over hosts. At the defaults (1,000 vehicles, 6 h, 10/s) the whole
bench takes about 12 minutes on 2 cores, nearly all of it waiting on the rate limit; ``--vehicles 200`` takes
about 4, ``--vehicles 40 --hours 2`` about 2. On 2 cores the workers share the
same CPUs too, so this bench measures the orchestration overhead (``sharded_s − single_s``, and per shard),
not a speed-up. ``requests_per_s`` is what the emulator passed per second of each phase (from its
``/healthz`` counters before and after); ``http_429`` the requests it refused (the fleet-wide limit must keep
it at 0).

The breakdown (from Prefect's state timestamps and each run's own result artifact) shows where the time goes:
worker pickup (created → Pending), process start (Pending → Running: interpreter, imports, flow load), the
flow body (the run's ``seconds``), and the rest (after the body until final). Peak RSS (``VmHWM``, sampled
every 0.5 s from ``/proc``) of the worker processes and of each flow-run process.

``--probe-admission`` then measures the fleet-wide limit alone against the same server: 20 × rate calls of
``pipelines.fleet_rate``'s ``rate_limit`` from one process and from ``--shards`` processes (8 at once in each,
the DIMO client's concurrency) on a ``dimo-rate-*``-like limit, and on a limit too wide to bind (the bare cost
of the Prefect call each DIMO request makes): ``admission_probe.*.per_s`` against ``rate``.

A phase that does not complete is reported (``states``, ``failures``), the other still runs, and the bench
exits 1. Last stdout line: one JSON object with ``single_s``, ``sharded_s``, ``overhead_s``, ``overhead_per_shard_s``,
``ratio`` (sharded ÷ single), ``requests_per_s``, ``http_429``, ``tables_equal``, ``peak_rss_mb`` and
``breakdown``. Target: ``overhead_per_shard_s`` ≤ 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from depin_core.proc import descendants, status_kb
from depin_core.proc.tree import stop_tree
from tests.support.up_stack import DEPIN, clean_env, last_json, up_args

TARGET_PER_SHARD_S = 2.0
END = datetime(2026, 1, 12, tzinfo=UTC)
DEPLOYMENT = "ingest-telemetry/on-demand"
SIGNALS = ["speed", "exteriorAirTemperature"]
POLL_S = 0.2
RUN_DEADLINE_S = 1800.0


def log(msg: str) -> None:
    print(f"[fanout {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class PeakSampler:
    """Samples the ``VmHWM`` of some roots and all their descendants every ``period_s``; keeps each pid's
    largest value (``VmHWM`` is already a peak, so a process is measured right if sampled once before it
    exits, which a run of more than a fraction of a second is)."""

    def __init__(self, roots: Any, period_s: float = 0.5) -> None:
        self._roots = roots
        self.period_s = period_s
        self.peak_kb: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            for root in list(self._roots()):
                for pid in {root, *descendants(root)}:
                    kb = status_kb(pid, "VmHWM")
                    if kb is not None and kb > self.peak_kb.get(pid, 0):
                        self.peak_kb[pid] = kb

    def mb(self, pid: int | None) -> float | None:
        return round(self.peak_kb[pid] / 1024, 1) if pid in self.peak_kb else None

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Stack:
    """``depin up`` in ``control``, the pool, the workers; :meth:`close` stops all of it."""

    root: Path
    env: dict[str, str]
    api: str = ""
    emulator: str = ""
    pool: str = ""
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    up: bool = False

    @property
    def control(self) -> Path:
        return self.root / "control"

    def depin(self, *args: str, timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
        done = subprocess.run(
            [*DEPIN, *args, "--json"],
            cwd=self.control,
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise SystemExit(f"bench failed: depin {args[0]} exited {done.returncode}: {done.stderr[-3000:]}")
        return last_json(done.stdout)

    def start(self, vehicles: int, days: float, rate: float, database_url: str | None = None) -> None:
        self.control.mkdir(parents=True)
        args = [*up_args(vehicles=vehicles, days=days), "--end", END.isoformat(), "--no-serve",
                "--emulator-rate-limit", str(rate), "--background"]  # fmt: skip
        if database_url:
            args += ["--database-url", database_url]
        self.up = True  # from here on `depin down` runs at the end, whatever happens
        doc = self.depin(*args, timeout=300)
        self.api, self.emulator = doc["api"], doc["emulator"]
        self.env = {**self.env, "PREFECT_API_URL": self.api}
        self.pool = f"fanout-{uuid.uuid4().hex[:6]}"
        self.depin("deploy", "--pool", self.pool, timeout=300)

    def start_worker(self, name: str, limit: int, query_s: float) -> None:
        """A worker 'host': its own directory and Prefect home."""
        home = self.root / name
        (home / "prefect").mkdir(parents=True, exist_ok=True)
        env = {
            **self.env,
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_WORKER_QUERY_SECONDS": str(query_s),
        }
        cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", self.pool, "--name", name,
               "--limit", str(limit)]  # fmt: skip
        with (home / "worker.log").open("ab") as out:
            self.workers[name] = subprocess.Popen(
                cmd, cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_workers_online(self, timeout_s: float = 180.0) -> None:
        """Until every worker has sent a heartbeat to the pool (so no phase pays for a worker's start-up)."""
        from prefect.client.orchestration import get_client

        deadline = time.monotonic() + timeout_s
        with get_client(sync_client=True) as client:
            while True:
                seen = {w.name for w in client.read_workers_for_work_pool(self.pool) if w.last_heartbeat_time}
                if seen >= set(self.workers):
                    return
                dead = [n for n, p in self.workers.items() if p.poll() is not None]
                if dead or time.monotonic() > deadline:
                    raise SystemExit(f"bench failed: workers not online: {dead or sorted(set(self.workers) - seen)}"
                                     f"\n{self.worker_logs()}")  # fmt: skip
                time.sleep(0.5)

    def worker_logs(self) -> str:
        return "\n".join(
            f"--- {n}:\n{(self.root / n / 'worker.log').read_text(errors='replace')[-3000:]}"
            for n in self.workers
        )

    def close(self) -> None:
        # a worker starts each flow run in a session of its own: stop those processes' groups too
        pids = {p.pid for p in self.workers.values() if p.poll() is None}
        pids |= {k for pid in list(pids) for k in descendants(pid)}
        groups = set()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(pid))
        stop_tree(groups, pids)
        for proc in self.workers.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        if self.up:
            subprocess.run([*DEPIN, "down"], cwd=self.control, env=self.env, capture_output=True, timeout=120)


def rate_counts(emulator: str) -> dict[str, dict[str, int]]:
    import httpx

    doc = httpx.get(f"{emulator}/healthz", timeout=30).json()
    if "rate_limit" not in doc:
        raise SystemExit("bench failed: the emulator reports no rate_limit counters (is --rate > 0?)")
    return {k: dict(doc["rate_limit"][k]) for k in ("passed", "limited")}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def _ts(state: Any) -> float:
    return float(state.timestamp.timestamp())


def run_times(client: Any, run: Any) -> dict[str, Any]:
    """From Prefect's state history: created → Pending (worker pickup) → Running (process start) → final,
    and the run's own body ``seconds`` (its result artifact)."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    from pipelines.shards import RESULT_ARTIFACT

    states = sorted(client.read_flow_run_states(run.id), key=_ts)
    first = {}
    for s in states:
        first.setdefault(s.type.value, _ts(s))
    created = run.created.timestamp()
    arts = client.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[RESULT_ARTIFACT])),
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
    )
    data = arts[-1].data if arts else "[]"
    rows = json.loads(data) if isinstance(data, str) else data
    result = dict(rows[0]) if rows else {}
    final = _ts(states[-1])
    tasks: list[Any] = []
    while page := client.read_task_runs(  # the API answers at most 200 per call: page through them
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])), offset=len(tasks), limit=200
    ):
        tasks += page
    spans: dict[str, list[float]] = {}
    for t in tasks:
        if t.start_time and t.end_time:
            kind = next((k for k in ("discover", "ingest", "dataset-info") if t.name.startswith(k)), "other")
            span = spans.setdefault(kind, [t.start_time.timestamp(), t.end_time.timestamp()])
            span[0], span[1] = min(span[0], t.start_time.timestamp()), max(span[1], t.end_time.timestamp())
    out = {
        "created": created,
        "pending": first.get("PENDING"),
        "running": first.get("RUNNING"),
        "final": final,
        "body_s": result.get("seconds"),
        "requests": result.get("requests"),
        "new_rows": result.get("new_rows"),
        "pid": int(run.infrastructure_pid.rsplit(":", 1)[-1]) if run.infrastructure_pid else None,
        "worker": run.labels.get("prefect.worker.name") if run.labels else None,
        "state": run.state.type.value if run.state else None,
    }
    if "discover" in spans:
        out["discover_s"] = round(spans["discover"][1] - spans["discover"][0], 3)
        if "ingest" in spans:  # discover's end → the first ingest task's start (planning, submitting)
            out["discover_to_ingest_s"] = round(spans["ingest"][0] - spans["discover"][1], 3)
    if "ingest" in spans:  # the ingest tasks, first start to last end
        out["ingest_tasks_s"] = round(spans["ingest"][1] - spans["ingest"][0], 3)
    if (
        "dataset-info" in spans
    ):  # the dataset-wide report: dataset-info, artifacts and plots, to the run's end
        out["report_s"] = round(final - spans["dataset-info"][0], 3)
    if out["running"] and "discover" in spans:  # Running → the first task (flow set-up, parameters, settings)
        out["running_to_discover_s"] = round(spans["discover"][0] - out["running"], 3)
    if out["pending"] and out["running"]:
        out["pickup_s"] = round(out["pending"] - created, 3)
        out["process_start_s"] = round(out["running"] - out["pending"], 3)
        out["after_body_s"] = round(final - out["running"] - (out["body_s"] or 0.0), 3)
    return out


def run_phase(stack: Stack, name: str, params: dict[str, Any], sampler: PeakSampler) -> dict[str, Any]:
    """Create one flow run of the deployment, wait until it is final; its time, requests and breakdown."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    before = rate_counts(stack.emulator)
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(DEPLOYMENT)
        t0 = time.perf_counter()
        run = client.create_flow_run_from_deployment(
            dep.id, parameters={"params": params}, name=f"bench-{name}"
        )
        deadline = time.monotonic() + RUN_DEADLINE_S
        while True:
            run = client.read_flow_run(run.id)
            if run.state is not None and run.state.is_final():
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"bench failed: {name} still {run.state_name}\n{stack.worker_logs()}")
            time.sleep(POLL_S)
        seconds = time.perf_counter() - t0
        if not run.state.is_completed():  # reported (state, message), not fatal: the other phase still runs
            log(f"{name} ended {run.state_name}: {run.state.message}")
        after = rate_counts(stack.emulator)
        parent = run_times(client, run)
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id]))
        )
        kids = sorted((run_times(client, c) for c in children), key=lambda k: k["created"])
    passed, limited = delta(after["passed"], before["passed"]), delta(after["limited"], before["limited"])
    for r in [parent, *kids]:
        r["peak_rss_mb"] = sampler.mb(r["pid"])
    return {
        "state": run.state.type.value,
        "message": "" if run.state.is_completed() else (run.state.message or "")[:500],
        "seconds": seconds,
        "passed": passed,
        "limited": limited,
        "requests_per_s": round(sum(passed.values()) / seconds, 2),
        "parent": parent,
        "children": kids,
    }


def compare_tables(a: Path, b: Path) -> tuple[bool, int, str]:
    """(equal, rows, why not): sorted rows, keys and the per-vehicle watermarks of two tables; float values
    to the last bits (``tests.support.telemetry_tables.table_differences``: the emulator's parallel means may
    round the last bit differently when a vehicle is fetched again, as the second phase does)."""
    from connectors.dimo.store import TelemetryStore
    from tests.support.telemetry_tables import table_differences

    sa, sb = TelemetryStore(str(a)), TelemetryStore(str(b))
    differ = table_differences(sa, sb)
    return not differ, sa.summary(count_vehicles=False).rows, "; ".join(differ)  # rows from the log: no read


def breakdown(phase: dict[str, Any]) -> dict[str, Any]:
    """Where a phase's time went, relative to its parent run's creation (seconds)."""
    p, kids = phase["parent"], phase["children"]
    t0 = p["created"]
    out: dict[str, Any] = {
        "pickup_s": p.get("pickup_s"),
        "process_start_s": p.get("process_start_s"),
        "body_s": p["body_s"],
        "after_body_s": p.get("after_body_s"),
        "running_to_discover_s": p.get("running_to_discover_s"),
        "discover_s": p.get("discover_s"),
        "discover_to_ingest_s": p.get("discover_to_ingest_s"),
        "ingest_tasks_s": p.get("ingest_tasks_s"),
        "report_s": p.get("report_s"),
        "seen_final_after_s": round(phase["seconds"] - (p["final"] - t0), 3),
    }
    if kids:
        out["first_child_created_s"] = round(kids[0]["created"] - t0, 3)
        out["last_child_created_s"] = round(kids[-1]["created"] - t0, 3)
        out["children_running_s"] = [round(k["running"] - t0, 3) for k in kids if k["running"]]
        out["children_final_s"] = [round(k["final"] - t0, 3) for k in kids]
        out["children_pickup_s"] = [k.get("pickup_s") for k in kids]
        out["children_process_start_s"] = [k.get("process_start_s") for k in kids]
        out["children_body_s"] = [k["body_s"] for k in kids]
        out["children_after_body_s"] = [k.get("after_body_s") for k in kids]
        for key in (
            "running_to_discover_s",
            "discover_s",
            "discover_to_ingest_s",
            "ingest_tasks_s",
            "report_s",
        ):
            out[f"children_{key}"] = [k.get(key) for k in kids]
        out["children_requests"] = [k["requests"] for k in kids]
        out["children_workers"] = [k["worker"] for k in kids]
        out["last_child_final_to_parent_final_s"] = round(p["final"] - max(k["final"] for k in kids), 3)
    return out


def _admit_many(api: str, name: str, n: int, callers: int, out: Any) -> None:
    """(In a child process) ``n`` admissions through ``fleet_rate``'s call, ``callers`` at once; puts
    (wall seconds, latencies)."""
    import asyncio

    os.environ["PREFECT_API_URL"] = api
    from prefect.concurrency.asyncio import rate_limit

    from pipelines.fleet_rate import UNITS

    async def main() -> tuple[float, list[float]]:
        lat: list[float] = []
        gate = asyncio.Semaphore(callers)

        async def one() -> None:
            async with gate:
                t = time.perf_counter()
                await rate_limit(name, occupy=UNITS, strict=True)
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return time.perf_counter() - t0, lat

    out.put(asyncio.run(main()))


def probe_admission(api: str, rate: float, processes: int, total: int, callers: int = 8) -> dict[str, Any]:
    """What ``pipelines.fleet_rate.admit`` can pass: ``total`` admissions from ``processes`` processes with
    ``callers`` concurrent requests each (the DIMO client's default concurrency), on a limit like
    ``dimo-rate-*`` (``burst(rate)`` requests of ``UNITS`` slots, decaying at ``rate``/s) and on one too wide
    to bind (the bare cost of the Prefect API call per request)."""
    import multiprocessing as mp

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from pipelines.fleet_rate import UNITS, burst

    cases = {
        "unbound_1_process": (1e6, 1),
        "at_rate_1_process": (rate, 1),
        "at_rate_shards": (rate, processes),
    }
    ctx = mp.get_context("spawn")
    results = {}
    with get_client(sync_client=True) as client:
        for case, (r, procs) in cases.items():
            name = f"bench-probe-{case}"
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(
                    name=name, limit=burst(r) * UNITS, slot_decay_per_second=r * UNITS
                )
            )
            q = ctx.Queue()
            ps = [
                ctx.Process(target=_admit_many, args=(api, name, total // procs, callers, q))
                for _ in range(procs)
            ]
            for pr in ps:
                pr.start()
            got = [q.get(timeout=600) for _ in ps]
            for pr in ps:
                pr.join()
            wall = max(w for w, _ in got)
            lat = sorted(x for _, ls in got for x in ls)
            results[case] = {
                "processes": procs,
                "admissions": len(lat),
                "per_s": round(len(lat) / wall, 2),
                "latency_p50_ms": round(1000 * lat[len(lat) // 2], 1),
                "latency_max_ms": round(1000 * lat[-1], 1),
            }
            client.delete_global_concurrency_limit_by_name(name)
    return {"rate": rate, "callers_per_process": callers, **results}


@contextlib.contextmanager
def stopped_on_sigterm() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, so the ``finally`` blocks stop every process started."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--vehicles", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--worker-limit",
        type=int,
        default=0,
        help="flow runs per worker at once (0: parent + all shards fit)",
    )
    ap.add_argument(
        "--worker-query-s", type=float, default=1.0, help="PREFECT_WORKER_QUERY_SECONDS of workers"
    )
    ap.add_argument(
        "--hours", type=float, default=6.0, help="window: the last HOURS before the history's end"
    )
    ap.add_argument("--interval", default="1m")
    ap.add_argument("--rate", type=float, default=10.0, help="license rate (requests/s per DIMO service), >0")
    ap.add_argument(
        "--probe-admission",
        action="store_true",
        help="also measure the fleet-wide rate limit's admissions alone (20 × rate, 1 and --shards processes)",
    )
    ap.add_argument(
        "--postgres",
        action="store_true",
        help="run the Prefect server on a PostgreSQL started for the bench (Debian's binaries), not SQLite",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp directory (tables, logs)")
    args = ap.parse_args()
    if args.rate <= 0:
        ap.error("--rate must be > 0 (the emulator's counters exist only with its rate limit on)")
    limit = args.worker_limit or math.ceil((args.shards + 1) / args.workers)
    since = END - timedelta(hours=args.hours)
    base = {"since": since.isoformat(), "until": END.isoformat(), "interval": args.interval,
            "signals": SIGNALS, "rate_limit_per_s": args.rate}  # fmt: skip

    work = Path(tempfile.mkdtemp(prefix="depin-bench-fanout-"))
    os.environ["PREFECT_HOME"] = str(work / "bench-prefect")  # this process's client: not ~/.prefect
    env = {
        **clean_env(),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env["DEPIN_DIMO_RATE_LIMIT_PER_S"] = str(args.rate)
    stack = Stack(work, env)
    t_setup = time.perf_counter()
    cleanup = contextlib.ExitStack()
    try:
        with stopped_on_sigterm():
            database_url = None
            if args.postgres:
                from tests.support.postgres import PostgresServer, bin_dir

                if (bindir := bin_dir()) is None:
                    raise SystemExit("bench failed: --postgres: PostgreSQL's initdb/pg_ctl not found")
                database_url = cleanup.enter_context(PostgresServer(bindir)).url
            stack.start(args.vehicles, max(1.0, args.hours / 24), args.rate, database_url)
            os.environ["PREFECT_API_URL"] = stack.api
            from connectors.dimo.settings import DimoSettings
            from pipelines.blocks import DimoCredentials

            creds = DimoSettings.from_credentials_file(stack.control / ".depin/emulator/credentials.json")
            DimoCredentials.from_settings(creds).save("dimo", overwrite=True)  # what the workers resolve
            for i in range(args.workers):
                stack.start_worker(f"worker-{i}", limit, args.worker_query_s)
            stack.wait_workers_online()
            log(f"stack up in {time.perf_counter() - t_setup:.1f}s: {args.workers} workers (limit {limit})")
            roots = lambda: [p.pid for p in stack.workers.values()]  # noqa: E731
            with PeakSampler(roots) as sampler:
                log(f"sharded: {args.vehicles} vehicles in {args.shards} shards")
                sharded = run_phase(
                    stack,
                    "sharded",
                    {**base, "dataset": str(work / "sharded"), "shards": args.shards},
                    sampler,
                )
                log(f"sharded: {sharded['seconds']:.1f}s; single: {args.vehicles} vehicles in one run")
                single = run_phase(
                    stack, "single", {**base, "dataset": str(work / "single"), "shards": 1}, sampler
                )
                log(f"single: {single['seconds']:.1f}s")
                worker_rss = [sampler.mb(p.pid) for p in stack.workers.values()]
            admission = None
            if args.probe_admission:
                log("probing the fleet-wide rate limit's admissions")
                admission = probe_admission(stack.api, args.rate, args.shards, int(20 * args.rate))
        if "COMPLETED" in (single["state"], sharded["state"]) and single["state"] != sharded["state"]:
            equal, rows, why = False, 0, f"single {single['state']}, sharded {sharded['state']}"
        else:
            equal, rows, why = compare_tables(work / "single", work / "sharded")
    finally:
        stack.close()
        cleanup.close()  # the PostgreSQL server, after the Prefect server that uses it
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    overhead = sharded["seconds"] - single["seconds"]
    shard_rss = [k["peak_rss_mb"] for k in sharded["children"] if k["peak_rss_mb"] is not None]
    out = {
        "vehicles": args.vehicles,
        "shards": args.shards,
        "shard_runs": len(sharded["children"]),  # child runs: the parent ingests the first shard itself
        "workers": args.workers,
        "worker_limit": limit,
        "worker_query_s": args.worker_query_s,
        "hours": args.hours,
        "interval": args.interval,
        "rate": args.rate,
        "rows": rows,
        "database": "postgresql" if args.postgres else "sqlite",
        "states": {"single": single["state"], "sharded": sharded["state"]},
        "failures": {k: v["message"] for k, v in (("single", single), ("sharded", sharded)) if v["message"]},
        "single_s": round(single["seconds"], 3),
        "sharded_s": round(sharded["seconds"], 3),
        "overhead_s": round(overhead, 3),
        "overhead_per_shard_s": round(overhead / args.shards, 3),
        "ratio": round(sharded["seconds"] / single["seconds"], 3),
        "requests_per_s": {"single": single["requests_per_s"], "sharded": sharded["requests_per_s"]},
        "requests": {"single": single["passed"], "sharded": sharded["passed"]},
        "http_429": sum(single["limited"].values()) + sum(sharded["limited"].values()),
        "http_429_by_phase": {"single": single["limited"], "sharded": sharded["limited"]},
        "tables_equal": equal,
        "peak_rss_mb": {
            "workers": worker_rss,
            "single_run": single["parent"]["peak_rss_mb"],
            "sharded_parent": sharded["parent"]["peak_rss_mb"],
            "shard_max": max(shard_rss) if shard_rss else None,
        },
        "breakdown": {"single": breakdown(single), "sharded": breakdown(sharded)},
        "target_overhead_per_shard_s": TARGET_PER_SHARD_S,
    }
    if admission is not None:
        out["admission_probe"] = admission
    b = out["breakdown"]
    print(f"{args.vehicles} vehicles, {args.hours:g} h at {args.interval}, {len(SIGNALS)} signals, {rows:,} rows; "
          f"license rate {args.rate:g}/s per service, enforced by the emulator")  # fmt: skip
    print(f"single  (1 run):                {single['seconds']:8.1f} s  body {b['single']['body_s']} s, "
          f"{single['requests_per_s']:.1f} requests/s passed, {sum(single['limited'].values())} × 429")  # fmt: skip
    print(f"sharded ({args.shards} shards: the parent and {len(sharded['children'])} child runs on {args.workers} workers): "
          f"{sharded['seconds']:8.1f} s  "
          f"shard bodies {b['sharded'].get('children_body_s')} s, {sharded['requests_per_s']:.1f} requests/s "
          f"passed, {sum(sharded['limited'].values())} × 429")  # fmt: skip
    print(f"overhead: {overhead:.1f} s, {overhead / args.shards:.2f} s per shard (target ≤ {TARGET_PER_SHARD_S:g}); "
          f"sharded/single {out['ratio']:.2f}; tables equal: {equal} {why}")  # fmt: skip
    print("(one machine: the workers share its cores, so this is the orchestration overhead, not a speed-up)")
    print(json.dumps(out))
    if not equal or out["failures"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
