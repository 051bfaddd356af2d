"""Evaluation against injected-fault ground truth (``faults.parquet``): recall, window recall, false positives."""

from __future__ import annotations

import json
from typing import Any

import polars as pl

FAULT_TAIL = pl.duration(hours=12)
TIRE_VISIBLE_KPA = 3.0


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


def clean_windows(scored: pl.DataFrame, faults: pl.DataFrame) -> pl.DataFrame:
    """The windows that overlap no fault (each extended by :data:`FAULT_TAIL`): ``token_id``,
    ``window_start``, ``flagged``."""
    return (
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
        .filter(~pl.col("_hit"))
        .drop("_hit")
    )


def window_labels(scored: pl.DataFrame, faults: pl.DataFrame) -> pl.DataFrame:
    """``scored`` plus ``label``: ``"fault"`` for a window where a fault is visible (:func:`visible_windows`),
    ``"clean"`` for one that overlaps no fault (:func:`clean_windows`), null otherwise (a fault not yet
    visible, or its tail) — the windows behind ``window_recall`` and ``false_positive_rate``."""
    faults = faults.filter(pl.col("token_id").is_in(scored["token_id"].unique().implode()))
    keys = ["token_id", "window_start"]
    vis = visible_windows(scored, faults).select(keys).unique().with_columns(pl.lit("fault").alias("_v"))
    clean = clean_windows(scored, faults).select(keys).with_columns(pl.lit("clean").alias("_c"))
    return (
        scored.join(vis, on=keys, how="left")
        .join(clean, on=keys, how="left")
        .with_columns(pl.coalesce("_v", "_c").alias("label"))
        .drop("_v", "_c")
    )


def evaluate(scored: pl.DataFrame, faults: pl.DataFrame) -> dict[str, Any]:
    """Recall, window recall and false-positive rate of ``scored`` windows against ``faults`` (same vehicles)."""
    faults = faults.filter(pl.col("token_id").is_in(scored["token_id"].unique().implode()))
    vis = visible_windows(scored, faults)
    per_fault = vis.group_by("fault_id", "fault").agg(pl.col("flagged").mean().alias("share"), pl.len())
    detected = per_fault.filter(pl.col("share") >= 0.5)
    clean = clean_windows(scored, faults)
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
