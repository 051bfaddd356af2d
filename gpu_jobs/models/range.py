"""EV energy / range model: kWh/100 km per trip, and from it the remaining range.

Two stages:

1. a small torch MLP, trained across the fleet, predicts ``log(kWh/100 km)`` of a trip from its driving and
   weather features (:data:`features.RANGE_FEATURES`: speed profile, stop-and-go, temperature). It is trained
   with one free log offset per training vehicle (fixed effects), so it learns how consumption moves *within*
   a vehicle instead of explaining hidden vehicle differences with whatever happens to correlate with them;
2. a per-vehicle calibration, as real range estimators do: a Bayesian linear fit of the fleet model's
   residual on ``[1, hours per 100 km, cold]`` over the vehicle's own *previous* trips (level, auxiliaries'
   draw, cold sensitivity), shrunk towards 0 (a vehicle with no history gets the fleet model). It is causal:
   a trip's prediction never uses that trip or later ones.

Remaining range (km) = SoC/100 × usable kWh (gross capacity × SoH) / predicted kWh/100 km × 100.

Evaluation is on held-out vehicles (seeded split by ``token_id``): ``mae`` (kWh/100 km) against
``baseline_mae`` (the training vehicles' mean consumption, the naive baseline), plus the fleet model alone
(``fleet_model_mae``) and the fleet mean with the same per-vehicle calibration (``history_baseline_mae``: what
the vehicle's own history gives without the learned model).
"""

from __future__ import annotations

import math
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

TARGET = F.RANGE_TARGET[0]
DEFAULTS: dict[str, Any] = {
    "hidden": 8,
    "holdout": 0.3,
    "min_km": 2.0,
    "shrink_km": 5.0,
    "shrink_hours": 50.0,
    "shrink_cold": 500.0,
    "epochs": 120,
    "batch_size": 32,
    "lr": 3e-3,
    "weight_decay": 1e-2,
}
OUTPUT_COLUMNS = {
    "predicted_kwh_per_100km": "kWh/100km",
    "fleet_kwh_per_100km": "kWh/100km",
    "vehicle_factor": "1",
    "range_km": "km",
}


class RangeNet(nn.Module):
    """MLP: normalized trip features → standardized log consumption."""

    def __init__(self, n_in: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


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


def _net_from_config(config: dict[str, Any], state: dict[str, torch.Tensor] | None = None) -> RangeNet:
    net = RangeNet(len(config["norm"]), int(config["hyperparameters"]["hidden"]))
    if state is not None:
        net.load_state_dict(state)
    return net.eval()


def fleet_predict(net: RangeNet, config: dict[str, Any], trips: pl.DataFrame) -> np.ndarray:
    """The fleet model's kWh/100 km for each trip (no vehicle calibration)."""
    if trips.is_empty():
        return np.zeros(0)
    x = torch.from_numpy(F.apply_norm(trips, F.ordered_norm(config["norm"], config["features"])))
    with torch.no_grad():
        z = net(x.to(next(net.parameters()).device)).float().cpu().numpy()
    return np.exp(z * config["target"]["scale"] + config["target"]["center"])


CAL_FEATURES = ("hours_per_100km", "cold")  # per-vehicle slopes: auxiliaries (kW) and cold sensitivity


class Calibration:
    """Per-vehicle causal calibration: a Bayesian linear fit of the fleet model's residual (kWh/100 km) on
    ``[1, hours_per_100km, cold]`` (centred on the training medians) over the vehicle's *earlier* trips.

    Each trip weighs its km; the prior precision per coefficient (``shrink``, in km) pulls a vehicle with
    little history towards the fleet model. The sufficient statistics (``A = Σ w hhᵀ``, ``b = Σ w h r``) are
    carried across chunks, so streaming gives the same predictions as one pass.
    """

    def __init__(
        self, shrink: list[float], centers: dict[str, float], features: tuple[str, ...] = CAL_FEATURES
    ) -> None:
        if len(shrink) != len(features) + 1:
            raise ConfigError(f"calibration: need {len(features) + 1} shrink values, got {len(shrink)}")
        self.prior = np.diag(np.asarray(shrink, dtype=np.float64))
        self.centers = centers
        self.features = features
        k = len(shrink)
        self.names = [f"a{i}{j}" for i in range(k) for j in range(k)] + [f"b{i}" for i in range(k)]
        self.state = pl.DataFrame(schema={"token_id": pl.Int64, **dict.fromkeys(self.names, pl.Float64)})

    def _design(self, trips: pl.DataFrame) -> np.ndarray:
        cols = [np.ones(trips.height)]
        cols += [trips[c].cast(pl.Float64).fill_null(self.centers[c]).to_numpy() - self.centers[c]
                 for c in self.features]  # fmt: skip
        return np.stack(cols, axis=1)

    def apply(self, trips: pl.DataFrame, fleet: np.ndarray) -> np.ndarray:
        """Additive correction (kWh/100 km) per trip from the vehicle's earlier trips (``trips`` sorted by
        token_id, start)."""
        k = self.prior.shape[0]
        h = self._design(trips)
        r = trips[TARGET].cast(pl.Float64).to_numpy() - fleet
        w = np.where(np.isfinite(r), trips["km"].to_numpy(), 0.0)
        r = np.where(np.isfinite(r), r, 0.0)
        stats = np.concatenate([(w[:, None, None] * h[:, :, None] * h[:, None, :]).reshape(-1, k * k),
                                (w * r)[:, None] * h], axis=1)  # fmt: skip
        d = (
            pl.DataFrame(stats, schema=self.names)
            .with_columns(trips["token_id"])
            .join(self.state, on="token_id", how="left", suffix="_0")
            .with_columns(
                (pl.col(f"{n}_0").fill_null(0.0) + pl.col(n).cum_sum().shift(1).over("token_id").fill_null(0.0))
                .alias(f"{n}_before")
                for n in self.names
            )
        )  # fmt: skip
        totals = d.group_by("token_id").agg(
            (pl.col(f"{n}_0").first().fill_null(0.0) + pl.col(n).sum()).alias(n) for n in self.names
        )
        self.state = pl.concat([self.state.join(totals, on="token_id", how="anti"), totals])
        before = d.select(f"{n}_before" for n in self.names).to_numpy()
        a = before[:, : k * k].reshape(-1, k, k) + self.prior
        coef = np.linalg.solve(a, before[:, k * k :, None])[:, :, 0]
        return (coef * h).sum(axis=1)


def calibration(config: dict[str, Any]) -> Calibration:
    """A fresh :class:`Calibration` with the model's priors and feature centres."""
    hp = config["hyperparameters"]
    shrink = [float(hp["shrink_km"]), float(hp["shrink_hours"]), float(hp["shrink_cold"])]
    return Calibration(shrink, config["calibration_centers"])


def predict_trips(
    net: RangeNet, config: dict[str, Any], trips: pl.DataFrame, cal: Calibration
) -> pl.DataFrame:
    """``trips`` plus :data:`OUTPUT_COLUMNS` (``trips`` sorted by token_id, start)."""
    fleet = fleet_predict(net, config, trips)
    offset = cal.apply(trips, fleet) if trips.height else np.zeros(0)
    pred = np.maximum(fleet + offset, 0.2 * fleet)  # a correction never drives consumption to ~0
    return trips.with_columns(
        pl.Series("predicted_kwh_per_100km", pred),
        pl.Series("fleet_kwh_per_100km", fleet),
        pl.Series("vehicle_factor", pred / fleet),
    ).with_columns(
        (pl.col("soc_end") / 100.0 * pl.col("usable_kwh") / pl.col("predicted_kwh_per_100km") * 100.0).alias(
            "range_km"
        )
    )


def _read_trips(files: list[str], hp: dict[str, Any]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(telemetry table, its measurable trips) — what training and :meth:`RangeFamily.evaluate` start from."""
    table = F.read_telemetry([Path(f) for f in files])
    trips = F.trip_windows(table, min_km=float(hp["min_km"]))
    return table, trips.filter(pl.col(TARGET).is_finite() & (pl.col(TARGET) > 0))


def heldout_metrics(
    net: RangeNet, config: dict[str, Any], te: pl.DataFrame, train_mean: float
) -> dict[str, Any]:
    """The held-out metrics of the fleet model ``net`` + calibration on the held-out trips ``te``."""
    pred = predict_trips(net, config, te.sort("token_id", "start"), calibration(config))
    return _metrics(pred, train_mean, calibration(config))


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


class RangeFamily:
    """``"range"``: EV consumption (kWh/100 km) and remaining range."""

    name = "range"
    # the telemetry columns it reads (gpu_jobs.minimise sends a remote node nothing else; no location)
    columns = (*F.KEYS, *F.SIGNALS)
    uses_ground_truth = False  # evaluated on measured consumption: a fault list given with it stays here

    def train(self, ctx: JobContext) -> TrainOutput:
        hp = _hparams(ctx)
        seed = int(getattr(ctx.spec, "seed", 0))
        seed_all(seed)
        table, trips = _read_trips(F.split_inputs(ctx.inputs)[0], hp)
        if trips["token_id"].n_unique() < 2:
            raise ConfigError("range: need measurable EV trips from at least 2 vehicles; ingest more EV data")
        train_ids, test_ids = F.split_vehicles(trips["token_id"], holdout=float(hp["holdout"]), seed=seed)
        tr, te = F.by_vehicles(trips, train_ids, test_ids)
        logy = np.log(tr[TARGET].to_numpy())
        config: dict[str, Any] = {
            "family": self.name,
            "hyperparameters": hp,
            "norm": F.fit_norm(tr, list(F.RANGE_FEATURES)),
            "target": {"name": TARGET, "unit": F.RANGE_TARGET[1], "transform": "log",
                       "center": float(logy.mean()), "scale": float(logy.std() or 1.0)},
            "fleet_mean_kwh_per_100km": float(tr[TARGET].mean()),  # type: ignore[arg-type]
            "calibration_centers": {c: float(tr[c].median()) for c in CAL_FEATURES},  # type: ignore[arg-type]
            "features": F.feature_schema(F.RANGE_FEATURES),
            "outputs": [{"name": n, "unit": u} for n, u in OUTPUT_COLUMNS.items()],
            "window": "trip (ignition-on run bracketed by parked, not-charging buckets)",
            "train_vehicles": train_ids.tolist(),
            "heldout_vehicles": test_ids.tolist(),
            "data": F.data_summary(table),
        }  # fmt: skip
        net = _net_from_config(config).to(ctx.device)
        x = torch.from_numpy(F.apply_norm(tr, config["norm"])).to(ctx.device)
        y = torch.from_numpy(
            ((logy - config["target"]["center"]) / config["target"]["scale"]).astype(np.float32)
        )
        y = y.to(ctx.device)
        vid = torch.from_numpy(np.searchsorted(train_ids, tr["token_id"].to_numpy())).to(ctx.device)
        model = _WithVehicleOffsets(net, len(train_ids)).to(ctx.device)

        def loss_fn(idx: torch.Tensor) -> torch.Tensor:
            return nn.functional.smooth_l1_loss(model(x[idx], vid[idx]).float(), y[idx])

        cfg = LoopConfig.from_hparams(hp)
        fit = train_loop(ctx, model, tr.height, loss_fn, cfg, seed=seed, tag="range")
        # the fleet model is the net plus the typical vehicle (mean offset); new vehicles start there
        config["target"]["center"] += float(model.offsets.detach().mean()) * config["target"]["scale"]
        net = net.cpu().eval()
        metrics = {
            **heldout_metrics(net, config, te, config["fleet_mean_kwh_per_100km"]),
            "n_train_windows": tr.height,
            "train_loss": fit["loss"],
        }
        ctx.log(
            f"range: held-out mae {metrics['mae']:.3f} vs baseline {metrics['baseline_mae']:.3f} kWh/100km"
        )
        state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        return TrainOutput(state_dict=state, model_config=config, metrics=metrics)

    def evaluate(self, model_dir: Path, inputs: list[Path], *, seed: int | None = None) -> dict[str, Any]:
        """Recompute the held-out metrics the training job reported, from the artifact at ``model_dir`` and
        the (verified, local) training inputs: the same trips, the artifact's held-out vehicles, the training
        vehicles' mean as baseline. With ``seed`` (the spec's), the artifact's split must be the seeded one.
        ``train_loss`` is not recomputed (it needs the training run)."""
        art = load_artifact(model_dir)
        config = art.model_config
        if config.get("family") != self.name:
            raise ConfigError(f"model is a {config.get('family')!r} model, not 'range'; pass a range model")
        hp = config["hyperparameters"]
        _, trips = _read_trips(F.split_inputs(inputs)[0], hp)
        tr, te = F.artifact_split(trips, config, seed=seed)
        train_mean = float(tr[TARGET].mean())  # type: ignore[arg-type]
        net = _net_from_config(config, art.state_dict)
        return {**heldout_metrics(net, config, te, train_mean), "n_train_windows": tr.height}

    def infer(self, ctx: JobContext, model_dir: Path) -> InferOutput:
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
    batch_rows: int = 131_072,
) -> InferOutput:
    """Stream ``files`` → trips → predictions → ``out`` (one row per trip); metrics where measurable."""
    if config.get("family") != RangeFamily.name:
        raise ConfigError(f"model is a {config.get('family')!r} model, not 'range'; pass a range model")
    net = _net_from_config(config, state)
    hp = config["hyperparameters"]
    cal = calibration(config)
    seen: list[pl.DataFrame] = []

    def frames() -> Any:
        for df in S.stream_windows(files, S.carry_open_trips, batch_rows=batch_rows):
            trips = F.trip_windows(df, min_km=float(hp["min_km"])).sort("token_id", "start")
            out_frame = predict_trips(net, config, trips, cal)
            seen.append(out_frame.select(TARGET, "predicted_kwh_per_100km").drop_nulls())
            yield out_frame

    empty = predict_trips(net, config, F.trip_windows(F.conform(pl.DataFrame({"token_id": [], "timestamp": []},
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
