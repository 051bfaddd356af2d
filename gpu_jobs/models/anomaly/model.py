"""The anomaly model: one small forecaster per vehicle type, its scores, residual scales and thresholds."""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from gpu_jobs.models import features as F
from gpu_jobs.models.anomaly import features as AF

NAME = "anomaly"
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


def build_net(config: dict[str, Any], state: dict[str, torch.Tensor] | None = None) -> nn.ModuleDict:
    """The per-type autoencoders described by ``config`` (weights from ``state`` when given)."""
    hp = config["hyperparameters"]
    net = nn.ModuleDict(
        {
            t: ConditionNet(
                len(n) - len(condition_idx(n)),
                int(hp["hidden"]),
                int(hp["bottleneck"]),
                len(condition_idx(n)),
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


def condition_idx(norm: dict[str, Any]) -> list[int]:
    """Column positions of the condition features (the ones scored) in a type's feature order."""
    return [i for i, n in enumerate(norm) if n in AF.ROBUST_ANOMALY]


def context_idx(norm: dict[str, Any]) -> list[int]:
    """Column positions of the context features (the model's inputs)."""
    return [i for i, n in enumerate(norm) if n not in AF.ROBUST_ANOMALY]


def score_windows(net: nn.ModuleDict, config: dict[str, Any], windows: pl.DataFrame) -> pl.DataFrame:
    """``windows`` (types the model knows) plus ``score``, ``threshold`` and ``flagged``."""
    clip = float(config["hyperparameters"]["clip"])
    parts = []
    for t, norm in norms(config).items():
        w = windows.filter(pl.col("powertrain") == t)
        if w.is_empty():
            continue
        err = (residuals(net[t], norm, w, clip) / scales_of(config, t, norm)) ** 2
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
        return (x[:, condition_idx(norm)] - net(x[:, context_idx(norm)])).numpy()


def scales_of(config: dict[str, Any], t: str, norm: dict[str, Any]) -> np.ndarray:
    """Type ``t``'s residual scale per condition feature (:func:`residual_scales`; ones if none stored)."""
    scales = config.get("residual_scales", {}).get(t)
    return np.ones(len(condition_idx(norm)), np.float32) if scales is None else np.asarray(scales, np.float32)


def residual_scales(res: np.ndarray) -> list[float]:
    """Per condition feature, the typical residual size: the 0.75 quantile of ``|residual|``.

    Features differ in how well the context explains them (coolant warms up at a different pace every trip;
    tyres barely move), so one common scale lets the loosest feature set the threshold for all. The 0.75
    quantile stays put while up to ~25 % of the training windows are (unlabelled) faults.
    """
    q = np.quantile(np.abs(res), 0.75, axis=0) if len(res) else np.ones(res.shape[1])
    return [float(max(v, 1e-3)) for v in q]


def threshold_from(scores: np.ndarray, q: float, outlier: float) -> float:
    """The ``q`` quantile of the training scores, leaving out gross outliers (above ``outlier`` × the median).

    The training vehicles carry unlabelled faults (a tyre leak or a weak 12 V battery lasts days: in some
    splits over 10 % of the windows); counted in, they would push the quantile up into the fault scores and
    hide the milder faults. Normal windows' scores are a few times their median at most.
    """
    kept = scores[scores <= outlier * np.median(scores)] if len(scores) else scores
    return float(np.quantile(kept if len(kept) else scores, q))
