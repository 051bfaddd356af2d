"""``make readme-plots``: the README's pictures, regenerated from the demo's fixed-seed fleet.

Simulates the demo fleet (``pipelines.stack.demo``: 30 vehicles, 7 days, seed 3, fixed end; a fifth of the
devices going offline partway) in the DIMO emulator, ingests it through the real client with the signals both
model families read plus the location, trains the range and the anomaly model (local runner; the plots are
drawn as after any training), draws the fleet plots, and copies the pictures the README shows into
``docs/img/``. Everything runs on loopback;
nothing is downloaded. Usage: ``python docs/readme_plots.py [--out docs/img] [--work DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from connectors.dimo.client import DimoClient
from connectors.dimo.emulator.server import EmulatorProcess
from connectors.dimo.emulator.state import EmulatorConfig
from connectors.dimo.ingest import ingest
from connectors.dimo.plots import render_fleet
from connectors.dimo.settings import DimoSettings
from connectors.dimo.store import TelemetryStore
from depin_core.plots import MAX_PNG_BYTES
from gpu_jobs import api
from gpu_jobs.models import features as F
from pipelines.stack.demo import FLEET, FLEET_END

INTERVAL = timedelta(minutes=1)
# README picture → (source: "fleet" or a family, plot name)
PICTURES = {
    "fleet-tracks.png": ("fleet", "tracks"),
    "fleet-coverage.png": ("fleet", "coverage"),
    "range-predicted-vs-actual.png": ("range", "predicted_vs_actual"),
    "range-residuals.png": ("range", "residuals"),
    "anomaly-timeline.png": ("anomaly", "timeline"),
    "anomaly-precision-recall.png": ("anomaly", "precision_recall"),
}


# A fifth of the devices go offline partway (one never reports), as real fleets do, so the coverage heatmap
# shows what gaps look like; the demo's own fleet has none.
IDLE_FRACTION = 0.2


def build(work: Path, out: Path) -> dict[str, int]:
    """Simulate, ingest, train, draw; the README pictures written to ``out`` with their sizes."""
    days = float(FLEET["days"])
    config = EmulatorConfig(
        vehicles=int(FLEET["vehicles"]),
        days=days,
        seed=int(FLEET["seed"]),
        end=FLEET_END,
        ground_truth_out=work / "truth",
        idle_fraction=IDLE_FRACTION,
    )
    dataset = work / "dataset"
    with EmulatorProcess(config) as emu:
        settings = DimoSettings.from_credentials_file(emu.credentials_path).model_copy(
            update={"rate_limit_per_s": 0}
        )

        async def run() -> None:
            async with DimoClient(settings) as client:
                await ingest(
                    client,
                    TelemetryStore(dataset),
                    since=FLEET_END - timedelta(days=days),
                    until=FLEET_END,
                    interval=INTERVAL,
                    signals=[*F.SIGNALS, "currentLocationCoordinates"],
                )

        asyncio.run(run())
    sources: dict[str, Path] = {}
    for family in ("range", "anomaly"):
        model = work / "models" / family
        result = api.train(
            dataset=dataset,
            model=family,
            out=model,
            ground_truth=work / "truth" if family == "anomaly" else None,
            jobs_dir=work / "jobs",
        )
        missing = {k: v["missing"] for k, v in result["plots"].items() if "missing" in v}
        if missing:
            raise SystemExit(f"{family} plots missing: {missing}")
        sources[family] = model / "plots"
    fleet = render_fleet(dataset, work / "fleet")
    if missing := {k: v["missing"] for k, v in fleet.items() if "missing" in v}:
        raise SystemExit(f"fleet plots missing: {missing}")
    sources["fleet"] = work / "fleet"
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for picture, (source, name) in PICTURES.items():
        shutil.copyfile(sources[source] / f"{name}.png", out / picture)
        sizes[picture] = (out / picture).stat().st_size
        assert sizes[picture] <= MAX_PNG_BYTES, picture
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "img")
    ap.add_argument("--work", type=Path, default=None, help="keep the fleet, models and plots here")
    a = ap.parse_args()
    t0 = time.perf_counter()
    if a.work is not None:
        sizes = build(a.work, a.out)
    else:
        with tempfile.TemporaryDirectory(prefix="readme-plots-") as tmp:
            sizes = build(Path(tmp), a.out)
    for name, size in sizes.items():
        print(f"{a.out / name}  {size / 1000:.0f} kB")
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
