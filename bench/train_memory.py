"""Training memory at scale: peak RSS of ``depin train --model range`` at two dataset sizes.

For each size of ``--sizes`` (vehicle-days, default 300 and 3,000 as ``--days`` × vehicles) a dataset is built
from the emulator's simulator (``simulate_fleet``, no server): each vehicle's series aggregated into
``--interval-s`` buckets with the connector's per-signal aggregation, written as a Delta table (delta-rs,
``date=`` partitions) as the ingest appends: ``--appends`` time windows per day, each one append of every
vehicle, so each day has that many files and every file spans the whole fleet. Then ``depin train --model range
--param epochs=N --json`` runs as a fresh child process (its own process group) and is measured:

- ``seconds``: the child's wall time, start to exit (interpreter start-up and imports included);
- ``peak_rss_mb``: the peak of the summed RSS of the child's process tree (the CLI and its job worker),
  sampled from ``/proc`` every 50 ms; ``max_process_rss_mb``: the largest single process's peak (its
  ``VmHWM``, kept by the kernel, read at the same samples), a lower bound of the tree's peak.

``--baseline-ref REF`` measures the same datasets with the source tree of git commit ``REF`` too (extracted
with ``git archive`` into a temporary folder and run from there), e.g. the commit before lazy features;
``--baseline-tree DIR`` does the same with a source tree already on disk.
Output: a table, then one JSON object as the last line (``sizes``, ``peak_rss_mb`` and ``seconds`` per size,
``rss_ratio`` = peak RSS at the largest size ÷ at the smallest; ``baseline`` with the same for ``REF``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import polars as pl
from deltalake import write_deltalake

from connectors.dimo.catalog import signal_catalog
from connectors.dimo.emulator.sim.simulator import simulate_fleet
from connectors.dimo.emulator.state import make_license
from depin_core.proc.tree import descendants
from gpu_jobs.models.features import FLOAT_SIGNALS, POWERTRAIN

END = datetime(2026, 11, 25, tzinfo=UTC)
TOKEN_STRIDE = 10_000_000  # token ids of append k start at k × this: unique across the appends' fleets


def _bucket(token_id: int, series: pl.DataFrame, interval_s: int) -> pl.DataFrame:
    """One vehicle's raw series → one row per ``interval_s`` bucket, aggregated as the connector asks."""
    cat = signal_catalog()
    aggs = []
    for name in (*FLOAT_SIGNALS, POWERTRAIN):
        if name not in series.columns:
            continue
        agg = cat[name].default_agg
        v = pl.col(name).drop_nulls()
        aggs.append({"AVG": v.mean(), "MAX": v.max(), "LAST": v.last()}[agg].alias(name))
    return (
        series.with_columns(pl.col("ts").dt.truncate(f"{interval_s}s").alias("timestamp"))
        .group_by("timestamp", maintain_order=True)
        .agg(aggs)
        .with_columns(pl.lit(token_id, pl.Int64).alias("token_id"))
    )


def build_dataset(root: Path, *, vehicles: int, days: int, appends: int, interval_s: int, seed: int) -> int:
    """A Delta table of ``vehicles`` × ``days`` simulated telemetry at ``root``, written as the ingest writes
    it: ``appends`` appends per day, each a time window of every vehicle (so each file spans the whole fleet,
    sorted by token_id, timestamp); rows."""
    frames = []
    per = 500  # vehicles simulated at a time
    for k, lo in enumerate(range(0, vehicles, per)):
        n = min(per, vehicles - lo)
        fleet = simulate_fleet(
            make_license(seed), vehicles=n, days=float(days), seed=seed * 1000 + k, end=END
        )
        frames += [_bucket(k * TOKEN_STRIDE + t, s, interval_s) for t, s in fleet.series.items()]
        del fleet
    data = pl.concat(frames, how="diagonal_relaxed")
    data = data.select(
        "token_id", "timestamp", *(c for c in data.columns if c not in ("token_id", "timestamp"))
    )
    del frames
    step = timedelta(days=1) / appends
    t = END - timedelta(days=days)
    while t < END:
        part = data.filter(pl.col("timestamp").is_between(t, t + step, closed="left")).sort(
            "token_id", "timestamp"
        )
        part = part.with_columns(pl.col("timestamp").dt.date().cast(pl.String).alias("date"))
        write_deltalake(str(root), part.to_arrow(), mode="append", partition_by=["date"], schema_mode="merge")
        t += step
    return data.height


def _status_kb(pid: int, key: str) -> int:
    """``key`` (``VmRSS``, ``VmHWM``) of ``/proc/<pid>/status`` in kB; 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def measure_train(tree: Path, dataset: Path, out: Path, epochs: int, timeout_s: float) -> dict[str, Any]:
    """Run ``depin train`` (the CLI of the source ``tree``) as a child; seconds and peak RSS of its tree."""
    cmd = [sys.executable, "-m", "pipelines.cli", "train", "--json", "--dataset", str(dataset), "--model",
           "range", "--out", str(out), "--param", f"epochs={epochs}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree), "NO_COLOR": "1"}
    log = out.with_suffix(".log")
    peak, hwm = [0], [0]
    waited: dict[str, Any] = {}
    t = time.perf_counter()
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip

    def reap() -> None:
        _, status = os.waitpid(proc.pid, 0)
        waited.update(end=time.perf_counter(), status=status)

    def sample() -> None:
        while "end" not in waited:
            pids = [proc.pid, *descendants(proc.pid)]
            peak[0] = max(peak[0], sum(_status_kb(p, "VmRSS") for p in pids))
            hwm[0] = max(hwm[0], *(_status_kb(p, "VmHWM") for p in pids))
            time.sleep(0.05)

    reaper = threading.Thread(target=reap, daemon=True)
    sampler = threading.Thread(target=sample, daemon=True)
    reaper.start()
    sampler.start()
    reaper.join(timeout_s)
    if reaper.is_alive():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        reaper.join()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(waited["status"])  # reaped above; tell Popen
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"depin train exited with {proc.returncode} in {tree}:\n{text[-3000:]}")
    report = json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])
    return {
        "seconds": round(waited["end"] - t, 1),
        "peak_rss_mb": round(peak[0] / 1024, 1),
        "max_process_rss_mb": round(hwm[0] / 1024, 1),
        "n_windows": report.get("metrics", {}).get("n_windows"),
    }


def run_sizes(tree: Path, datasets: dict[int, Path], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    res = {n: measure_train(tree, d, work / f"model-{tree.name}-{n}", args.epochs, args.timeout_s)
           for n, d in datasets.items()}  # fmt: skip
    lo, hi = min(res), max(res)
    return {
        "peak_rss_mb": {n: r["peak_rss_mb"] for n, r in res.items()},
        "max_process_rss_mb": {n: r["max_process_rss_mb"] for n, r in res.items()},
        "seconds": {n: r["seconds"] for n, r in res.items()},
        "n_windows": {n: r["n_windows"] for n, r in res.items()},
        "rss_ratio": round(res[hi]["peak_rss_mb"] / res[lo]["peak_rss_mb"], 2),
    }


def _extract(ref: str, dest: Path) -> Path:
    """The source tree of git commit ``ref`` at ``dest`` (``git archive``: reads the repository only)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _table(label: str, res: dict[str, Any]) -> None:
    print(f"{label}\n  vehicle-days   seconds   peak RSS MB (tree)   max process MB")
    for n in res["peak_rss_mb"]:
        print(
            f"  {n:>12,} {res['seconds'][n]:>9} {res['peak_rss_mb'][n]:>20} {res['max_process_rss_mb'][n]:>16}"
        )
    print(f"  rss_ratio {res['rss_ratio']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="300,3000", help="vehicle-days, comma-separated")
    ap.add_argument("--days", type=int, default=1, help="days per vehicle (vehicles = size ÷ days)")
    ap.add_argument("--appends", type=int, default=6, help="Delta appends per dataset (files per day)")
    ap.add_argument("--interval-s", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--timeout-s", type=float, default=900.0)
    ap.add_argument("--baseline-ref", default=None, help="also measure this git commit's source tree")
    ap.add_argument("--baseline-tree", type=Path, default=None, help="also measure this source tree")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="depin-bench-train-memory-"))
    try:
        datasets: dict[int, Path] = {}
        for n in sizes:
            t = time.perf_counter()
            d = work / f"telemetry-{n}"
            rows = build_dataset(d, vehicles=n // args.days, days=args.days, appends=args.appends,
                                 interval_s=args.interval_s, seed=args.seed)  # fmt: skip
            datasets[n] = d
            print(
                f"dataset {n:,} vehicle-days: {rows:,} rows in {time.perf_counter() - t:.1f}s",
                file=sys.stderr,
            )
        out: dict[str, Any] = {"sizes": sizes, **run_sizes(ROOT, datasets, work, args)}
        _table("this tree", out)
        if args.baseline_ref or args.baseline_tree:
            base_tree = args.baseline_tree or _extract(args.baseline_ref, work / "baseline")
            label = args.baseline_ref or str(base_tree)
            out["baseline"] = {"ref": label, **run_sizes(base_tree, datasets, work, args)}
            _table(f"baseline {label}", out["baseline"])
        out["interval_s"], out["epochs"], out["appends"] = args.interval_s, args.epochs, args.appends
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
