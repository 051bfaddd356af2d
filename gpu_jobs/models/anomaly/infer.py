"""Batch scoring with the anomaly model: telemetry by vehicle batches → windows → scores (one Parquet file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import torch

from depin_core.errors import ConfigError
from gpu_jobs.artifacts import load_artifact
from gpu_jobs.context import InferOutput, JobContext
from gpu_jobs.models import features as F
from gpu_jobs.models import score as S
from gpu_jobs.models.anomaly import features as AF
from gpu_jobs.models.anomaly.faults import evaluate as fault_metrics
from gpu_jobs.models.anomaly.model import NAME, build_net, score_windows


def infer(ctx: JobContext, model_dir: Path) -> InferOutput:
    """Score every window of the input telemetry → ``<outputs.dir>/predictions.parquet``."""
    art = load_artifact(model_dir)
    files, faults_path = F.split_inputs(ctx.inputs)
    out = S.predictions_path(ctx)
    return score_dataset(art.state_dict, art.model_config, files, out, faults=faults_path)


def score_dataset(
    state: dict[str, torch.Tensor],
    config: dict[str, Any],
    files: list[str],
    out: Path,
    *,
    faults: Path | None = None,
    batch_rows: int | None = None,
) -> InferOutput:
    """``files`` by vehicle batches (about ``batch_rows`` telemetry rows, default ``F.BATCH_ROWS``) → windows
    → scores → ``out`` (one row per window); recall/FPR when ``faults`` given. A batch holds each of its
    vehicles' whole input, so the per-vehicle tyre baselines are those of the whole input."""
    if config.get("family") != NAME:
        raise ConfigError(f"model is a {config.get('family')!r} model, not 'anomaly'; pass an anomaly model")
    net = build_net(config, state)
    minutes = int(config["hyperparameters"]["window_minutes"])
    evals: list[pl.DataFrame] = []

    def frames() -> Any:
        for df in F.TelemetryFiles(files, AF.ANOMALY_SIGNALS).batches(batch_rows):
            scored = score_windows(net, config, AF.anomaly_windows(df, window_minutes=minutes))
            evals.append(scored.select("token_id", "window_start", "window_end", "flagged", "parked_share",
                                       "moving_share"))  # fmt: skip
            yield scored

    empty_in = F.conform(pl.DataFrame(schema={"token_id": pl.Int64, "timestamp": pl.Datetime("us", "UTC")}))
    rows = S.write_stream(frames(), out, score_windows(net, config, AF.anomaly_windows(empty_in)))
    metrics: dict[str, Any] = {"windows": rows}
    if evals:
        scored_all = pl.concat(evals)
        metrics["flagged_share"] = float(scored_all["flagged"].mean()) if scored_all.height else 0.0  # type: ignore[arg-type]
        if faults is not None and scored_all.height:
            metrics |= fault_metrics(scored_all, pl.read_parquet(faults))
    return InferOutput(output=out, rows=rows, metrics=metrics)
