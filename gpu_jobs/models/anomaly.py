"""Anomaly detector: one small forecaster per vehicle type (EV, combustion) over fixed windows.

Each window (default 30 min, epoch-aligned, per vehicle) becomes a vector of physically meaningful features
(:data:`features.ANOMALY_FEATURES`), robustly normalized (median/MAD of the training split). The window's
score is the largest squared residual of its *condition* features (tyres, 12 V, battery or coolant temperature)
against what a small MLP expects from the window's *context* (driving, charging, power, air), each residual
divided by that feature's typical residual on the training windows (:func:`residual_scales`), so a loosely
predictable signal (coolant) does not set the threshold for a tight one (12 V). The threshold per type is the
``threshold_quantile`` of the training windows' scores after dropping gross outliers (above ``outlier`` × the
median): the training vehicles carry unlabelled faults, and fault labels are never used in training.

Evaluation against injected-fault ground truth (``faults.parquet``), on held-out vehicles only:

- a fault's *visible* windows are the windows fully inside ``[start, end)`` where its effect can physically
  be seen: ``tire_leak`` once the tyre has lost 3 kPa (``start + 3 kPa / rate``); ``weak_12v`` windows at least
  half parked (the voltage sags at rest, not while the alternator runs); ``battery_overheat`` windows at least
  a quarter spent driving (the pack heats under load);
- ``recall`` = share of faults with at least one visible window of which **at least half are flagged** (a
  majority rule, so a detector that flags 5 % of windows at random scores ~0, not ~1 as with "any overlap");
  ``window_recall`` = share of all visible windows flagged; faults with no visible window are counted in
  ``faults_not_visible`` and left out;
- ``false_positive_rate`` = flagged share of the windows that overlap no fault (each fault extended by
  ``FAULT_TAIL`` for the pack to cool down).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from depin_core.errors import ConfigError
from gpu_jobs.artifacts import load_artifact
from gpu_jobs.context import InferOutput, JobContext, TrainOutput
from gpu_jobs.models import features as F
from gpu_jobs.models import score as S
from gpu_jobs.models._train import LoopConfig, seed_all, train_loop

DEFAULTS: dict[str, Any] = {
    "window_minutes": 30,
    "holdout": 0.3,
    "bottleneck": 3,
    "hidden": 16,
    "threshold_quantile": 0.99,
    "clip": 20.0,
    "outlier": 20.0,
    "epochs": 30,
    "batch_size": 128,
    "lr": 3e-3,
    "weight_decay": 1e-4,
}
TYPES = (F.ELECTRIC, F.COMBUSTION)
FAULT_TAIL = pl.duration(hours=12)
TIRE_VISIBLE_KPA = 3.0


class ConditionNet(nn.Module):
    """Context features → hidden → bottleneck → hidden → expected condition features.

    Context (driving, charging, power, air temperature) explains what the condition signals (tyres, 12 V,
    battery or coolant temperature) should be; a window is anomalous when they are far from that — not
    because driving is rarer than parking. The residuals are the anomaly evidence.
    """

    def __init__(self, d: int, hidden: int, bottleneck: int, d_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, bottleneck), nn.SiLU(),
            nn.Linear(bottleneck, hidden), nn.SiLU(), nn.Linear(hidden, d_out),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _hparams(ctx: JobContext) -> dict[str, Any]:
    hp = dict(getattr(ctx.spec.model, "hyperparameters", {}) or {})
    unknown = set(hp) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"anomaly: unknown hyperparameter(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **hp}


def build_net(config: dict[str, Any], state: dict[str, torch.Tensor] | None = None) -> nn.ModuleDict:
    """The per-type autoencoders described by ``config`` (weights from ``state`` when given)."""
    hp = config["hyperparameters"]
    net = nn.ModuleDict(
        {
            t: ConditionNet(
                len(n) - len(_condition(n)), int(hp["hidden"]), int(hp["bottleneck"]), len(_condition(n))
            )
            for t, n in norms(config).items()
        }
    )
    if state is not None:
        net.load_state_dict(state)
    return net.eval()


def norms(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per vehicle type, the normalization in the network's feature order (see ``F.ordered_norm``)."""
    return {t: F.ordered_norm(n, config["features"][t]) for t, n in config["norm"].items()}


def _condition(norm: dict[str, Any]) -> list[int]:
    """Column positions of the condition features (the ones scored) in a type's feature order."""
    return [i for i, n in enumerate(norm) if n in F.ROBUST_ANOMALY]


def _context(norm: dict[str, Any]) -> list[int]:
    """Column positions of the context features (the model's inputs)."""
    return [i for i, n in enumerate(norm) if n not in F.ROBUST_ANOMALY]


def score_windows(net: nn.ModuleDict, config: dict[str, Any], windows: pl.DataFrame) -> pl.DataFrame:
    """``windows`` (types the model knows) plus ``score``, ``threshold`` and ``flagged``."""
    clip = float(config["hyperparameters"]["clip"])
    parts = []
    for t, norm in norms(config).items():
        w = windows.filter(pl.col("powertrain") == t)
        if w.is_empty():
            continue
        err = (residuals(net[t], norm, w, clip) / _scales(config, t, norm)) ** 2
        err = err.max(axis=1)
        thr = float(config["thresholds"][t])
        parts.append(w.with_columns(pl.Series("score", err), pl.lit(thr).alias("threshold"),
                                    pl.Series("flagged", err > thr)))  # fmt: skip
    if not parts:
        return windows.head(0).with_columns(
            pl.lit(0.0).alias("score"), pl.lit(0.0).alias("threshold"), pl.lit(False).alias("flagged")
        )
    return pl.concat(parts).sort("token_id", "window_start")


def residuals(net: nn.Module, norm: dict[str, Any], windows: pl.DataFrame, clip: float) -> np.ndarray:
    """``(windows, condition features)`` residuals: observed minus expected, in normalized units."""
    x = torch.from_numpy(F.apply_norm(windows, norm, clip=clip))
    with torch.no_grad():
        return (x[:, _condition(norm)] - net(x[:, _context(norm)])).numpy()


def _scales(config: dict[str, Any], t: str, norm: dict[str, Any]) -> np.ndarray:
    scales = config.get("residual_scales", {}).get(t)
    return np.ones(len(_condition(norm)), np.float32) if scales is None else np.asarray(scales, np.float32)


def residual_scales(res: np.ndarray) -> list[float]:
    """Per condition feature, the typical residual size: the 0.75 quantile of ``|residual|``.

    Features differ in how well the context explains them (coolant warms up at a different pace every trip;
    tyres barely move), so one common scale lets the loosest feature set the threshold for all. The 0.75
    quantile stays put while up to ~25 % of the training windows are (unlabelled) faults.
    """
    q = np.quantile(np.abs(res), 0.75, axis=0) if len(res) else np.ones(res.shape[1])
    return [float(max(v, 1e-3)) for v in q]


def visible_windows(scored: pl.DataFrame, faults: pl.DataFrame) -> pl.DataFrame:
    """One row per (fault, window where it is visible): ``fault_id``, ``fault``, ``flagged``."""
    f = faults.with_row_index("fault_id").with_columns(
        pl.col("detail").map_elements(lambda d: float(json.loads(d).get("kpa_per_day", 0.0)), pl.Float64).alias("_rate")
    )  # fmt: skip
    tire_from = pl.col("start") + pl.duration(
        seconds=(TIRE_VISIBLE_KPA / pl.col("_rate") * 86400.0).cast(pl.Int64)
    )
    f = f.with_columns(
        pl.when(pl.col("fault") == "tire_leak").then(tire_from).otherwise(pl.col("start")).alias("_from")
    )
    j = scored.join(f.select("token_id", "fault_id", "fault", "_from", "end"), on="token_id")
    inside = (pl.col("window_start") >= pl.col("_from")) & (pl.col("window_end") <= pl.col("end"))
    physical = (
        pl.when(pl.col("fault") == "weak_12v").then(pl.col("parked_share") >= 0.5)
        .when(pl.col("fault") == "battery_overheat").then(pl.col("moving_share") >= 0.25)
        .otherwise(True)
    )  # fmt: skip
    return j.filter(inside & physical).select("fault_id", "fault", "token_id", "window_start", "flagged")


def evaluate(scored: pl.DataFrame, faults: pl.DataFrame) -> dict[str, Any]:
    """Recall, window recall and false-positive rate of ``scored`` windows against ``faults`` (same vehicles)."""
    faults = faults.filter(pl.col("token_id").is_in(scored["token_id"].unique().implode()))
    vis = visible_windows(scored, faults)
    per_fault = vis.group_by("fault_id", "fault").agg(pl.col("flagged").mean().alias("share"), pl.len())
    detected = per_fault.filter(pl.col("share") >= 0.5)
    clean = (
        scored.join(faults.select("token_id", "start", "end"), on="token_id", how="left")
        .with_columns(
            (
                pl.col("start").is_not_null()
                & (pl.col("window_end") > pl.col("start"))
                & (pl.col("window_start") < pl.col("end") + FAULT_TAIL)
            ).alias("_hit")
        )
        .group_by("token_id", "window_start")
        .agg(pl.col("_hit").any(), pl.col("flagged").first())
    )
    clean = clean.filter(~pl.col("_hit"))
    by_kind = {
        k: {"faults": int(g.height), "detected": int((g["share"] >= 0.5).sum())}
        for (k,), g in per_fault.group_by("fault")
    }
    return {
        "recall": float(detected.height / per_fault.height) if per_fault.height else float("nan"),
        "window_recall": float(vis["flagged"].mean()) if vis.height else float("nan"),  # type: ignore[arg-type]
        "false_positive_rate": float(clean["flagged"].mean()) if clean.height else float("nan"),  # type: ignore[arg-type]
        "n_faults": int(per_fault.height),
        "faults_detected": int(detected.height),
        "faults_not_visible": int(faults.height - per_fault.height),
        "by_fault": by_kind,
        "n_windows": int(scored.height),
        "n_clean_windows": int(clean.height),
    }


def _read_windows(files: list[str], hp: dict[str, Any]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(telemetry table, its windows of known vehicle types) — what training and evaluation start from."""
    table = F.read_telemetry([Path(f) for f in files])
    windows = F.anomaly_windows(table, window_minutes=int(hp["window_minutes"]))
    return table, windows.filter(pl.col("powertrain").is_in(list(TYPES)))


def heldout_metrics(
    net: nn.ModuleDict, config: dict[str, Any], te: pl.DataFrame, faults_path: Path | None
) -> dict[str, Any]:
    """Flagged share of the held-out windows ``te``; recall/FPR against ``faults_path`` when given."""
    scored = score_windows(net, config, te)
    metrics: dict[str, Any] = {
        "heldout_flagged_share": float(scored["flagged"].mean()) if scored.height else 0.0  # type: ignore[arg-type]
    }
    if faults_path is not None:
        metrics |= evaluate(scored, pl.read_parquet(faults_path))
    return metrics


def threshold_from(scores: np.ndarray, q: float, outlier: float) -> float:
    """The ``q`` quantile of the training scores, leaving out gross outliers (above ``outlier`` × the median).

    The training vehicles carry unlabelled faults (a tyre leak or a weak 12 V battery lasts days: in some
    splits over 10 % of the windows); counted in, they would push the quantile up into the fault scores and
    hide the milder faults. Normal windows' scores are a few times their median at most.
    """
    kept = scores[scores <= outlier * np.median(scores)] if len(scores) else scores
    return float(np.quantile(kept if len(kept) else scores, q))


class AnomalyFamily:
    """``"anomaly"``: flags anomalous telemetry windows per vehicle type."""

    name = "anomaly"
    # the telemetry columns it reads (gpu_jobs.minimise sends a remote node nothing else; no location)
    columns = (*F.KEYS, *F.SIGNALS)
    uses_ground_truth = True  # recall / false-positive rate against the injected faults

    def train(self, ctx: JobContext) -> TrainOutput:
        hp = _hparams(ctx)
        seed = int(getattr(ctx.spec, "seed", 0))
        seed_all(seed)
        files, faults_path = F.split_inputs(ctx.inputs)
        table, windows = _read_windows(files, hp)
        train_ids, test_ids = F.split_vehicles(windows["token_id"], holdout=float(hp["holdout"]), seed=seed)
        tr, te = F.by_vehicles(windows, train_ids, test_ids)
        types = [t for t in TYPES if tr.filter(pl.col("powertrain") == t).height]
        norm = {t: F.fit_norm(tr.filter(pl.col("powertrain") == t), list(F.ANOMALY_FEATURES[t]),
                        robust=F.ROBUST_ANOMALY)
                for t in types}  # fmt: skip
        config: dict[str, Any] = {
            "family": self.name,
            "hyperparameters": hp,
            "norm": norm,
            "features": {t: F.feature_schema(F.ANOMALY_FEATURES[t]) for t in types},
            "window": f"{int(hp['window_minutes'])} min, epoch-aligned, per vehicle",
            "score": "largest squared residual of the normalized condition features given the context",
            "condition_features": sorted(F.ROBUST_ANOMALY),
            "outputs": [{"name": "score", "unit": "1"}, {"name": "flagged", "unit": "bool"}],
            "train_vehicles": train_ids.tolist(),
            "heldout_vehicles": test_ids.tolist(),
            "data": F.data_summary(table),
        }
        net = build_net({**config, "thresholds": {}}).to(ctx.device)
        clip = float(hp["clip"])
        parts = [tr.filter(pl.col("powertrain") == t) for t in types]
        xs = [
            torch.from_numpy(F.apply_norm(p, norm[t], clip=clip)).to(ctx.device)
            for p, t in zip(parts, types, strict=True)
        ]
        conds = [_condition(norm[t]) for t in types]
        ctxs = [_context(norm[t]) for t in types]
        kind = torch.cat([torch.full((p.height,), i) for i, p in enumerate(parts)]).to(ctx.device)
        local = torch.cat([torch.arange(p.height) for p in parts]).to(ctx.device)

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

        fit = train_loop(ctx, net, len(kind), loss_fn, LoopConfig.from_hparams(hp), seed=seed, tag="anomaly")
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
        metrics |= heldout_metrics(net, config, te, faults_path)
        if faults_path is not None:
            ctx.log(
                f"anomaly: held-out recall {metrics['recall']:.3f}, FPR {metrics['false_positive_rate']:.3f}"
            )
        state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        return TrainOutput(state_dict=state, model_config=config, metrics=metrics)

    def evaluate(self, model_dir: Path, inputs: list[Path], *, seed: int | None = None) -> dict[str, Any]:
        """Recompute the held-out metrics the training job reported, from the artifact at ``model_dir`` and
        the (verified, local) training inputs: the same windows of the artifact's held-out vehicles scored
        with its weights, thresholds and scales, against the ground truth when the inputs hold it. With ``seed``
        (the spec's), the artifact's split must be the seeded one. ``train_loss`` is not recomputed."""
        art = load_artifact(model_dir)
        config = art.model_config
        if config.get("family") != self.name:
            raise ConfigError(
                f"model is a {config.get('family')!r} model, not 'anomaly'; pass an anomaly model"
            )
        hp = config["hyperparameters"]
        files, faults_path = F.split_inputs(inputs)
        _, windows = _read_windows(files, hp)
        tr, te = F.artifact_split(windows, config, seed=seed)
        net = build_net(config, art.state_dict)
        return {"n_train_windows": tr.height, **heldout_metrics(net, config, te, faults_path)}

    def infer(self, ctx: JobContext, model_dir: Path) -> InferOutput:
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
    batch_rows: int = 131_072,
) -> InferOutput:
    """Stream ``files`` → windows → scores → ``out`` (one row per window); recall/FPR when ``faults`` given.

    Two passes: the per-vehicle tyre baselines (medians over the whole input; five columns), then the
    windows in record batches.
    """
    if config.get("family") != AnomalyFamily.name:
        raise ConfigError(f"model is a {config.get('family')!r} model, not 'anomaly'; pass an anomaly model")
    net = build_net(config, state)
    minutes = int(config["hyperparameters"]["window_minutes"])
    base = tire_baselines_streaming(files)
    evals: list[pl.DataFrame] = []

    def frames() -> Any:
        for df in S.stream_windows(files, S.carry_last_window(minutes), batch_rows=batch_rows):
            scored = score_windows(net, config, F.anomaly_windows(df, window_minutes=minutes, baselines=base))
            evals.append(scored.select("token_id", "window_start", "window_end", "flagged", "parked_share",
                                       "moving_share"))  # fmt: skip
            yield scored

    empty_in = F.conform(pl.DataFrame(schema={"token_id": pl.Int64, "timestamp": pl.Datetime("us", "UTC")}))
    rows = S.write_stream(frames(), out, score_windows(net, config, F.anomaly_windows(empty_in)))
    metrics: dict[str, Any] = {"windows": rows}
    if evals:
        scored_all = pl.concat(evals)
        metrics["flagged_share"] = float(scored_all["flagged"].mean()) if scored_all.height else 0.0  # type: ignore[arg-type]
        if faults is not None and scored_all.height:
            metrics |= evaluate(scored_all, pl.read_parquet(faults))
    return InferOutput(output=out, rows=rows, metrics=metrics)


def tire_baselines_streaming(files: list[str]) -> pl.DataFrame:
    """:func:`features.tire_baselines` over ``files`` reading only the key and tyre columns."""
    frames = []
    for path in files:
        names = pl.read_parquet_schema(path)
        cols = ["token_id", *(t for t in F.TIRES if t in names)]
        frames.append(pl.read_parquet(path, columns=cols, hive_partitioning=False))
    df = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame({"token_id": []})
    for t in F.TIRES:
        if t not in df.columns:
            df = df.with_columns(pl.lit(None, pl.Float64).alias(t))
    return F.tire_baselines(df)
