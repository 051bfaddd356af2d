"""The telemetry features every family shares (the ``connectors.dimo.schema`` contract), vectorised with polars.

Input: one row per vehicle and bucket (``token_id``, ``timestamp``, one column per DIMO signal), sorted by
``(token_id, timestamp)``. Signals are referred to by their DIMO names; a missing column reads as nulls.

Here: the signal names, reading and conforming datasets, the seeded vehicle split, normalisation
(:func:`fit_norm` on the training split only, stored with the model) and the job-input split (telemetry vs
ground truth). Each family's own windows live in its folder: trips in ``range/features.py``, fixed windows in
``anomaly/features.py``.
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


# ------------------------------------------------------------------------------------------- windows


def on_expr() -> pl.Expr:
    """True where the vehicle is on (ignition on or moving): trips are runs of it, parked is its negation."""
    return (pl.col(IGNITION).fill_null(0.0) > 0) | (pl.col(SPEED).fill_null(0.0) > 0)


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
