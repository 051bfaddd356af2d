"""Training and held-out evaluation of the anomaly model (held-out vehicles, seeded split by ``token_id``)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from depin_core.errors import ConfigError
from gpu_jobs.artifacts import load_artifact
from gpu_jobs.context import JobContext, TrainOutput
from gpu_jobs.models import features as F
from gpu_jobs.models._train import LoopConfig, seed_all, train_loop
from gpu_jobs.models.anomaly import features as AF
from gpu_jobs.models.anomaly.faults import evaluate as fault_metrics
from gpu_jobs.models.anomaly.faults import window_labels
from gpu_jobs.models.anomaly.model import (
    DEFAULTS,
    NAME,
    TYPES,
    build_net,
    condition_idx,
    context_idx,
    residual_scales,
    residuals,
    score_windows,
    threshold_from,
)
from gpu_jobs.models.plots import (
    FAULTS_FILE,
    HELDOUT_FILE,
    LOSSES_FILE,
    check_report,
    losses_bytes,
    parquet_bytes,
)


def _hparams(ctx: JobContext) -> dict[str, Any]:
    hp = dict(getattr(ctx.spec.model, "hyperparameters", {}) or {})
    unknown = set(hp) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"anomaly: unknown hyperparameter(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **hp}


def _read_windows(files: list[str], hp: dict[str, Any]) -> tuple[dict[str, Any], pl.DataFrame]:
    """(the telemetry's data summary, its windows of known vehicle types) — what training and evaluation
    start from; built by vehicle batches, so only one batch of telemetry is in memory at a time."""
    minutes = int(hp["window_minutes"])
    windows, summary = F.by_vehicle_batches(
        files, lambda df: AF.anomaly_windows(df, window_minutes=minutes), columns=AF.ANOMALY_SIGNALS
    )
    return summary, windows.filter(pl.col("powertrain").is_in(list(TYPES)))


def heldout_metrics(
    net: nn.ModuleDict, config: dict[str, Any], te: pl.DataFrame, faults_path: Path | None
) -> dict[str, Any]:
    """Flagged share of the held-out windows ``te``; recall/FPR against ``faults_path`` when given."""
    return _metrics(score_windows(net, config, te), faults_path)


def _metrics(scored: pl.DataFrame, faults_path: Path | None) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "heldout_flagged_share": float(scored["flagged"].mean()) if scored.height else 0.0  # type: ignore[arg-type]
    }
    if faults_path is not None:
        metrics |= fault_metrics(scored, pl.read_parquet(faults_path))
    return metrics


HELDOUT_COLUMNS = ("token_id", "window_start", "window_end", "powertrain", "score", "threshold", "flagged")


def report_files(scored: pl.DataFrame, faults_path: Path | None) -> dict[str, bytes]:
    """The held-out windows' scores (with each window's ground-truth ``label`` when faults are given) and
    the held-out vehicles' faults: what the model report plots."""
    table = scored.select(*HELDOUT_COLUMNS)
    if faults_path is None:
        return {HELDOUT_FILE: parquet_bytes(table.with_columns(pl.lit(None, pl.String).alias("label")))}
    faults = pl.read_parquet(faults_path).filter(
        pl.col("token_id").is_in(scored["token_id"].unique().implode())
    )
    labelled = window_labels(scored, faults).select(*HELDOUT_COLUMNS, "label")
    return {
        HELDOUT_FILE: parquet_bytes(labelled),
        FAULTS_FILE: parquet_bytes(faults.select("token_id", "fault", "start", "end")),
    }


def train(ctx: JobContext) -> TrainOutput:
    """Train one forecaster per vehicle type on the seeded training vehicles; thresholds; held-out metrics."""
    hp = _hparams(ctx)
    seed = int(getattr(ctx.spec, "seed", 0))
    seed_all(seed)
    files, faults_path = F.split_inputs(ctx.inputs)
    summary, windows = _read_windows(files, hp)
    train_ids, test_ids = F.split_vehicles(windows["token_id"], holdout=float(hp["holdout"]), seed=seed)
    tr, te = F.by_vehicles(windows, train_ids, test_ids)
    types = [t for t in TYPES if tr.filter(pl.col("powertrain") == t).height]
    norm = {t: F.fit_norm(tr.filter(pl.col("powertrain") == t), list(AF.ANOMALY_FEATURES[t]),
                    robust=AF.ROBUST_ANOMALY)
            for t in types}  # fmt: skip
    config: dict[str, Any] = {
        "family": NAME,
        "hyperparameters": hp,
        "norm": norm,
        "features": {t: F.feature_schema(AF.ANOMALY_FEATURES[t]) for t in types},
        "window": f"{int(hp['window_minutes'])} min, epoch-aligned, per vehicle",
        "score": "largest squared residual of the normalized condition features given the context",
        "condition_features": sorted(AF.ROBUST_ANOMALY),
        "outputs": [{"name": "score", "unit": "1"}, {"name": "flagged", "unit": "bool"}],
        "train_vehicles": train_ids.tolist(),
        "heldout_vehicles": test_ids.tolist(),
        "data": summary,
    }
    net = build_net({**config, "thresholds": {}}).to(ctx.device)
    clip = float(hp["clip"])
    parts = [tr.filter(pl.col("powertrain") == t) for t in types]
    xs = [
        torch.from_numpy(F.apply_norm(p, norm[t], clip=clip)).to(ctx.device)
        for p, t in zip(parts, types, strict=True)
    ]
    conds = [condition_idx(norm[t]) for t in types]
    ctxs = [context_idx(norm[t]) for t in types]
    kind = torch.cat([torch.full((p.height,), i) for i, p in enumerate(parts)]).to(ctx.device)
    local = torch.cat([torch.arange(p.height) for p in parts]).to(ctx.device)

    te_x = [
        torch.from_numpy(F.apply_norm(te.filter(pl.col("powertrain") == t), norm[t], clip=clip)).to(
            ctx.device
        )
        for t in types
    ]

    def val_fn() -> float:  # the same forecasting loss on the held-out vehicles' windows
        total, n = 0.0, 0
        for i, t in enumerate(types):
            if len(x := te_x[i]):
                y = x[:, conds[i]]
                loss = nn.functional.smooth_l1_loss(net[t](x[:, ctxs[i]]).float(), y, reduction="sum")
                total, n = total + float(loss) / y.shape[1], n + len(x)
        return total / max(n, 1)

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), device=idx.device)
        for i, t in enumerate(types):
            sel = local[idx[kind[idx] == i]]
            if len(sel):
                x = xs[i][sel]
                y = x[:, conds[i]]
                total = (
                    total
                    + nn.functional.smooth_l1_loss(net[t](x[:, ctxs[i]]).float(), y, reduction="sum")
                    / y.shape[1]
                )
        return total / len(idx)

    has_val = sum(len(x) for x in te_x) > 0
    fit = train_loop(ctx, net, len(kind), loss_fn, LoopConfig.from_hparams(hp), seed=seed, tag="anomaly",
                     val_fn=val_fn if has_val else None)  # fmt: skip
    net = net.cpu().eval()
    q = float(hp["threshold_quantile"])
    config["residual_scales"] = {
        t: residual_scales(residuals(net[t], norm[t], p, clip)) for p, t in zip(parts, types, strict=True)
    }
    train_scores = score_windows(net, {**config, "thresholds": dict.fromkeys(types, np.inf)}, tr)
    config["thresholds"] = {
        t: threshold_from(
            train_scores.filter(pl.col("powertrain") == t)["score"].to_numpy(), q, float(hp["outlier"])
        )
        for t in types
    }
    metrics: dict[str, Any] = {"n_train_windows": tr.height, "train_loss": fit["loss"]}
    scored = score_windows(net, config, te)
    metrics |= _metrics(scored, faults_path)
    if faults_path is not None:
        ctx.log(f"anomaly: held-out recall {metrics['recall']:.3f}, FPR {metrics['false_positive_rate']:.3f}")
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    report = {
        **report_files(scored, faults_path),
        LOSSES_FILE: losses_bytes(fit["history"], loss="smooth L1 of normalised condition features"),
    }
    return TrainOutput(state_dict=state, model_config=config, metrics=metrics, files=report)


def evaluate(model_dir: Path, inputs: list[Path], *, seed: int | None = None) -> dict[str, Any]:
    """Recompute the held-out metrics the training job reported, from the artifact at ``model_dir`` and
    the (verified, local) training inputs: the same windows of the artifact's held-out vehicles scored
    with its weights, thresholds and scales, against the ground truth when the inputs hold it. With ``seed``
    (the spec's), the artifact's split must be the seeded one. The held-out scores and faults the plots are
    drawn from (``report/``) must be these too (``VerifyError``). ``train_loss`` is not recomputed."""
    art = load_artifact(model_dir)
    config = art.model_config
    if config.get("family") != NAME:
        raise ConfigError(f"model is a {config.get('family')!r} model, not 'anomaly'; pass an anomaly model")
    hp = config["hyperparameters"]
    files, faults_path = F.split_inputs(inputs)
    _, windows = _read_windows(files, hp)
    tr, te = F.artifact_split(windows, config, seed=seed)
    net = build_net(config, art.state_dict)
    scored = score_windows(net, config, te)
    for name, data in report_files(scored, faults_path).items():  # the plots' data: these scores too
        check_report(model_dir, name, pl.read_parquet(io.BytesIO(data)))
    return {"n_train_windows": tr.height, **_metrics(scored, faults_path)}
