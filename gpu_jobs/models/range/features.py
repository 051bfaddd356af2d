"""Trips, the range family's windows: one row per bracketed EV trip, with its features and target.

A trip is a maximal run of buckets where the car is on (``isIgnitionOn`` or ``speed > 0``), bracketed by a
parked, not-charging bucket on each side (at most ``MAX_GAP`` away). The target is the energy the trip took,
``(SoC_before − SoC_after)/100 × usable kWh`` with usable = gross capacity × SoH, over the odometer distance
between the two parked buckets (exact: both are LAST/flat there), in **kWh/100 km**. Trips with any charging
bucket are dropped.
"""

from __future__ import annotations

import polars as pl

from gpu_jobs.models import features as F

COLD_BELOW_C = 15.0  # °C; the "cold" range feature is max(0, COLD_BELOW_C − air)
MAX_GAP = pl.duration(minutes=2)  # a boundary bucket further from the trip than this does not bracket it

# name → (unit, description)
RANGE_FEATURES: dict[str, tuple[str, str]] = {
    "km": ("km", "trip distance (odometer)"),
    "mean_speed": ("km/h", "distance over trip time, stops included"),
    "v3_over_v": ("(100 km/h)^2", "sum(v^3)/sum(v) of bucket speeds: the aerodynamic load per km"),
    "hours_per_100km": ("h", "time spent per 100 km: auxiliaries' share"),
    "kinetic_per_km": ("(100 km/h)^2/km", "sum of positive changes of v^2 between buckets per km"),
    "stop_share": ("1", "share of trip buckets under 5 km/h"),
    "air": ("celsius", "mean exterior air temperature"),
    "cold": ("celsius", "max(0, 15 - air): heating/cold-battery load"),
    "battery_temp": ("celsius", "battery temperature at the start"),
}
# Also in each trip row, but not model inputs: across a few dozen vehicles, battery size and health mostly
# identify the vehicle, and a net fed them learns vehicle levels that do not carry over to new vehicles.
TRIP_INFO = ("gross_kwh", "soh")
RANGE_TARGET = ("kwh_per_100km", "kWh/100km")
# The signals trip_windows reads (the lazy readers project to them; the rest conform to nulls)
RANGE_SIGNALS = (F.SPEED, F.IGNITION, F.CHARGING, F.SOC, F.ODOMETER, F.GROSS, F.SOH, F.AIR, F.BATT_TEMP,
                 F.POWERTRAIN)  # fmt: skip


def trip_windows(df: pl.DataFrame, *, min_km: float = 2.0) -> pl.DataFrame:
    """One row per bracketed EV trip: keys, :data:`RANGE_FEATURES`, the target and range inputs.

    Columns: ``token_id``, ``start``, ``end`` (first/last bucket of the trip), the features, ``kwh``,
    ``kwh_per_100km`` (null when the trip cannot be measured), ``soc_start``/``soc_end`` (%), ``usable_kwh``.
    """
    f = F.conform(df) if set(df.columns) != {*F.KEYS, *F.SIGNALS} else df
    tid, ts = pl.col("token_id"), pl.col("timestamp")
    on = F.on_expr()
    same_prev = (tid == tid.shift(1)) & ((ts - ts.shift(1)) <= MAX_GAP)
    same_next = (tid == tid.shift(-1)) & ((ts.shift(-1) - ts) <= MAX_GAP)
    charging = pl.col(F.CHARGING).fill_null(0.0) > 0
    usable = pl.col(F.GROSS) * pl.col(F.SOH).fill_null(100.0) / 100.0
    x = f.with_columns(
        on.alias("_on"),
        charging.alias("_chg"),
        usable.alias("_usable"),
        (pl.col(F.SPEED).fill_null(0.0) / 100.0).alias("_u"),
    ).with_columns(
        # a parked, not-charging neighbour bucket brackets the trip; its SoC/odometer are the trip's bounds
        pl.when(same_prev & ~pl.col("_on").shift(1) & ~pl.col("_chg").shift(1)).then(pl.col(F.SOC).shift(1)).alias("_soc0"),
        pl.when(same_prev & ~pl.col("_on").shift(1) & ~pl.col("_chg").shift(1)).then(pl.col(F.ODOMETER).shift(1)).alias("_odo0"),
        pl.when(same_next & ~pl.col("_on").shift(-1) & ~pl.col("_chg").shift(-1)).then(pl.col(F.SOC).shift(-1)).alias("_soc1"),
        pl.when(same_next & ~pl.col("_on").shift(-1) & ~pl.col("_chg").shift(-1)).then(pl.col(F.ODOMETER).shift(-1)).alias("_odo1"),
        # trip id: a new run starts where the previous bucket is not the same vehicle's on-bucket
        (pl.col("_on") & ~(same_prev & pl.col("_on").shift(1).fill_null(False))).cum_sum().alias("_trip"),
        (pl.col("_u").diff().fill_null(0.0)).alias("_du"),
        ((pl.col("_u") ** 2).diff().clip(lower_bound=0.0).fill_null(0.0)).alias("_dke"),
    )  # fmt: skip
    x = x.with_columns(pl.when(tid != tid.shift(1)).then(0.0).otherwise(pl.col("_dke")).alias("_dke"))
    trips = (
        x.filter(pl.col("_on"))
        .group_by("_trip", maintain_order=True)
        .agg(
            tid.first(),
            ts.first().alias("start"),
            ts.last().alias("end"),
            pl.col("_soc0").first(),
            pl.col("_odo0").first(),
            pl.col("_soc1").last(),
            pl.col("_odo1").last(),
            pl.col("_chg").any().alias("_any_chg"),
            ((ts.last() - ts.first()).dt.total_seconds() / 3600.0 + 1.0 / 60.0).alias("_hours"),
            (pl.col("_u") ** 3).sum().alias("_u3"),
            pl.col("_u").sum().alias("_u1"),
            pl.col("_dke").sum().alias("_ke"),
            (pl.col("_u") < 0.05).mean().alias("stop_share"),
            pl.col(F.AIR).mean().alias("air"),
            pl.col(F.BATT_TEMP).drop_nulls().first().alias("battery_temp"),
            pl.col(F.GROSS).drop_nulls().last().alias("gross_kwh"),
            pl.col(F.SOH).drop_nulls().last().alias("soh"),
            pl.col("_usable").drop_nulls().last().alias("usable_kwh"),
            pl.col(F.POWERTRAIN).drop_nulls().last().alias("_pt"),
            pl.col(F.ODOMETER).drop_nulls().first().alias("_odo_first"),
            pl.col(F.ODOMETER).drop_nulls().last().alias("_odo_last"),
            pl.col(F.SOC).drop_nulls().first().alias("_soc_first"),
            pl.col(F.SOC).drop_nulls().last().alias("_soc_last"),
        )
    )
    km_exact = pl.col("_odo1") - pl.col("_odo0")
    km = pl.coalesce(km_exact, pl.col("_odo_last") - pl.col("_odo_first"))
    kwh = (pl.col("_soc0") - pl.col("_soc1")) / 100.0 * pl.col("usable_kwh")
    measurable = km_exact.is_not_null() & pl.col("_soc0").is_not_null() & pl.col("_soc1").is_not_null()
    trips = trips.with_columns(km.alias("km")).filter(
        (pl.col("_pt") == F.ELECTRIC) & ~pl.col("_any_chg") & (pl.col("km") >= min_km) & pl.col("gross_kwh").is_not_null()
    )  # fmt: skip
    return trips.with_columns(
        (pl.col("km") / pl.col("_hours")).alias("mean_speed"),
        (pl.col("_u3") / pl.col("_u1").clip(lower_bound=1e-6)).alias("v3_over_v"),
        (100.0 * pl.col("_hours") / pl.col("km")).alias("hours_per_100km"),
        (pl.col("_ke") / pl.col("km")).alias("kinetic_per_km"),
        (COLD_BELOW_C - pl.col("air")).clip(lower_bound=0.0).alias("cold"),
        pl.col("soh").fill_null(100.0),
        pl.when(measurable).then(kwh).alias("kwh"),
        pl.when(measurable).then(kwh / km * 100.0).alias(RANGE_TARGET[0]),
        pl.coalesce(pl.col("_soc0"), pl.col("_soc_first")).alias("soc_start"),
        pl.coalesce(pl.col("_soc1"), pl.col("_soc_last")).alias("soc_end"),
    ).select(
        "token_id",
        "start",
        "end",
        *RANGE_FEATURES,
        *TRIP_INFO,
        "kwh",
        RANGE_TARGET[0],
        "soc_start",
        "soc_end",
        "usable_kwh",
    )
