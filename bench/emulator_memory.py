"""The emulator's start-up time and memory at fleet scale: N simulated vehicles, 1 day of history at 1 minute.

For each size of ``--sizes`` (default 1000,3000,10000) the emulator starts as a child process
(``EmulatorProcess``, rate limit off) and this process fetches every signal of ``--fetch`` vehicles
(default: all of them) over the whole day at 1-minute buckets with ``DimoClient.fetch_fleet`` (rows are
counted and dropped, nothing is stored). Measured per size:
- ``startup_s``: from launching the emulator until its credentials file is written and ``/healthz`` answers;
- ``fetch_s``, ``vehicles_fetched``, ``rows``: the telemetry fetch;
- ``emulator_peak_rss_mb``: the emulator's peak RSS (``VmHWM`` from ``/proc``) after the fetch, so it covers
  building the fleet and serving every request; ``emulator_rss_after_start_mb``: its RSS once ready.
Output: a line per size, then the last stdout line, JSON with ``sizes`` (one object per size) and
``targets`` (start-up in seconds, peak RSS ≤ 600 MB at 10,000 vehicles). Absolute seconds are noisy on a
shared machine. ``--pythonpath`` runs another checkout's emulator (e.g. an older tree for a before/after).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from connectors.dimo.client import DimoClient
from connectors.dimo.emulator.server import EmulatorProcess
from connectors.dimo.emulator.state import EmulatorConfig
from connectors.dimo.settings import DimoSettings
from depin_core.proc import status_kb

TARGET_RSS_MB = 600.0
TARGET_AT = 10_000
END = datetime(2026, 1, 15, tzinfo=UTC)


def status_mb(pid: int, key: str) -> float | None:
    """``key`` (``VmHWM``, ``VmRSS``) of ``/proc/<pid>/status`` in MB; None if the process is gone."""
    kb = status_kb(pid, key)
    return None if kb is None else round(kb / 1024, 1)


async def fetch(credentials: Path, n: int | None, concurrency: int) -> dict[str, Any]:
    """Every signal of the first ``n`` discovered vehicles (all when None) over the day at 1 minute."""
    settings = DimoSettings.from_credentials_file(credentials).model_copy(
        update={"rate_limit_per_s": 0, "max_concurrency": concurrency}
    )
    t = time.perf_counter()
    rows = requests = fetched = 0
    async with DimoClient(settings) as client:
        vehicles = await client.discover_vehicles()
        vehicles = vehicles if n is None else vehicles[:n]
        async for hist in client.fetch_fleet(
            vehicles, since=END - timedelta(days=1), until=END, interval=timedelta(minutes=1)
        ):
            rows += hist.table.num_rows
            requests += hist.requests
            fetched += hist.skipped_reason is None
    return {
        "fetch_s": round(time.perf_counter() - t, 1),
        "vehicles_fetched": fetched,
        "rows": rows,
        "requests": requests,
    }


def measure(size: int, fetch_n: int | None, concurrency: int) -> dict[str, Any]:
    config = EmulatorConfig(vehicles=size, days=1.0, seed=0, end=END, rate_limit_per_s=0)
    emu = EmulatorProcess(config, startup_timeout=600)
    t = time.perf_counter()
    try:
        emu.start()
        out: dict[str, Any] = {"vehicles": size, "startup_s": round(time.perf_counter() - t, 2)}
        assert emu.proc is not None
        pid = emu.proc.pid
        out["emulator_rss_after_start_mb"] = status_mb(pid, "VmRSS")
        out |= asyncio.run(fetch(emu.credentials_path, fetch_n, concurrency))
        out["emulator_peak_rss_mb"] = status_mb(pid, "VmHWM")
        return out
    finally:
        emu.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,3000,10000", help="fleet sizes, comma-separated")
    parser.add_argument("--fetch", default="all", help="vehicles to fetch per size: 'all' or a number")
    parser.add_argument("--concurrency", type=int, default=8, help="client requests in flight")
    args = parser.parse_args()
    n = None if args.fetch == "all" else int(args.fetch)
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        r = measure(size, n, args.concurrency)
        print(
            f"{size:>6} vehicles: start {r['startup_s']} s, fetched {r['vehicles_fetched']} "
            f"({r['rows']} rows) in {r['fetch_s']} s, emulator peak RSS {r['emulator_peak_rss_mb']} MB",
            flush=True,
        )
        results.append(r)
    at = next((r for r in results if r["vehicles"] == TARGET_AT), None)
    targets = {
        "emulator_peak_rss_mb_max": TARGET_RSS_MB,
        "met_at_10000": None if at is None else (at["emulator_peak_rss_mb"] or 1e9) <= TARGET_RSS_MB,
    }
    print(json.dumps({"sizes": results, "targets": targets}))


if __name__ == "__main__":
    main()
