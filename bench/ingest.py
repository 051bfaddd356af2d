"""Connector ingest benchmark: DIMO emulator → DimoClient → Arrow, against baselines from the same run.

1. **connector**: ``DimoClient.fetch_fleet`` for every vehicle (discovery, token exchange, planned and
   concurrent telemetry requests, pages parsed into Arrow tables).
2. **naive**: the same telemetry requests one at a time with ``httpx`` + stdlib ``json`` +
   ``pa.Table.from_pylist`` — what a first script would do.
3. **naive concurrent**: the naive parsing, but the requests at the connector's concurrency — so the gain
   from concurrency (naive → naive concurrent) and from parsing (naive concurrent → connector) show apart.
4. **ceiling**: the same requests at the connector's concurrency, bytes read and discarded (fetch only).
5. **sdk**: DIMO's official Python SDK (dimo-python-sdk 1.8.0, in its own venv ``.venv-dimo-sdk``, built on
   first use) as its samples use it: one call at a time, its own auth and token exchanges, the same queries
   (signals, window, buckets) through ``Telemetry.query``, responses kept as dicts (``bench/sdk_ingest.py``).

Modes 2-4 replay the connector's recorded telemetry requests with its tokens, so they skip discovery, auth
and token exchanges, which modes 1 and 5 pay (it matters only for small runs). All HTTP clients of modes 1-4
use the connector's socket options (``TCP_NODELAY``; the SDK's ``requests``/urllib3 sets it by default).
The emulator runs pinned to CPU 1 and the clients to CPU 0 (when there are 2+ cores), so the numbers
measure the client. Each mode runs ``--repeat`` times, interleaved; the
best run counts. Every mode must see the connector's row count or the run fails. Absolute numbers are noisy
here: read the ratios. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from connectors.dimo._http import NO_DELAY
from connectors.dimo.client import DimoClient
from connectors.dimo.emulator.server import EmulatorProcess
from connectors.dimo.emulator.state import EmulatorConfig
from connectors.dimo.settings import DimoSettings
from connectors.dimo.store import TelemetryStore
from tests.support.client_venvs import DIMO_SDK, InstallError

Recorded = list[tuple[str, dict[str, str], bytes]]


def _limits(concurrency: int) -> httpx.Limits:
    return httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)


class RecordingTransport(httpx.AsyncBaseTransport):
    """Records ``signals`` requests (url, headers, body) so the baselines can replay exactly the same ones."""

    def __init__(self) -> None:
        # one transport for all of the client's services; with max_concurrency as its connection limit the
        # recording run hung, so it keeps httpx's default limits
        self.inner = httpx.AsyncHTTPTransport(socket_options=NO_DELAY)
        self.requests: Recorded = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread() if request.url.path.endswith("/telemetry/query") else b""
        if b"signals(tokenId" in body:
            self.requests.append(
                (
                    str(request.url),
                    {"authorization": request.headers["authorization"], "content-type": "application/json"},
                    body,
                )
            )
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def run_connector(
    settings: DimoSettings,
    since: datetime,
    until: datetime,
    interval: timedelta,
    signals: list[str] | None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> tuple[float, list[pa.Table], dict]:
    t = time.perf_counter()
    tables: list[pa.Table] = []
    async with DimoClient(settings, transport=transport) as client:
        vehicles = await client.discover_vehicles()
        fleet = client.fetch_fleet(vehicles, since=since, until=until, interval=interval, signals=signals)
        async for hist in fleet:
            tables.append(hist.table)
        stats = client.stats.as_dict()
    return time.perf_counter() - t, tables, stats


def run_naive(requests: Recorded) -> tuple[float, int]:
    t = time.perf_counter()
    rows = 0
    with httpx.Client(timeout=60, transport=httpx.HTTPTransport(socket_options=NO_DELAY)) as http:
        for url, headers, body in requests:
            resp = http.post(url, headers=headers, content=body)
            resp.raise_for_status()
            page = json.loads(resp.content)["data"]["signals"]
            rows += pa.Table.from_pylist(page).num_rows
    return time.perf_counter() - t, rows


def _async_client(concurrency: int) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(limits=_limits(concurrency), socket_options=NO_DELAY)
    return httpx.AsyncClient(timeout=60, transport=transport)


async def run_naive_concurrent(requests: Recorded, concurrency: int) -> tuple[float, int]:
    """The naive parsing (``json`` + ``from_pylist``, on the event loop) at the connector's concurrency."""
    t = time.perf_counter()
    slots = asyncio.Semaphore(concurrency)
    async with _async_client(concurrency) as http:

        async def one(url: str, headers: dict[str, str], body: bytes) -> int:
            async with slots:
                resp = await http.post(url, headers=headers, content=body)
                resp.raise_for_status()
            page = json.loads(resp.content)["data"]["signals"]
            return pa.Table.from_pylist(page).num_rows

        rows = sum(await asyncio.gather(*(one(*r) for r in requests)))
    return time.perf_counter() - t, rows


async def run_ceiling(requests: Recorded, concurrency: int) -> tuple[float, int]:
    t = time.perf_counter()
    nbytes = 0
    slots = asyncio.Semaphore(concurrency)
    async with _async_client(concurrency) as http:

        async def one(url: str, headers: dict[str, str], body: bytes) -> int:
            async with slots:
                resp = await http.post(url, headers=headers, content=body)
                resp.raise_for_status()
                return len(resp.content)

        for n in await asyncio.gather(*(one(*r) for r in requests)):
            nbytes += n
    return time.perf_counter() - t, nbytes


SDK_SCRIPT = Path(__file__).with_name("sdk_ingest.py")


def sdk_plan(requests: Recorded) -> list[dict]:
    """The recorded queries per vehicle, in order, with their variables written into the query text."""
    plan: dict[int, list[str]] = {}
    for _, _, body in requests:
        doc = json.loads(body)
        variables = doc["variables"]
        text = "{" + doc["query"].split("{", 1)[1]  # drops ``query Signals($tokenId: Int!, …)``
        for name in sorted(variables, key=len, reverse=True):  # $tokenId before $to
            text = text.replace(f"${name}", json.dumps(variables[name]))
        if "$" in text:
            raise RuntimeError(f"a variable was left in the SDK query: {text[:300]}")
        plan.setdefault(variables["tokenId"], []).append(text)
    return [{"token_id": token_id, "queries": queries} for token_id, queries in plan.items()]


def run_sdk(python: Path, credentials: Path, plan_file: Path) -> dict:
    """One pass of ``bench/sdk_ingest.py`` in the SDK venv: ``seconds``, ``rows``, ``requests``."""
    proc = subprocess.run(
        [str(python), str(SDK_SCRIPT), str(credentials), str(plan_file)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the official SDK run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vehicles", type=int, default=100)
    ap.add_argument("--days", type=float, default=7.0)
    ap.add_argument("--interval-s", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--signals", default=None, help="comma-separated signal names (default: all each vehicle has)"
    )
    ap.add_argument(
        "--no-sdk", action="store_true", help="leave out the official-SDK mode (its fields become null)"
    )
    args = ap.parse_args()
    signals = [s.strip() for s in args.signals.split(",")] if args.signals else None
    try:  # before any clock: this may build the SDK's venv
        sdk_python = None if args.no_sdk else DIMO_SDK.ensure()
    except InstallError as exc:
        raise SystemExit(
            f"{exc}\nthe official-SDK mode needs its venv; rerun with --no-sdk to leave it out"
        ) from None

    cores = os.cpu_count() or 1
    if cores >= 2 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    interval = timedelta(seconds=args.interval_s)
    end = datetime.now(UTC).replace(second=0, microsecond=0)
    until = end - timedelta(minutes=1)
    since = until - timedelta(days=args.days)
    config = EmulatorConfig(
        vehicles=args.vehicles, days=args.days + 0.01, seed=args.seed, end=end, vehicle_jwt_ttl_s=3600
    )
    emu_started = time.perf_counter()
    with EmulatorProcess(config, cpu=1 if cores >= 2 else None) as emu:
        emulator_start_s = time.perf_counter() - emu_started
        settings = DimoSettings.from_credentials_file(emu.credentials_path, rate_limit_per_s=0)
        print(
            f"emulator ready in {emulator_start_s:.1f}s; recording the connector's requests …",
            file=sys.stderr,
        )
        recorder = RecordingTransport()
        _, tables, _ = asyncio.run(
            run_connector(settings, since, until, interval, signals, recorder)
        )  # warm-up + record
        requests = recorder.requests
        rows = sum(t.num_rows for t in tables)
        plan_file = Path(tempfile.mkdtemp(prefix="depin-bench-ingest-")) / "sdk-plan.json"
        plan_file.write_text(json.dumps(sdk_plan(requests)))

        modes = ["connector", "naive", "naive_concurrent", "ceiling"] + ([] if args.no_sdk else ["sdk"])
        best = dict.fromkeys(modes, float("inf"))
        connector_stats: dict = {}
        sdk_requests = None
        for i in range(args.repeat):
            secs, tables, connector_stats = asyncio.run(
                run_connector(settings, since, until, interval, signals)
            )
            _same_rows("connector", sum(t.num_rows for t in tables), rows)
            best["connector"] = min(best["connector"], secs)
            secs, naive_rows = run_naive(requests)
            _same_rows("naive", naive_rows, rows)
            best["naive"] = min(best["naive"], secs)
            secs, naive_rows = asyncio.run(run_naive_concurrent(requests, settings.max_concurrency))
            _same_rows("naive_concurrent", naive_rows, rows)
            best["naive_concurrent"] = min(best["naive_concurrent"], secs)
            secs, nbytes = asyncio.run(run_ceiling(requests, settings.max_concurrency))
            best["ceiling"] = min(best["ceiling"], secs)
            if sdk_python is not None:
                sdk = run_sdk(sdk_python, emu.credentials_path, plan_file)
                _same_rows("sdk", sdk["rows"], rows)
                best["sdk"] = min(best["sdk"], sdk["seconds"])
                sdk_requests = sdk["requests"]
            print(
                f"run {i + 1}/{args.repeat}: " + ", ".join(f"{k} {v:.2f}s" for k, v in best.items()),
                file=sys.stderr,
            )

    table = pa.concat_tables(tables, promote_options="default")
    store_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"depin-bench-store-{os.getpid()}"
    t = time.perf_counter()
    TelemetryStore(store_dir).append(table)
    store_write_s = time.perf_counter() - t
    shutil.rmtree(store_dir, ignore_errors=True)

    shutil.rmtree(plan_file.parent, ignore_errors=True)
    sdk_s = None if args.no_sdk else best["sdk"]
    result = {
        "rows": rows,
        "requests": len(requests),
        "vehicles": args.vehicles,
        "days": args.days,
        "interval_s": args.interval_s,
        "columns": table.num_columns,
        "response_mb": round(nbytes / 1e6, 1),
        "connector_s": round(best["connector"], 3),
        "naive_s": round(best["naive"], 3),
        "ceiling_s": round(best["ceiling"], 3),
        "connector_rows_per_s": round(rows / best["connector"]),
        "naive_rows_per_s": round(rows / best["naive"]),
        "ceiling_rows_per_s": round(rows / best["ceiling"]),
        "ratio_vs_naive": round(best["naive"] / best["connector"], 2),
        "ratio_vs_ceiling": round(best["ceiling"] / best["connector"], 2),
        "naive_concurrent_s": round(best["naive_concurrent"], 3),
        "naive_concurrent_rows_per_s": round(rows / best["naive_concurrent"]),
        "ratio_vs_naive_concurrent": round(best["naive_concurrent"] / best["connector"], 2),
        "sdk_s": None if sdk_s is None else round(sdk_s, 3),
        "sdk_rows_per_s": None if sdk_s is None else round(rows / sdk_s),
        "ratio_vs_sdk": None if sdk_s is None else round(sdk_s / best["connector"], 2),
        "sdk_requests": sdk_requests,
        "signals": signals,
        "store_write_rows_per_s": round(rows / store_write_s),
        "concurrency": settings.max_concurrency,
        "connector_requests_total": connector_stats["requests"],
        "emulator_start_s": round(emulator_start_s, 2),
        "cores": cores,
    }
    print(json.dumps(result))


def _same_rows(mode: str, seen: int, expected: int) -> None:
    if seen != expected:
        raise SystemExit(f"{mode} saw {seen} rows, the connector's recorded run {expected}: not comparable")


if __name__ == "__main__":
    main()
