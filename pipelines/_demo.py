"""``make demo`` / ``depin demo``: the main job on one machine, end to end with what exists today.

Start the DIMO emulator (a simulated fleet), ingest its history through the real client over HTTP into
a Parquet dataset, and summarize. Later stages (training, publishing) extend this.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from connectors.dimo.emulator.server import EmulatorProcess
from connectors.dimo.emulator.state import EmulatorConfig
from connectors.dimo.settings import DimoSettings
from connectors.dimo.store import TelemetryStore
from depin_core.fs import atomic_write_bytes
from pipelines._ingest_cmd import run_ingest
from pipelines._output import err_console

SUMMARY_FILE = "summary.json"


def run_demo(*, vehicles: int, days: float, interval: str, out: Path) -> dict[str, Any]:
    """Run the demo and return its JSON summary (also written to ``out/summary.json``)."""
    stages: dict[str, float] = {}
    dataset = out / "dataset"
    if dataset.exists():
        shutil.rmtree(dataset)
    t = time.perf_counter()
    err_console.print(
        f"[bold]1/3[/] starting the DIMO emulator: {vehicles} simulated vehicles, {days:g} days"
    )
    with EmulatorProcess(
        EmulatorConfig(vehicles=vehicles, days=days, seed=42, ground_truth_out=out / "ground_truth")
    ) as emu:
        stages["emulator_start"] = round(time.perf_counter() - t, 2)
        err_console.print(f"    emulator ready at {emu.base_url} ({stages['emulator_start']:.1f}s)")
        t = time.perf_counter()
        err_console.print(
            f"[bold]2/3[/] ingesting {days:g} days at {interval} buckets through the DIMO client"
        )
        # the local emulator has no rate limit to respect (real DIMO: 10 req/s per service, the default)
        settings = DimoSettings.from_credentials_file(emu.credentials_path, rate_limit_per_s=0)
        report = asyncio.run(
            run_ingest(
                since=f"{days}d",
                until="now",
                interval=interval,
                signals=None,
                vehicles=None,
                out=dataset,
                credentials=None,
                settings=settings,
            )
        )
        stages["ingest"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    err_console.print("[bold]3/3[/] summarizing the dataset")
    store = TelemetryStore(dataset)
    table = store.read()
    summary_store = store.summary()
    per_signal = {
        name: round(1 - table.column(name).null_count / max(table.num_rows, 1), 3)
        for name in table.column_names
        if name not in ("token_id", "timestamp")
    }
    speed = table.column("speed") if "speed" in table.column_names else None
    stages["summarize"] = round(time.perf_counter() - t, 2)
    summary: dict[str, Any] = {
        "rows": table.num_rows,
        "vehicles": summary_store.vehicles,
        "requests": report.requests,
        "retries": report.retries,
        "first": str(summary_store.first),
        "last": str(summary_store.last),
        "columns": len(table.column_names),
        "signal_coverage": per_signal,
        "mean_speed_kmh_when_moving": (
            round(pc.mean(pc.filter(speed, pc.greater(speed, 1.0))).as_py() or 0.0, 2)
            if speed is not None
            else None
        ),
        "ingest_rows_per_s": round(report.rows / max(report.seconds, 1e-9)),
        "dataset": str(dataset),
        "ground_truth": str(out / "ground_truth"),
        "stage_seconds": stages,
    }
    atomic_write_bytes(out / SUMMARY_FILE, json.dumps(summary, indent=2).encode())
    err_console.print(
        f"\n[bold green]demo done[/]: {summary['rows']:,} rows × {summary['columns']} columns from "
        f"{summary['vehicles']} vehicles ({summary['first']} → {summary['last']}), "
        f"{report.requests} requests at {summary['ingest_rows_per_s']:,} rows/s; summary → {out / SUMMARY_FILE}"
    )
    return summary
