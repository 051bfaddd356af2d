"""The anomaly model's report plots, from its held-out windows (``report/heldout.parquet``: score, threshold,
flagged and the ground-truth label per window, real vehicle ids) and faults (``report/faults.parquet``): a
score timeline per held-out vehicle with the threshold, the flagged windows and the fault intervals, and
precision/recall against the threshold; plus the shared loss curve."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from depin_core import plots as P
from gpu_jobs.models.base import Plot
from gpu_jobs.models.plots import FAULTS_FILE, HELDOUT_FILE, loss_plot, read_report

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_VEHICLES = 6  # timelines drawn: vehicles with faults first, then the most flagged
MAX_POINTS = 1200  # score points per timeline (per-bin min and max: peaks survive)
FACTORS = np.round(np.geomspace(0.25, 8.0, 31), 6)  # thresholds as multiples of the model's (1 included)


def _ms(col: str) -> pl.Expr:
    return pl.col(col).dt.epoch("ms")


def _intervals(starts: np.ndarray, ends: np.ndarray) -> list[list[int]]:
    """Touching or overlapping ``[start, end)`` intervals (sorted by start) merged."""
    out: list[list[int]] = []
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def timeline_data(model_dir: Path, max_vehicles: int = MAX_VEHICLES) -> dict[str, Any]:
    """Per shown held-out vehicle: its score series (``t_ms`` window starts, thinned to per-bin peaks), its
    threshold, the flagged intervals (every window with score > threshold, touching ones merged) and its
    ground-truth fault intervals (when the training job was given them)."""
    h = read_report(model_dir, HELDOUT_FILE).sort("token_id", "window_start")
    faults_path = model_dir / FAULTS_FILE
    faults = pl.read_parquet(faults_path) if faults_path.is_file() else None
    per = h.group_by("token_id").agg(pl.col("flagged").sum().alias("n_flagged"))
    if faults is not None:
        nf = faults.group_by("token_id").len("n_faults")
        per = per.join(nf, on="token_id", how="left")
    else:
        per = per.with_columns(pl.lit(0).alias("n_faults"))
    per = per.with_columns(pl.col("n_faults").fill_null(0)).sort(
        ["n_faults", "n_flagged", "token_id"], descending=[True, True, False]
    )
    shown = per["token_id"].to_list()[:max_vehicles]
    vehicles = []
    for v in sorted(shown):
        w = h.filter(pl.col("token_id") == v)
        t = w.select(_ms("window_start"))["window_start"].to_numpy()
        end = w.select(_ms("window_end"))["window_end"].to_numpy()
        score = w["score"].to_numpy()
        keep = P.peaks(t, score, MAX_POINTS)
        flagged = w["flagged"].to_numpy()
        fl = _intervals(t[flagged], end[flagged])
        fi = []
        if faults is not None:
            f = faults.filter(pl.col("token_id") == v).sort("start")
            fi = [[int(a), int(b), str(k)] for a, b, k in zip(
                f.select(_ms("start"))["start"], f.select(_ms("end"))["end"], f["fault"], strict=True)]  # fmt: skip
        vehicles.append({
            "token_id": int(v), "powertrain": str(w["powertrain"][0]),
            "t_ms": t[keep].tolist(), "score": score[keep].tolist(),
            "threshold": float(w["threshold"][0]), "flagged": fl, "faults": fi,
            "n_windows": int(w.height), "n_flagged": int(flagged.sum()),
        })  # fmt: skip
    return {"vehicles": vehicles, "n_vehicles": int(per.height), "ground_truth": faults is not None}


def draw_timeline(data: dict[str, Any]) -> Figure:
    """One panel per vehicle: score (log), threshold, flagged windows (orange bands at the bottom) and fault
    intervals (red shading)."""
    import matplotlib.dates as mdates

    rows = data["vehicles"]
    fig = P.figure(8.0, 0.6 + 1.7 * max(len(rows), 1))
    axes = fig.subplots(max(len(rows), 1), 1, sharex=True, squeeze=False)[:, 0]

    def dt(ms: float) -> datetime:
        return datetime.fromtimestamp(ms / 1000.0, tz=UTC)

    for ax, v in zip(axes, rows, strict=False):
        floor = v["threshold"] * 1e-3 if v["threshold"] > 0 else 1e-6
        ax.plot([dt(t) for t in v["t_ms"]], np.maximum(np.asarray(v["score"]), floor), lw=0.7,
                color="tab:blue", label="score")  # fmt: skip
        ax.axhline(v["threshold"], color="black", ls="--", lw=0.8, label="threshold")
        for a, b, _kind in v["faults"]:
            ax.axvspan(dt(a), dt(b), color="tab:red", alpha=0.15, lw=0)
        for a, b in v["flagged"]:
            ax.axvspan(dt(a), dt(b), ymin=0.0, ymax=0.08, color="tab:orange", lw=0)
        ax.set_yscale("log")
        kinds = sorted({k for *_, k in v["faults"]})
        ax.set_title(f"vehicle {v['token_id']} ({v['powertrain'].lower()}): {v['n_flagged']} of "
                     f"{v['n_windows']} windows flagged" + (f"; faults: {', '.join(kinds)}" if kinds else ""),
                     fontsize=8, loc="left")  # fmt: skip
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7, loc="upper right")
    locator = mdates.AutoDateLocator()
    axes[-1].xaxis.set_major_locator(locator)
    axes[-1].xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    axes[-1].set_xlabel("window start (UTC); orange: flagged windows; red: ground-truth faults")
    shown = len(rows)
    total = data["n_vehicles"]
    fig.suptitle(f"Anomaly scores of held-out vehicles ({shown} of {total} shown)", fontsize=10)
    return fig


def precision_recall_data(model_dir: Path) -> dict[str, Any]:
    """Window precision and recall (fault-visible vs clean windows, the labels behind ``window_recall`` and
    ``false_positive_rate``) with the threshold scaled by each of :data:`FACTORS`."""
    h = read_report(model_dir, HELDOUT_FILE)
    labelled = h.filter(pl.col("label").is_not_null())
    if labelled.is_empty():
        raise FileNotFoundError("no ground truth: the training job was given no faults file")
    ratio = (labelled["score"] / labelled["threshold"]).to_numpy()
    fault = (labelled["label"] == "fault").to_numpy()
    precision, recall, fpr = [], [], []
    for f in FACTORS:
        flagged = ratio > f
        tp, fp = int((flagged & fault).sum()), int((flagged & ~fault).sum())
        precision.append(tp / (tp + fp) if tp + fp else None)
        recall.append(tp / int(fault.sum()) if fault.any() else None)
        fpr.append(fp / int((~fault).sum()) if (~fault).any() else None)
    return {"factor": FACTORS.tolist(), "precision": precision, "recall": recall, "false_positive_rate": fpr,
            "n_fault_windows": int(fault.sum()), "n_clean_windows": int((~fault).sum())}  # fmt: skip


def draw_precision_recall(data: dict[str, Any]) -> Figure:
    """Precision, recall and false-positive rate against the threshold (× the model's), the model's marked."""
    fig = P.figure(6.5, 4.0)
    ax = fig.add_subplot()

    def y(key: str) -> list[float]:
        return [float("nan") if v is None else v for v in data[key]]

    ax.plot(data["factor"], y("precision"), marker=".", label="precision")
    ax.plot(data["factor"], y("recall"), marker=".", label="window recall")
    ax.plot(data["factor"], y("false_positive_rate"), marker=".", label="false-positive rate")
    ax.axvline(1.0, color="black", ls="--", lw=0.8, label="the model's threshold")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("threshold (× the model's threshold per vehicle type)")
    ax.set_ylabel("share of windows")
    ax.set_title(f"Precision/recall vs threshold ({data['n_fault_windows']} fault windows, "
                 f"{data['n_clean_windows']} clean)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plots(model_dir: Path) -> list[Plot]:
    """The anomaly model report's plots."""
    return [
        loss_plot(model_dir),
        Plot("timeline", "Anomaly scores per held-out vehicle", lambda: timeline_data(model_dir), draw_timeline),
        Plot("precision_recall", "Precision and recall vs threshold", lambda: precision_recall_data(model_dir),
             draw_precision_recall),
    ]  # fmt: skip
