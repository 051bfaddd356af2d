"""Fixed windows, the anomaly family's windows: ``window_minutes`` buckets on the epoch-aligned grid, per vehicle,
with physically meaningful features (each tyre against the mean of the other three, relative to the vehicle's
own usual offset; 12 V voltage while parked; battery or coolant temperature above ambient; context).
"""

from __future__ import annotations

import polars as pl

from gpu_jobs.models import features as F

COMMON_ANOMALY = {
    **{f"tire_dev_{i}": ("kPa", f"tyre {i} minus the mean of the others, minus the vehicle median") for i in
       range(4)},
    "v12_parked": ("V", "12 V battery voltage while parked and not charging"),
    "parked_share": ("1", "share of the window parked"),
    "moving_share": ("1", "share of the window moving"),
    "speed_mean": ("km/h", "mean speed"),
    "air": ("celsius", "exterior air temperature"),
}  # fmt: skip
# Condition features: normalized by median/MAD (a fault in the training data must not widen the scale);
# context features (shares, speed, power, …) are bimodal (parked vs driving) and use mean/std.
ROBUST_ANOMALY = frozenset({"tire_dev_0", "tire_dev_1", "tire_dev_2", "tire_dev_3", "v12_parked", "batt_excess",
                            "batt_excess_max", "coolant_excess"})  # fmt: skip
ANOMALY_FEATURES: dict[str, dict[str, tuple[str, str]]] = {
    F.ELECTRIC: {
        **COMMON_ANOMALY,
        "batt_excess": ("celsius", "battery temperature minus air temperature"),
        "batt_excess_max": ("celsius", "largest bucket battery-minus-air temperature"),
        "power_abs": ("kW", "mean absolute traction battery power"),
        "charging_share": ("1", "share of the window charging"),
    },
    F.COMBUSTION: {
        **COMMON_ANOMALY,
        "coolant_excess": ("celsius", "coolant temperature minus air temperature"),
        "engine_load": ("percent", "mean engine load"),
        "rpm": ("rpm", "mean engine speed"),
    },
}


# The signals anomaly_windows reads (the lazy readers project to them; the rest conform to nulls)
ANOMALY_SIGNALS = (*F.TIRES, F.V12, F.SPEED, F.IGNITION, F.CHARGING, F.POWERTRAIN, F.BATT_TEMP, F.AIR, F.POWER,
                   F.COOLANT, F.LOAD, F.RPM)  # fmt: skip


def tire_baselines(df: pl.DataFrame, *, bin_kpa: float = 0.25) -> pl.DataFrame:
    """Per vehicle, each tyre's usual deviation from the mean of the other three (kPa): ``base_0..3``.

    Tyres differ by a few kPa from car to car; a leak is a slow drift away from the car's own offset. The
    baseline is the densest value (histogram mode in ``bin_kpa`` bins, refined by the median within ±2 bins):
    normal periods pile up on one value while a leak spreads over many, so even a leak covering more than
    half of the data does not move it (a median would).
    """
    long = (
        _tire_devs(df)
        .unpivot(index="token_id", variable_name="tire", value_name="dev")
        .drop_nulls("dev")
        .with_columns((pl.col("dev") / bin_kpa).round().cast(pl.Int64).alias("bin"))
    )
    mode = (
        long.group_by("token_id", "tire", "bin").len()
        .sort("len", "bin", descending=[True, False])
        .group_by("token_id", "tire", maintain_order=True).first()
        .select("token_id", "tire", (pl.col("bin") * bin_kpa).alias("mode"))
    )  # fmt: skip
    base = (
        long.join(mode, on=["token_id", "tire"])
        .filter((pl.col("dev") - pl.col("mode")).abs() <= 2 * bin_kpa)
        .group_by("token_id", "tire").agg(pl.col("dev").median())
        .with_columns(pl.col("tire").str.replace("_dev", "base_"))
        .pivot(on="tire", index="token_id", values="dev")
    )  # fmt: skip
    for i in range(4):
        if f"base_{i}" not in base.columns:
            base = base.with_columns(pl.lit(None, pl.Float64).alias(f"base_{i}"))
    return base.select("token_id", *(pl.col(f"base_{i}").cast(pl.Float64) for i in range(4)))


def _tire_devs(df: pl.DataFrame) -> pl.DataFrame:
    total = pl.sum_horizontal(*(pl.col(t) for t in F.TIRES))
    devs = [(pl.col(t) - (total - pl.col(t)) / 3.0).alias(f"_dev{i}") for i, t in enumerate(F.TIRES)]
    return df.select("token_id", *devs)


def anomaly_windows(
    df: pl.DataFrame,
    *,
    window_minutes: int = 30,
    baselines: pl.DataFrame | None = None,
    min_rows: int = 10,
) -> pl.DataFrame:
    """One row per vehicle and ``window_minutes`` window (epoch-aligned) with the union of anomaly features.

    ``baselines`` (from :func:`tire_baselines`) defaults to the medians of ``df`` itself. Columns:
    ``token_id``, ``window_start``, ``window_end``, ``powertrain``, ``rows`` and every feature of
    :data:`ANOMALY_FEATURES` (a feature another powertrain lacks is null).
    """
    f = F.conform(df) if set(df.columns) != {*F.KEYS, *F.SIGNALS} else df
    base = tire_baselines(f) if baselines is None else baselines
    on = F.on_expr()
    charging = pl.col(F.CHARGING).fill_null(0.0) > 0
    parked = ~on & ~charging
    every = f"{int(window_minutes)}m"
    x = pl.concat([f, _tire_devs(f).drop("token_id")], how="horizontal").with_columns(
        pl.col("timestamp").dt.truncate(every).alias("window_start"),
        parked.alias("_parked"),
        (pl.col(F.SPEED).fill_null(0.0) > 0).alias("_moving"),
        charging.alias("_chg"),
        (pl.col(F.BATT_TEMP) - pl.col(F.AIR)).alias("_bx"),
    )
    w = (
        x.group_by("token_id", "window_start", maintain_order=True)
        .agg(
            pl.len().alias("rows"),
            pl.col(F.POWERTRAIN).drop_nulls().last().alias("powertrain"),
            *(pl.col(f"_dev{i}").mean().alias(f"_dev{i}") for i in range(4)),
            pl.col(F.V12).filter(pl.col("_parked")).mean().alias("v12_parked"),
            pl.col("_parked").mean().alias("parked_share"),
            pl.col("_moving").mean().alias("moving_share"),
            pl.col(F.SPEED).mean().alias("speed_mean"),
            pl.col(F.AIR).mean().alias("air"),
            pl.col("_bx").mean().alias("batt_excess"),
            pl.col("_bx").max().alias("batt_excess_max"),
            (pl.col(F.POWER).abs().mean() / 1000.0).alias("power_abs"),
            pl.col("_chg").mean().alias("charging_share"),
            (pl.col(F.COOLANT) - pl.col(F.AIR)).mean().alias("coolant_excess"),
            pl.col(F.LOAD).mean().alias("engine_load"),
            pl.col(F.RPM).mean().alias("rpm"),
        )
        .filter(pl.col("rows") >= min_rows)
        .join(base, on="token_id", how="left")
        .with_columns(
            *[
                (pl.col(f"_dev{i}") - pl.col(f"base_{i}").fill_null(0.0)).alias(f"tire_dev_{i}")
                for i in range(4)
            ],
            (pl.col("window_start") + pl.duration(minutes=int(window_minutes))).alias("window_end"),
        )
    )
    names = list(dict.fromkeys(n for feats in ANOMALY_FEATURES.values() for n in feats))
    return w.select("token_id", "window_start", "window_end", "powertrain", "rows", *names)
