"""Feature windows from the telemetry table (the ``connectors.dimo.schema`` contract), vectorised with polars.

Input: one row per vehicle and bucket (``token_id``, ``timestamp``, one column per DIMO signal), sorted by
``(token_id, timestamp)``. Signals are referred to by their DIMO names; a missing column reads as nulls.

Two kinds of windows:

- **Trips** (range model, EVs): a maximal run of buckets where the car is on (``isIgnitionOn`` or
  ``speed > 0``), bracketed by a parked, not-charging bucket on each side (at most ``MAX_GAP`` away). The
  target is the energy the trip took, ``(SoC_before − SoC_after)/100 × usable kWh`` with usable = gross
  capacity × SoH, over the odometer distance between the two parked buckets (exact: both are LAST/flat
  there), in **kWh/100 km**. Trips with any charging bucket are dropped.
- **Fixed windows** (anomaly detector): ``window_minutes`` buckets on the epoch-aligned grid, per vehicle, with
  physically meaningful features (each tyre against the mean of the other three, relative to the vehicle's
  own median; 12 V voltage while parked; battery or coolant temperature above ambient; context).

Normalization statistics are computed by :func:`fit_norm` on the training split only and stored with the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.dataset as ds

from depin_core.errors import ConfigError
from depin_core.timeparse import to_rfc3339
from gpu_jobs.errors import VerifyError

SPEED = "speed"
ODOMETER = "powertrainTransmissionTravelledDistance"
IGNITION = "isIgnitionOn"
AIR = "exteriorAirTemperature"
V12 = "lowVoltageBatteryCurrentVoltage"
POWERTRAIN = "powertrainType"
SOC = "powertrainTractionBatteryStateOfChargeCurrent"
GROSS = "powertrainTractionBatteryGrossCapacity"
SOH = "powertrainTractionBatteryStateOfHealth"
POWER = "powertrainTractionBatteryCurrentPower"
BATT_TEMP = "powertrainTractionBatteryTemperatureAverage"
CHARGING = "powertrainTractionBatteryChargingIsCharging"
RPM = "powertrainCombustionEngineSpeed"
LOAD = "obdEngineLoad"
FUEL = "powertrainFuelSystemRelativeLevel"
COOLANT = "powertrainCombustionEngineECT"
TIRES = (
    "chassisAxleRow1WheelLeftTirePressure",
    "chassisAxleRow1WheelRightTirePressure",
    "chassisAxleRow2WheelLeftTirePressure",
    "chassisAxleRow2WheelRightTirePressure",
)
ELECTRIC, COMBUSTION = "ELECTRIC", "COMBUSTION"
KEYS = ("token_id", "timestamp")
FLOAT_SIGNALS = (SPEED, ODOMETER, IGNITION, AIR, V12, SOC, GROSS, SOH, POWER, BATT_TEMP, CHARGING, RPM, LOAD,
                 FUEL, COOLANT, *TIRES)  # fmt: skip
SIGNALS = (*FLOAT_SIGNALS, POWERTRAIN)
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
    ELECTRIC: {
        **COMMON_ANOMALY,
        "batt_excess": ("celsius", "battery temperature minus air temperature"),
        "batt_excess_max": ("celsius", "largest bucket battery-minus-air temperature"),
        "power_abs": ("kW", "mean absolute traction battery power"),
        "charging_share": ("1", "share of the window charging"),
    },
    COMBUSTION: {
        **COMMON_ANOMALY,
        "coolant_excess": ("celsius", "coolant temperature minus air temperature"),
        "engine_load": ("percent", "mean engine load"),
        "rpm": ("rpm", "mean engine speed"),
    },
}


# ------------------------------------------------------------------------------------------- reading


def dataset_files(path: Path) -> list[str]:
    """The Parquet files of a dataset directory (a ``TelemetryStore`` root or any folder) or one file."""
    path = Path(path)
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        raise ConfigError(
            f"dataset {path} does not exist; pass a telemetry dataset directory or Parquet file"
        )
    files = ds.dataset(str(path), format="parquet", ignore_prefixes=[".", "_"]).files
    if not files:
        raise ConfigError(f"dataset {path} holds no Parquet files; ingest telemetry into it first")
    return sorted(files)


def conform(df: pl.DataFrame) -> pl.DataFrame:
    """Key columns plus every signal this module uses (missing ones as nulls), floats as Float64."""
    missing = [k for k in KEYS if k not in df.columns]
    if missing:
        raise ConfigError(f"telemetry lacks key column(s) {missing}; it must follow connectors.dimo.schema")
    cols = [pl.col("token_id").cast(pl.Int64), pl.col("timestamp").cast(pl.Datetime("us", "UTC"))]
    for name in FLOAT_SIGNALS:
        cols.append(
            pl.col(name).cast(pl.Float64) if name in df.columns else pl.lit(None, pl.Float64).alias(name)
        )
    cols.append(
        pl.col(POWERTRAIN).cast(pl.Utf8)
        if POWERTRAIN in df.columns
        else pl.lit(None, pl.Utf8).alias(POWERTRAIN)
    )
    return df.select(cols)


def data_summary(df: pl.DataFrame) -> dict[str, Any]:
    """Lineage of a training table: vehicles, rows and the time range it covers (RFC 3339, UTC)."""
    first, last = df["timestamp"].min(), df["timestamp"].max()
    return {
        "vehicles": int(df["token_id"].n_unique()),
        "rows": df.height,
        "first": to_rfc3339(first) if first is not None else None,  # type: ignore[arg-type]
        "last": to_rfc3339(last) if last is not None else None,  # type: ignore[arg-type]
    }


def read_telemetry(paths: Sequence[Path] | Path, token_ids: Iterable[int] | None = None) -> pl.DataFrame:
    """Read telemetry dataset(s) into one conformed frame sorted by ``(token_id, timestamp)``."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files = [f for p in paths for f in dataset_files(Path(p))]
    dataset = ds.dataset(files, format="parquet")
    names = [n for n in (*KEYS, *SIGNALS) if n in dataset.schema.names]
    flt = None if token_ids is None else ds.field("token_id").isin(list(token_ids))
    df = pl.from_arrow(dataset.to_table(columns=names, filter=flt))
    assert isinstance(df, pl.DataFrame)
    return conform(df).sort(KEYS)


# ------------------------------------------------------------------------------------------- trips


def _on_expr() -> pl.Expr:
    return (pl.col(IGNITION).fill_null(0.0) > 0) | (pl.col(SPEED).fill_null(0.0) > 0)


def trip_windows(df: pl.DataFrame, *, min_km: float = 2.0) -> pl.DataFrame:
    """One row per bracketed EV trip: keys, :data:`RANGE_FEATURES`, the target and range inputs.

    Columns: ``token_id``, ``start``, ``end`` (first/last bucket of the trip), the features, ``kwh``,
    ``kwh_per_100km`` (null when the trip cannot be measured), ``soc_start``/``soc_end`` (%), ``usable_kwh``.
    """
    f = conform(df) if set(df.columns) != {*KEYS, *SIGNALS} else df
    tid, ts = pl.col("token_id"), pl.col("timestamp")
    on = _on_expr()
    same_prev = (tid == tid.shift(1)) & ((ts - ts.shift(1)) <= MAX_GAP)
    same_next = (tid == tid.shift(-1)) & ((ts.shift(-1) - ts) <= MAX_GAP)
    charging = pl.col(CHARGING).fill_null(0.0) > 0
    usable = pl.col(GROSS) * pl.col(SOH).fill_null(100.0) / 100.0
    x = f.with_columns(
        on.alias("_on"),
        charging.alias("_chg"),
        usable.alias("_usable"),
        (pl.col(SPEED).fill_null(0.0) / 100.0).alias("_u"),
    ).with_columns(
        # a parked, not-charging neighbour bucket brackets the trip; its SoC/odometer are the trip's bounds
        pl.when(same_prev & ~pl.col("_on").shift(1) & ~pl.col("_chg").shift(1)).then(pl.col(SOC).shift(1)).alias("_soc0"),
        pl.when(same_prev & ~pl.col("_on").shift(1) & ~pl.col("_chg").shift(1)).then(pl.col(ODOMETER).shift(1)).alias("_odo0"),
        pl.when(same_next & ~pl.col("_on").shift(-1) & ~pl.col("_chg").shift(-1)).then(pl.col(SOC).shift(-1)).alias("_soc1"),
        pl.when(same_next & ~pl.col("_on").shift(-1) & ~pl.col("_chg").shift(-1)).then(pl.col(ODOMETER).shift(-1)).alias("_odo1"),
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
            pl.col(AIR).mean().alias("air"),
            pl.col(BATT_TEMP).drop_nulls().first().alias("battery_temp"),
            pl.col(GROSS).drop_nulls().last().alias("gross_kwh"),
            pl.col(SOH).drop_nulls().last().alias("soh"),
            pl.col("_usable").drop_nulls().last().alias("usable_kwh"),
            pl.col(POWERTRAIN).drop_nulls().last().alias("_pt"),
            pl.col(ODOMETER).drop_nulls().first().alias("_odo_first"),
            pl.col(ODOMETER).drop_nulls().last().alias("_odo_last"),
            pl.col(SOC).drop_nulls().first().alias("_soc_first"),
            pl.col(SOC).drop_nulls().last().alias("_soc_last"),
        )
    )
    km_exact = pl.col("_odo1") - pl.col("_odo0")
    km = pl.coalesce(km_exact, pl.col("_odo_last") - pl.col("_odo_first"))
    kwh = (pl.col("_soc0") - pl.col("_soc1")) / 100.0 * pl.col("usable_kwh")
    measurable = km_exact.is_not_null() & pl.col("_soc0").is_not_null() & pl.col("_soc1").is_not_null()
    trips = trips.with_columns(km.alias("km")).filter(
        (pl.col("_pt") == ELECTRIC) & ~pl.col("_any_chg") & (pl.col("km") >= min_km) & pl.col("gross_kwh").is_not_null()
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


# ------------------------------------------------------------------------------------------- fixed windows


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
    total = pl.sum_horizontal(*(pl.col(t) for t in TIRES))
    devs = [(pl.col(t) - (total - pl.col(t)) / 3.0).alias(f"_dev{i}") for i, t in enumerate(TIRES)]
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
    f = conform(df) if set(df.columns) != {*KEYS, *SIGNALS} else df
    base = tire_baselines(f) if baselines is None else baselines
    on = _on_expr()
    charging = pl.col(CHARGING).fill_null(0.0) > 0
    parked = ~on & ~charging
    every = f"{int(window_minutes)}m"
    x = pl.concat([f, _tire_devs(f).drop("token_id")], how="horizontal").with_columns(
        pl.col("timestamp").dt.truncate(every).alias("window_start"),
        parked.alias("_parked"),
        (pl.col(SPEED).fill_null(0.0) > 0).alias("_moving"),
        charging.alias("_chg"),
        (pl.col(BATT_TEMP) - pl.col(AIR)).alias("_bx"),
    )
    w = (
        x.group_by("token_id", "window_start", maintain_order=True)
        .agg(
            pl.len().alias("rows"),
            pl.col(POWERTRAIN).drop_nulls().last().alias("powertrain"),
            *(pl.col(f"_dev{i}").mean().alias(f"_dev{i}") for i in range(4)),
            pl.col(V12).filter(pl.col("_parked")).mean().alias("v12_parked"),
            pl.col("_parked").mean().alias("parked_share"),
            pl.col("_moving").mean().alias("moving_share"),
            pl.col(SPEED).mean().alias("speed_mean"),
            pl.col(AIR).mean().alias("air"),
            pl.col("_bx").mean().alias("batt_excess"),
            pl.col("_bx").max().alias("batt_excess_max"),
            (pl.col(POWER).abs().mean() / 1000.0).alias("power_abs"),
            pl.col("_chg").mean().alias("charging_share"),
            (pl.col(COOLANT) - pl.col(AIR)).mean().alias("coolant_excess"),
            pl.col(LOAD).mean().alias("engine_load"),
            pl.col(RPM).mean().alias("rpm"),
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


# ------------------------------------------------------------------------------------------- splits, norm


def split_vehicles(token_ids: Iterable[int], *, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) token ids: a seeded permutation of the sorted unique ids, ``holdout`` share held out."""
    ids = np.unique(np.asarray(list(token_ids), dtype=np.int64))
    if len(ids) < 2:
        raise ConfigError(f"need at least 2 vehicles to hold some out, got {len(ids)}; ingest more vehicles")
    perm = np.random.default_rng(np.random.SeedSequence([seed, 0x5B11])).permutation(ids)
    k = min(len(ids) - 1, max(1, round(holdout * len(ids))))
    return np.sort(perm[k:]), np.sort(perm[:k])


def by_vehicles(
    rows: pl.DataFrame, train_ids: np.ndarray, test_ids: np.ndarray
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(training, held-out) rows of ``rows``, by ``token_id``."""
    return rows.filter(pl.col("token_id").is_in(train_ids)), rows.filter(pl.col("token_id").is_in(test_ids))


def artifact_split(
    rows: pl.DataFrame, config: dict[str, Any], *, seed: int | None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(training, held-out) rows of a model artifact's vehicle split (its ``train_vehicles`` /
    ``heldout_vehicles``); with ``seed`` (the spec's), ``VerifyError`` unless that split is the seeded one."""
    train_ids = np.asarray(config["train_vehicles"], dtype=np.int64)
    test_ids = np.asarray(config["heldout_vehicles"], dtype=np.int64)
    if seed is not None:
        holdout = float(config["hyperparameters"]["holdout"])
        check_split(rows["token_id"], train_ids, test_ids, holdout=holdout, seed=seed)
    return by_vehicles(rows, train_ids, test_ids)


def check_split(
    token_ids: Iterable[int], train_ids: np.ndarray, test_ids: np.ndarray, *, holdout: float, seed: int
) -> None:
    """``VerifyError`` unless (``train_ids``, ``test_ids``) is the seeded vehicle split of ``token_ids``."""
    want_train, want_test = split_vehicles(token_ids, holdout=holdout, seed=seed)
    if not (np.array_equal(np.sort(train_ids), want_train) and np.array_equal(np.sort(test_ids), want_test)):
        raise VerifyError(
            f"the artifact's held-out vehicles {sorted(test_ids.tolist())[:8]} are not the seeded split "
            f"{want_test.tolist()[:8]} (seed {seed}, holdout {holdout})"
        )


def fit_norm(
    frame: pl.DataFrame, names: Sequence[str], *, robust: Iterable[str] = ()
) -> dict[str, dict[str, float]]:
    """Per feature ``{"center", "scale"}`` from ``frame`` (the training split): mean/std, or median/MAD for
    the features named in ``robust`` (condition signals whose training data may hold unlabelled faults)."""
    robust = set(robust)
    out: dict[str, dict[str, float]] = {}
    for n in names:
        v = frame[n].drop_nulls().drop_nans().to_numpy().astype(np.float64)
        if len(v) == 0:
            center, scale = 0.0, 1.0
        elif n in robust:
            center = float(np.median(v))
            scale = float(1.4826 * np.median(np.abs(v - center)))
            if scale <= 1e-9:  # e.g. a share that is almost always 0: fall back to the std
                scale = float(v.std())
        else:
            center, scale = float(v.mean()), float(v.std())
        out[n] = {"center": center, "scale": scale if scale > 1e-9 else 1.0}
    return out


def apply_norm(
    frame: pl.DataFrame, norm: dict[str, dict[str, float]], *, clip: float | None = None
) -> np.ndarray:
    """``(rows, features)`` float32 of ``(x − center)/scale`` in ``norm``'s order; nulls → 0 (the center)."""
    cols = []
    for n, s in norm.items():
        v = frame[n].cast(pl.Float64).fill_nan(None).fill_null(s["center"]).to_numpy()
        cols.append((v - s["center"]) / s["scale"])
    out = np.stack(cols, axis=1) if cols else np.zeros((frame.height, 0))
    if clip is not None:
        out = np.clip(out, -clip, clip)
    return out.astype(np.float32)


def ordered_norm(
    norm: dict[str, dict[str, float]], features: list[dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """``norm`` in the network's input order: the order of ``features`` (a list, from :func:`feature_schema`).

    A ``model.json`` read back has its objects' keys sorted, so ``norm``'s own order cannot be trusted.
    """
    names = [f["name"] for f in features]
    if set(norm) != set(names):
        raise ConfigError(
            f"model.json: features {sorted(names)} do not match its norm {sorted(norm)}; re-train the model"
        )
    return {n: norm[n] for n in names}


def feature_schema(features: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    """The ``model.json`` description of ``features``: name, unit, description."""
    return [{"name": n, "unit": u, "description": d} for n, (u, d) in features.items()]


def split_inputs(paths: Sequence[Path]) -> tuple[list[str], Path | None]:
    """(telemetry Parquet files, the ground-truth ``faults.parquet`` or None) from a job's inputs.

    Inputs may be files or directories; ground truth is recognised by its file names (``faults.parquet``,
    ``vehicles.parquet``, as written by ``depin emulator --ground-truth-out``).
    """
    telemetry: list[str] = []
    faults: Path | None = None
    for p in map(Path, paths):
        files = [Path(f) for f in dataset_files(p)]
        for f in files:
            if f.name == "faults.parquet":
                faults = f
            elif f.name != "vehicles.parquet":
                telemetry.append(str(f))
    if not telemetry:
        raise ConfigError(f"inputs {[str(p) for p in paths]} hold no telemetry Parquet files; pass a dataset")
    return telemetry, faults
