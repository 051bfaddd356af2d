"""The range model's report plots, from its held-out trips (``report/heldout.parquet``, real vehicle ids):
predicted vs actual kWh/100 km with the y = x line and the fleet-mean baseline, and the residuals per
vehicle; plus the shared loss curve."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from depin_core import plots as P
from gpu_jobs.models.base import Plot
from gpu_jobs.models.plots import HELDOUT_FILE, loss_plot, read_report
from gpu_jobs.models.range.model import TARGET

if TYPE_CHECKING:
    from matplotlib.figure import Figure

UNIT = "kWh/100 km"
MAX_POINTS = 2000  # scatter points drawn (evenly thinned; the MAEs are over every trip)
MAX_VEHICLES = 40  # residual boxes drawn (the first by id)
MAX_LEGEND = 10  # vehicles coloured individually in the scatter


def predicted_vs_actual_data(model_dir: Path, max_points: int = MAX_POINTS) -> dict[str, Any]:
    """Per held-out trip (thinned to ``max_points``): actual and predicted kWh/100 km and the vehicle; the
    baseline's constant prediction; the model's and the baseline's MAE over every held-out trip."""
    h = read_report(model_dir, HELDOUT_FILE).sort("token_id", "start")
    y = h[TARGET].to_numpy()
    p = h["predicted_kwh_per_100km"].to_numpy()
    base = h["baseline_kwh_per_100km"].to_numpy()
    idx = P.thin(h.height, max_points)
    return {
        "unit": UNIT,
        "actual": y[idx].tolist(),
        "predicted": p[idx].tolist(),
        "token_id": h["token_id"].to_numpy()[idx].tolist(),
        "baseline": float(base[0]) if h.height else None,
        "mae": float(np.mean(np.abs(p - y))) if h.height else None,
        "baseline_mae": float(np.mean(np.abs(base - y))) if h.height else None,
        "n_trips": h.height,
    }


def draw_predicted_vs_actual(data: dict[str, Any]) -> Figure:
    """Scatter of predicted vs actual, the y = x line, the baseline's prediction, both MAEs in the legend."""
    fig = P.figure(6.0, 5.0)
    ax = fig.add_subplot()
    y, p, ids = np.asarray(data["actual"]), np.asarray(data["predicted"]), np.asarray(data["token_id"])
    vehicles = sorted(set(ids.tolist()))
    if len(vehicles) <= MAX_LEGEND:
        for v in vehicles:
            sel = ids == v
            ax.scatter(y[sel], p[sel], s=14, alpha=0.75, label=f"vehicle {v}")
    else:
        ax.scatter(y, p, s=8, alpha=0.5, color="tab:blue", label=f"{len(vehicles)} vehicles")
    values = np.concatenate([y, p, [data["baseline"]] if data["baseline"] is not None else []])
    lo, hi = (float(np.min(values)), float(np.max(values))) if len(values) else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    ax.plot(
        [lo, hi], [lo, hi], color="black", lw=1, label=f"y = x (model MAE {P.quantity(data['mae'], UNIT)})"
    )
    if data["baseline"] is not None:
        ax.axhline(data["baseline"], color="tab:red", ls="--", lw=1,
                   label=f"fleet-mean baseline (MAE {P.quantity(data['baseline_mae'], UNIT)})")  # fmt: skip
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(f"actual energy use per trip ({UNIT})")
    ax.set_ylabel(f"predicted ({UNIT})")
    ax.set_title(f"Held-out trips: predicted vs actual ({data['n_trips']} trips)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return fig


def residuals_data(model_dir: Path, max_vehicles: int = MAX_VEHICLES) -> dict[str, Any]:
    """Per held-out vehicle (the first ``max_vehicles`` by id): the box statistics of its trips' residuals
    (predicted − actual, kWh/100 km) over every trip, its MAE and trip count."""
    h = read_report(model_dir, HELDOUT_FILE).sort("token_id", "start")
    res = h["predicted_kwh_per_100km"].to_numpy() - h[TARGET].to_numpy()
    ids = h["token_id"].to_numpy()
    vehicles = sorted(set(ids.tolist()))
    boxes = []
    for v in vehicles[:max_vehicles]:
        r = res[ids == v]
        q1, med, q3 = (float(x) for x in np.quantile(r, [0.25, 0.5, 0.75]))
        iqr = q3 - q1
        inside = r[(r >= q1 - 1.5 * iqr) & (r <= q3 + 1.5 * iqr)]
        boxes.append({
            "token_id": int(v), "n": len(r), "mean": float(r.mean()), "mae": float(np.abs(r).mean()),
            "q1": q1, "median": med, "q3": q3,
            "whislo": float(inside.min()), "whishi": float(inside.max()),
            "min": float(r.min()), "max": float(r.max()),
        })  # fmt: skip
    return {"unit": UNIT, "vehicles": boxes, "n_vehicles": len(vehicles)}


def draw_residuals(data: dict[str, Any]) -> Figure:
    """One box per vehicle (quartiles, 1.5 IQR whiskers, min/max as dots), the mean as a diamond."""
    boxes = data["vehicles"]
    fig = P.figure(max(5.0, min(12.0, 1.0 + 0.35 * len(boxes))), 4.0)
    ax = fig.add_subplot()
    stats = [{"label": str(b["token_id"]), "q1": b["q1"], "med": b["median"], "q3": b["q3"],
              "whislo": b["whislo"], "whishi": b["whishi"], "fliers": [b["min"], b["max"]], "mean": b["mean"]}
             for b in boxes]  # fmt: skip
    if stats:
        ax.bxp(stats, showmeans=True, showfliers=True)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xlabel("held-out vehicle (token_id)")
    ax.set_ylabel(f"predicted − actual ({UNIT})")
    shown = f"{len(boxes)} of {data['n_vehicles']}" if len(boxes) < data["n_vehicles"] else str(len(boxes))
    ax.set_title(f"Residuals per held-out vehicle ({shown} vehicles)")
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    ax.grid(alpha=0.3, axis="y")
    return fig


def plots(model_dir: Path) -> list[Plot]:
    """The range model report's plots."""
    return [
        loss_plot(model_dir),
        Plot("predicted_vs_actual", "Held-out trips: predicted vs actual energy use",
             lambda: predicted_vs_actual_data(model_dir), draw_predicted_vs_actual),
        Plot("residuals", "Residuals per held-out vehicle", lambda: residuals_data(model_dir), draw_residuals),
    ]  # fmt: skip
