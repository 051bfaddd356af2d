"""Connector ingest benchmark: DIMO emulator → DimoClient → Arrow, against two baselines from the same run.

1. **connector**: ``DimoClient.fetch_fleet`` for every vehicle (discovery, token exchange, planned and
   concurrent telemetry requests, pages parsed into Arrow tables).
2. **naive**: the same telemetry requests one at a time with ``httpx`` + stdlib ``json`` +
   ``pa.Table.from_pylist`` — what a first script would do.
3. **ceiling**: the same requests at the connector's concurrency, bytes read and discarded (fetch only).

The emulator runs pinned to CPU 1 and this process to CPU 0 (when there are 2+ cores), so the numbers
measure the client. Each mode runs ``--repeat`` times; the best run counts. Absolute numbers are noisy
here: read the ratios. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from connectors.dimo.client import DimoClient
from connectors.dimo.emulator.server import EmulatorProcess
from connectors.dimo.emulator.state import EmulatorConfig
from connectors.dimo.settings import DimoSettings
from connectors.dimo.store import TelemetryStore


class RecordingTransport(httpx.AsyncBaseTransport):
    """Records ``signals`` requests (url, headers, body) so the baselines can replay exactly the same ones."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.requests: list[tuple[str, dict[str, str], bytes]] = []

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
    transport: httpx.AsyncBaseTransport | None = None,
) -> tuple[float, list[pa.Table], dict]:
    t = time.perf_counter()
    tables: list[pa.Table] = []
    async with DimoClient(settings, transport=transport) as client:
        vehicles = await client.discover_vehicles()
        async for hist in client.fetch_fleet(vehicles, since=since, until=until, interval=interval):
            tables.append(hist.table)
        stats = client.stats.as_dict()
    return time.perf_counter() - t, tables, stats


def run_naive(requests: list[tuple[str, dict[str, str], bytes]]) -> tuple[float, int]:
    t = time.perf_counter()
    rows = 0
    with httpx.Client(timeout=60) as http:
        for url, headers, body in requests:
            resp = http.post(url, headers=headers, content=body)
            resp.raise_for_status()
            page = json.loads(resp.content)["data"]["signals"]
            rows += pa.Table.from_pylist(page).num_rows
    return time.perf_counter() - t, rows


async def run_ceiling(
    requests: list[tuple[str, dict[str, str], bytes]], concurrency: int
) -> tuple[float, int]:
    t = time.perf_counter()
    nbytes = 0
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:

        async def one(url: str, headers: dict[str, str], body: bytes) -> int:
            async with slots:
                resp = await http.post(url, headers=headers, content=body)
                resp.raise_for_status()
                return len(resp.content)

        for n in await asyncio.gather(*(one(*r) for r in requests)):
            nbytes += n
    return time.perf_counter() - t, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vehicles", type=int, default=100)
    ap.add_argument("--days", type=float, default=7.0)
    ap.add_argument("--interval-s", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

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
            run_connector(settings, since, until, interval, recorder)
        )  # warm-up + record
        requests = recorder.requests
        rows = sum(t.num_rows for t in tables)

        best = {"connector": float("inf"), "naive": float("inf"), "ceiling": float("inf")}
        connector_stats: dict = {}
        for i in range(args.repeat):
            secs, tables, connector_stats = asyncio.run(run_connector(settings, since, until, interval))
            assert sum(t.num_rows for t in tables) == rows, "connector rows changed between runs"
            best["connector"] = min(best["connector"], secs)
            secs, naive_rows = run_naive(requests)
            assert naive_rows == rows, f"naive baseline saw {naive_rows} rows, connector {rows}"
            best["naive"] = min(best["naive"], secs)
            secs, nbytes = asyncio.run(run_ceiling(requests, settings.max_concurrency))
            best["ceiling"] = min(best["ceiling"], secs)
            print(
                f"run {i + 1}/{args.repeat}: " + ", ".join(f"{k} {v:.2f}s" for k, v in best.items()),
                file=sys.stderr,
            )

    table = pa.concat_tables(tables, promote_options="default")
    store_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"depin-bench-store-{os.getpid()}"
    t = time.perf_counter()
    TelemetryStore(store_dir).write(table)
    store_write_s = time.perf_counter() - t
    shutil.rmtree(store_dir, ignore_errors=True)

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
        "store_write_rows_per_s": round(rows / store_write_s),
        "concurrency": settings.max_concurrency,
        "connector_requests_total": connector_stats.get("requests"),
        "emulator_start_s": round(emulator_start_s, 2),
        "cores": cores,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
