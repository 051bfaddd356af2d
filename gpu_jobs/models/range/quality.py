"""The range family's quality bar, baseline and report text: held-out MAE below the fleet-mean baseline."""

from __future__ import annotations

import math
from typing import Any

from depin_core.plots import quantity, sig
from gpu_jobs.models.base import Quality

UNIT = "kWh/100 km"


def _finite(metrics: dict[str, Any], key: str) -> float | None:
    v = metrics.get(key)
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def quality(metrics: dict[str, Any]) -> Quality:
    """Accepted when the held-out ``mae < baseline_mae`` (the training vehicles' mean consumption)."""
    mae, base = _finite(metrics, "mae"), _finite(metrics, "baseline_mae")
    baseline = {"baseline_mae": base, "history_baseline_mae": _finite(metrics, "history_baseline_mae")}
    if mae is None or base is None:
        return Quality(accepted=False, baseline=baseline, reasons=["mae/baseline_mae missing"])
    if mae >= base:
        return Quality(
            accepted=False,
            baseline=baseline,
            reasons=[f"held-out mae {mae:.4g} is not below the fleet-mean baseline {base:.4g}"],
        )
    return Quality(accepted=True, baseline=baseline)


def summary(m: dict[str, Any]) -> str:
    """The held-out MAE against the fleet-mean and vehicle-history baselines (markdown, numbers for people)."""
    mae, base = _finite(m, "mae"), _finite(m, "baseline_mae")
    ratio = mae / base if mae is not None and base else None
    return (
        f"Held-out MAE **{quantity(mae, UNIT)}** vs the fleet-mean baseline **{quantity(base, UNIT)}** "
        f"(ratio {sig(ratio)}); vehicle-history baseline {quantity(_finite(m, 'history_baseline_mae'), UNIT)}."
    )
