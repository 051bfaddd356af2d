"""The range model: the fleet net, its per-vehicle causal calibration, and trip predictions."""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from depin_core.errors import ConfigError
from gpu_jobs.models import features as F
from gpu_jobs.models.range import features as RF

NAME = "range"
TARGET = RF.RANGE_TARGET[0]
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


def net_from_config(config: dict[str, Any], state: dict[str, torch.Tensor] | None = None) -> RangeNet:
    """The fleet net described by ``config`` (weights from ``state`` when given), in eval mode."""
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
