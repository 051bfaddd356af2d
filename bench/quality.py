"""Model quality report: the issue's bars on seeded emulator fleets, every vehicle split, plus real driving.

For each fleet seed: a real dataset (emulator → DimoClient → Parquet store; ``--vehicles`` × ``--days``, the
bundled real CMAP speed traces added as EVs), then both families trained once per vehicle split
(``--splits`` job seeds; ~30 % of the vehicles held out each time):

- range: held-out ``mae`` ÷ ``baseline_mae`` (fleet-mean consumption); the bar is ≤ 0.5;
- anomaly: ``recall`` on injected faults and ``false_positive_rate``; the bars are ≥ 0.9 and ≤ 0.05;
- real driving: the CMAP vehicles scored by the split-0 models (range MAE vs the fleet-mean baseline on
  their measurable trips; share of their windows flagged — no fault is injected on them).

Quality numbers, not timings. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_jobs.models import anomaly as A
from gpu_jobs.models import features as F
from gpu_jobs.models import range as R
from tests.support.fleet_data import build_fleet_data
from tests.support.model_ctx import make_ctx


def _cmap_report(root: Path, data, rng_out, anom_out) -> dict:  # type: ignore[no-untyped-def]
    truth = pl.read_parquet(data.truth / "vehicles.parquet")
    ids = truth.filter(pl.col("origin").str.starts_with("cmap:"))["token_id"].to_list()
    files, _ = F.split_inputs([data.telemetry])
    R.score_dataset(rng_out.state_dict, rng_out.model_config, files, root / "range.parquet")
    A.score_dataset(anom_out.state_dict, anom_out.model_config, files, root / "anomaly.parquet")
    trips = pl.read_parquet(root / "range.parquet").filter(pl.col("token_id").is_in(ids))
    measured = trips.drop_nulls("kwh_per_100km")
    y = measured["kwh_per_100km"].to_numpy()
    p = measured["predicted_kwh_per_100km"].to_numpy()
    windows = pl.read_parquet(root / "anomaly.parquet").filter(pl.col("token_id").is_in(ids))
    return {
        "vehicles": len(ids),
        "trips": trips.height,
        "measured_trips": len(y),
        "range_mae": float(np.abs(p - y).mean()) if len(y) else None,
        "range_baseline_mae": float(np.abs(rng_out.model_config["fleet_mean_kwh_per_100km"] - y).mean())
        if len(y)
        else None,
        "windows": windows.height,
        "flagged_share": float(windows["flagged"].mean()) if windows.height else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[7, 11, 3, 5, 13], help="fleet seeds")
    ap.add_argument("--splits", type=int, default=5, help="vehicle splits (job seeds) per fleet")
    ap.add_argument("--vehicles", type=int, default=30)
    ap.add_argument("--days", type=float, default=7.0)
    ap.add_argument("--interval-s", type=float, default=20.0, help="telemetry bucket length (seconds)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ratios, hist, recalls, fprs, cmap = [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="depin-quality-") as tmp:
        for fleet_seed in args.seeds:
            root = Path(tmp) / f"fleet-{fleet_seed}"
            data = build_fleet_data(
                root,
                vehicles=args.vehicles,
                days=args.days,
                seed=fleet_seed,
                cmap=True,
                interval=timedelta(seconds=args.interval_s),
            )
            for split in range(args.splits):
                r = R.RangeFamily().train(make_ctx(root / f"r{split}", [data.telemetry], "range", seed=split))
                a = A.AnomalyFamily().train(
                    make_ctx(root / f"a{split}", [data.telemetry, data.truth], "anomaly", seed=split)
                )
                m, n = r.metrics, a.metrics
                ratios.append(m["mae"] / m["baseline_mae"])
                hist.append(m["mae"] / m["history_baseline_mae"])
                if n["n_faults"]:
                    recalls.append(n["recall"])
                    fprs.append(n["false_positive_rate"])
                print(
                    f"fleet {fleet_seed} split {split}: range mae {m['mae']:.2f} vs baseline "
                    f"{m['baseline_mae']:.2f} kWh/100km (ratio {ratios[-1]:.2f}); anomaly recall "
                    f"{n['recall']:.2f} fpr {n['false_positive_rate']:.3f}",
                    flush=True,
                )
                if split == 0:
                    cmap.append({"fleet_seed": fleet_seed, **_cmap_report(root, data, r, a)})
    rat = np.array(ratios)
    summary = {
        "fleets": len(args.seeds),
        "splits_per_fleet": args.splits,
        "vehicles": args.vehicles,
        "days": args.days,
        "interval_s": args.interval_s,
        "range_ratio_mean": round(float(rat.mean()), 4),
        "range_ratio_max": round(float(rat.max()), 4),
        "range_bar_share": round(float((rat <= 0.5).mean()), 4),
        "range_ratio_vs_history_mean": round(float(np.mean(hist)), 4),
        "anomaly_recall_min": round(min(recalls), 4) if recalls else None,
        "anomaly_fpr_max": round(max(fprs), 4) if fprs else None,
        "anomaly_bar_share": round(
            float(np.mean([r >= 0.9 and f <= 0.05 for r, f in zip(recalls, fprs, strict=True)])), 4
        )
        if recalls
        else None,
        "cmap": cmap,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
