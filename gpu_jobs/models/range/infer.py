"""Batch scoring with the range model: telemetry by vehicle batches → trips → predictions (one Parquet file)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from depin_core.errors import ConfigError
from gpu_jobs.artifacts import load_artifact
from gpu_jobs.context import InferOutput, JobContext
from gpu_jobs.models import features as F
from gpu_jobs.models import score as S
from gpu_jobs.models.range import features as RF
from gpu_jobs.models.range.model import NAME, TARGET, calibration, net_from_config, predict_trips


def infer(ctx: JobContext, model_dir: Path) -> InferOutput:
    """Score every trip of the input telemetry → ``<outputs.dir>/predictions.parquet``."""
    art = load_artifact(model_dir)
    return score_dataset(
        art.state_dict, art.model_config, F.split_inputs(ctx.inputs)[0], S.predictions_path(ctx)
    )


def score_dataset(
    state: dict[str, torch.Tensor],
    config: dict[str, Any],
    files: list[str],
    out: Path,
    *,
    batch_rows: int | None = None,
) -> InferOutput:
    """``files`` by vehicle batches (about ``batch_rows`` telemetry rows, default ``F.BATCH_ROWS``) → trips →
    predictions → ``out`` (one row per trip, by vehicle and start); metrics where measurable."""
    if config.get("family") != NAME:
        raise ConfigError(f"model is a {config.get('family')!r} model, not 'range'; pass a range model")
    net = net_from_config(config, state)
    hp = config["hyperparameters"]
    cal = calibration(config)
    seen: list[pl.DataFrame] = []

    def frames() -> Any:
        for df in F.TelemetryFiles(files, RF.RANGE_SIGNALS).batches(batch_rows):
            trips = RF.trip_windows(df, min_km=float(hp["min_km"])).sort("token_id", "start")
            out_frame = predict_trips(net, config, trips, cal)
            seen.append(out_frame.select(TARGET, "predicted_kwh_per_100km").drop_nulls())
            yield out_frame

    empty = predict_trips(net, config, RF.trip_windows(F.conform(pl.DataFrame({"token_id": [], "timestamp": []},
                          schema={"token_id": pl.Int64, "timestamp": pl.Datetime("us", "UTC")}))), cal)  # fmt: skip
    rows = S.write_stream(frames(), out, empty)
    metrics: dict[str, Any] = {"trips": rows}
    done = pl.concat(seen) if seen else None
    if done is not None and done.height:
        y, p = done[TARGET].to_numpy(), done["predicted_kwh_per_100km"].to_numpy()
        base = float(config["fleet_mean_kwh_per_100km"])
        metrics |= {"mae": float(np.mean(np.abs(p - y))), "baseline_mae": float(np.mean(np.abs(base - y))),
                    "n_windows": len(y)}  # fmt: skip
    return InferOutput(output=out, rows=rows, metrics={k: v for k, v in metrics.items() if _finite(v)})


def _finite(v: Any) -> bool:
    return not isinstance(v, float) or math.isfinite(v)
