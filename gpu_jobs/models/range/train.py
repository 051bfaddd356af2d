"""Training and held-out evaluation of the range model (held-out vehicles, seeded split by ``token_id``)."""

from __future__ import annotations

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
from gpu_jobs.models.plots import HELDOUT_FILE, LOSSES_FILE, check_report, losses_bytes, parquet_bytes
from gpu_jobs.models.range import features as RF
from gpu_jobs.models.range.model import (
    CAL_FEATURES,
    DEFAULTS,
    NAME,
    OUTPUT_COLUMNS,
    TARGET,
    Calibration,
    RangeNet,
    calibration,
    net_from_config,
    predict_trips,
)


class _WithVehicleOffsets(nn.Module):
    """Training-time wrapper: the net plus one learned log offset per training vehicle (fixed effects).

    Vehicles differ in hidden ways (efficiency, auxiliaries); without the offsets the net would explain those
    differences with whatever features happen to correlate with them across a few vehicles (city climate,
    battery size). With them it learns how consumption varies *within* a vehicle; the per-vehicle level is
    left to the causal calibration at prediction time.
    """

    def __init__(self, net: RangeNet, n_vehicles: int) -> None:
        super().__init__()
        self.net = net
        self.offsets = nn.Parameter(torch.zeros(n_vehicles))

    def forward(self, x: torch.Tensor, vehicle: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.offsets[vehicle]


def _hparams(ctx: JobContext) -> dict[str, Any]:
    hp = dict(getattr(ctx.spec.model, "hyperparameters", {}) or {})
    unknown = set(hp) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"range: unknown hyperparameter(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **hp}


def _read_trips(files: list[str], hp: dict[str, Any]) -> tuple[dict[str, Any], pl.DataFrame]:
    """(the telemetry's data summary, its measurable trips) — what training and :func:`evaluate` start
    from; built by vehicle batches, so only one batch of telemetry is in memory at a time."""
    min_km = float(hp["min_km"])
    trips, summary = F.by_vehicle_batches(
        files, lambda df: RF.trip_windows(df, min_km=min_km), columns=RF.RANGE_SIGNALS
    )
    return summary, trips.filter(pl.col(TARGET).is_finite() & (pl.col(TARGET) > 0))


def heldout_metrics(
    net: RangeNet, config: dict[str, Any], te: pl.DataFrame, train_mean: float
) -> dict[str, Any]:
    """The held-out metrics of the fleet model ``net`` + calibration on the held-out trips ``te``."""
    pred = predict_trips(net, config, te.sort("token_id", "start"), calibration(config))
    return _metrics(pred, train_mean, calibration(config))


HELDOUT_COLUMNS = ("token_id", "start", "end", "km", TARGET, "predicted_kwh_per_100km", "fleet_kwh_per_100km")


def heldout_table(pred: pl.DataFrame, train_mean: float) -> pl.DataFrame:
    """What the model report plots: per held-out trip, actual and predicted kWh/100 km, the fleet model's and
    the naive baseline's (the training vehicles' mean) prediction."""
    return pred.select(*HELDOUT_COLUMNS).with_columns(
        pl.lit(train_mean, pl.Float64).alias("baseline_kwh_per_100km")
    )


def _metrics(pred: pl.DataFrame, train_mean: float, cal: Calibration) -> dict[str, Any]:
    """Held-out metrics (kWh/100 km unless named otherwise)."""
    y = pred[TARGET].to_numpy()
    p = pred["predicted_kwh_per_100km"].to_numpy()
    fleet = pred["fleet_kwh_per_100km"].to_numpy()
    # the same per-vehicle calibration on top of the fleet mean: what the vehicle's history alone gives
    hist = train_mean + cal.apply(pred, np.full(len(y), train_mean))
    energy = pred["soc_start"].to_numpy() / 100.0 * pred["usable_kwh"].to_numpy() * 100.0
    return {
        "mae": float(np.mean(np.abs(p - y))),
        "baseline_mae": float(np.mean(np.abs(train_mean - y))),
        "fleet_model_mae": float(np.mean(np.abs(fleet - y))),
        "history_baseline_mae": float(np.mean(np.abs(hist - y))),
        "mape": float(np.mean(np.abs(p - y) / y)),
        "range_mae_km": float(np.mean(np.abs(energy / p - energy / y))),
        "baseline_range_mae_km": float(np.mean(np.abs(energy / train_mean - energy / y))),
        "n_windows": len(y),
        "n_vehicles": int(pred["token_id"].n_unique()),
        "unit": "kWh/100km",
    }


def train(ctx: JobContext) -> TrainOutput:
    """Train the fleet net (with per-vehicle offsets) on the seeded training vehicles; held-out metrics."""
    hp = _hparams(ctx)
    seed = int(getattr(ctx.spec, "seed", 0))
    seed_all(seed)
    summary, trips = _read_trips(F.split_inputs(ctx.inputs)[0], hp)
    if trips["token_id"].n_unique() < 2:
        raise ConfigError("range: need measurable EV trips from at least 2 vehicles; ingest more EV data")
    train_ids, test_ids = F.split_vehicles(trips["token_id"], holdout=float(hp["holdout"]), seed=seed)
    tr, te = F.by_vehicles(trips, train_ids, test_ids)
    logy = np.log(tr[TARGET].to_numpy())
    config: dict[str, Any] = {
        "family": NAME,
        "hyperparameters": hp,
        "norm": F.fit_norm(tr, list(RF.RANGE_FEATURES)),
        "target": {"name": TARGET, "unit": RF.RANGE_TARGET[1], "transform": "log",
                   "center": float(logy.mean()), "scale": float(logy.std() or 1.0)},
        "fleet_mean_kwh_per_100km": float(tr[TARGET].mean()),  # type: ignore[arg-type]
        "calibration_centers": {c: float(tr[c].median()) for c in CAL_FEATURES},  # type: ignore[arg-type]
        "features": F.feature_schema(RF.RANGE_FEATURES),
        "outputs": [{"name": n, "unit": u} for n, u in OUTPUT_COLUMNS.items()],
        "window": "trip (ignition-on run bracketed by parked, not-charging buckets)",
        "train_vehicles": train_ids.tolist(),
        "heldout_vehicles": test_ids.tolist(),
        "data": summary,
    }  # fmt: skip
    net = net_from_config(config).to(ctx.device)
    x = torch.from_numpy(F.apply_norm(tr, config["norm"])).to(ctx.device)
    y = torch.from_numpy(((logy - config["target"]["center"]) / config["target"]["scale"]).astype(np.float32))
    y = y.to(ctx.device)
    vid = torch.from_numpy(np.searchsorted(train_ids, tr["token_id"].to_numpy())).to(ctx.device)
    model = _WithVehicleOffsets(net, len(train_ids)).to(ctx.device)

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        return nn.functional.smooth_l1_loss(model(x[idx], vid[idx]).float(), y[idx])

    # validation: the held-out vehicles' trips under the fleet model (the typical vehicle's offset)
    x_te = torch.from_numpy(F.apply_norm(te, config["norm"])).to(ctx.device)
    y_te = (np.log(te[TARGET].to_numpy()) - config["target"]["center"]) / config["target"]["scale"]
    y_te_t = torch.from_numpy(y_te.astype(np.float32)).to(ctx.device)

    def val_fn() -> float:
        return float(nn.functional.smooth_l1_loss(net(x_te).float() + model.offsets.mean(), y_te_t))

    cfg = LoopConfig.from_hparams(hp)
    fit = train_loop(
        ctx, model, tr.height, loss_fn, cfg, seed=seed, tag="range", val_fn=val_fn if te.height else None
    )
    # the fleet model is the net plus the typical vehicle (mean offset); new vehicles start there
    config["target"]["center"] += float(model.offsets.detach().mean()) * config["target"]["scale"]
    net = net.cpu().eval()
    train_mean = config["fleet_mean_kwh_per_100km"]
    pred = predict_trips(net, config, te.sort("token_id", "start"), calibration(config))
    metrics = {
        **_metrics(pred, train_mean, calibration(config)),
        "n_train_windows": tr.height,
        "train_loss": fit["loss"],
    }
    ctx.log(f"range: held-out mae {metrics['mae']:.3f} vs baseline {metrics['baseline_mae']:.3f} kWh/100km")
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    files = {
        HELDOUT_FILE: parquet_bytes(heldout_table(pred, train_mean)),
        LOSSES_FILE: losses_bytes(fit["history"], loss="smooth L1 of standardised log kWh/100 km"),
    }
    return TrainOutput(state_dict=state, model_config=config, metrics=metrics, files=files)


def evaluate(model_dir: Path, inputs: list[Path], *, seed: int | None = None) -> dict[str, Any]:
    """Recompute the held-out metrics the training job reported, from the artifact at ``model_dir`` and
    the (verified, local) training inputs: the same trips, the artifact's held-out vehicles, the training
    vehicles' mean as baseline. With ``seed`` (the spec's), the artifact's split must be the seeded one.
    The held-out predictions the plots are drawn from (``report/heldout.parquet``) must be these too
    (``VerifyError``). ``train_loss`` and the per-epoch losses are not recomputed (they need the training
    run)."""
    art = load_artifact(model_dir)
    config = art.model_config
    if config.get("family") != NAME:
        raise ConfigError(f"model is a {config.get('family')!r} model, not 'range'; pass a range model")
    hp = config["hyperparameters"]
    _, trips = _read_trips(F.split_inputs(inputs)[0], hp)
    tr, te = F.artifact_split(trips, config, seed=seed)
    train_mean = float(tr[TARGET].mean())  # type: ignore[arg-type]
    net = net_from_config(config, art.state_dict)
    pred = predict_trips(net, config, te.sort("token_id", "start"), calibration(config))
    # the plots' data must be these predictions too, not numbers the node chose
    check_report(model_dir, HELDOUT_FILE, heldout_table(pred, float(config["fleet_mean_kwh_per_100km"])))
    return {**_metrics(pred, train_mean, calibration(config)), "n_train_windows": tr.height}
