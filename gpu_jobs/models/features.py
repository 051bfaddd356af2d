"""The telemetry features every family shares (the ``connectors.dimo.schema`` contract), vectorised with polars.

Input: one row per vehicle and bucket (``token_id``, ``timestamp``, one column per DIMO signal), sorted by
``(token_id, timestamp)``. Signals are referred to by their DIMO names; a missing column reads as nulls.

Here: the signal names, reading and conforming datasets (eagerly, or lazily by batches of vehicles with
:func:`by_vehicle_batches`, which training and batch scoring use), the seeded vehicle split, normalisation
(:func:`fit_norm` on the training split only, stored with the model) and the job-input split (telemetry vs
ground truth). Each family's own windows live in its folder: trips in ``range/features.py``, fixed windows in
``anomaly/features.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

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

DELTA_LOG = "_delta_log"
# Rows per vehicle batch of the lazy readers: a batch is whole vehicles, about this many telemetry rows
# (one vehicle with more rows is a batch of its own). Memory scales with it, not with the dataset.
BATCH_ROWS = 262_144
READ_ROWS = 65_536  # rows decoded at a time from a file's row group


def dataset_files(path: Path) -> list[str]:
    """The Parquet files of a dataset: one file; a Delta table root (or a folder inside one): the files of
    its current version, read from ``_delta_log``; any other folder: the files under it (names starting
    with ``.`` or ``_`` skipped, Delta tables inside it by their current version)."""
    path = Path(path)
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        raise ConfigError(
            f"dataset {path} does not exist; pass a telemetry dataset directory or Parquet file"
        )
    table = _delta_root(path)
    files = _delta_files(table, under=path) if table is not None else _walk(path)
    if not files:
        raise ConfigError(f"dataset {path} holds no Parquet files; ingest telemetry into it first")
    return sorted(files)


def _delta_root(path: Path) -> Path | None:
    """The Delta table ``path`` is (or lies in), or None."""
    for p in (path, *path.resolve().parents):
        if (p / DELTA_LOG).is_dir():
            return p
    return None


def _delta_files(table: Path, *, under: Path) -> list[str]:
    """The current version's data files of the Delta table at ``table`` that lie under ``under``: never a
    glob, which would also find files compaction removed or a crashed writer left behind."""
    from deltalake import DeltaTable  # only for Delta inputs: a job given a file list never needs it

    try:
        uris = DeltaTable(str(table)).file_uris()
    except Exception as e:  # deltalake raises its own error types for a broken log
        raise ConfigError(f"dataset {table}: cannot read its Delta log ({e}); pass an intact table") from e
    root, sub = str(table), under.resolve()
    files = [u.removeprefix("file://") for u in uris]
    files = [f if Path(f).is_absolute() else str(Path(root) / f) for f in files]
    return [f for f in files if Path(f).resolve().is_relative_to(sub)]


def _walk(root: Path) -> list[str]:
    """Every file under ``root`` except hidden/underscore names; Delta tables inside by their current files."""
    out: list[str] = []
    for here, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        for d in list(dirs):
            if (Path(here) / d / DELTA_LOG).is_dir():
                dirs.remove(d)
                out += _delta_files(Path(here) / d, under=Path(here) / d)
        out += [os.path.join(here, n) for n in names if not n.startswith((".", "_"))]
    return out


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
    return _Summary().add(df).result()


class _Summary:
    """:func:`data_summary` accumulated over vehicle batches (each vehicle in one batch only)."""

    def __init__(self) -> None:
        self.vehicles, self.rows = 0, 0
        self.first: Any = None
        self.last: Any = None

    def add(self, df: pl.DataFrame) -> _Summary:
        self.vehicles += int(df["token_id"].n_unique())
        self.rows += df.height
        lo, hi = df["timestamp"].min(), df["timestamp"].max()
        if lo is not None:
            self.first = lo if self.first is None else min(self.first, lo)
            self.last = hi if self.last is None else max(self.last, hi)
        return self

    def result(self) -> dict[str, Any]:
        return {
            "vehicles": self.vehicles,
            "rows": self.rows,
            "first": to_rfc3339(self.first) if self.first is not None else None,
            "last": to_rfc3339(self.last) if self.last is not None else None,
        }


def _kind(t: pa.DataType) -> pa.DataType:
    """One type per kind (strings, integers, floats): files may store a column in any width or layout."""
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_integer(t):
        return pa.int64()
    if pa.types.is_floating(t):
        return pa.float64()
    return t


@dataclass(frozen=True)
class _Part:
    """One Parquet file: its footer, the wanted columns it has, each row group's ``token_id`` range."""

    path: str
    metadata: pq.FileMetaData
    columns: tuple[str, ...]
    groups: tuple[tuple[int, int, int], ...]  # (row group, min token_id, max token_id)
    ordered: bool  # sorted by token_id (the store's layout): a read can stop at the first larger token


class TelemetryFiles:
    """A list of telemetry Parquet files read by vehicle: footers and the ``token_id`` column only, once.

    Files may have different columns (a Delta table's schema evolves by merge: older files lack the newer
    columns, read as nulls) and sit in hive ``date=`` folders (never a column here). Each file must be sorted
    by ``token_id`` for reads by vehicle to touch few row groups; a vehicle's rows may be in any file.
    """

    def __init__(self, files: Sequence[str | Path], columns: Iterable[str] = SIGNALS) -> None:
        keep = set(columns)
        wanted = [*KEYS, *(c for c in SIGNALS if c in keep)]
        self.parts: list[_Part] = []
        schemas: list[pa.Schema] = []
        counts: list[pl.DataFrame] = []
        for f in map(str, files):
            with pq.ParquetFile(f) as pf:
                schema = pf.schema_arrow
                missing = [k for k in KEYS if k not in schema.names]
                if missing:
                    raise ConfigError(
                        f"telemetry file {f} lacks key column(s) {missing}; it must follow connectors.dimo.schema"
                    )
                cols = tuple(c for c in wanted if c in schema.names)
                schemas.append(pa.schema([pa.field(c, _kind(schema.field(c).type)) for c in cols]))
                groups, ordered, last = [], True, None
                for i in range(pf.metadata.num_row_groups):
                    ids = pl.Series("token_id", pf.read_row_group(i, columns=["token_id"]).column("token_id"))
                    ordered = ordered and ids.null_count() == 0 and ids.is_sorted()
                    ids = ids.drop_nulls()
                    if ids.len():
                        lo, hi = int(ids.min()), int(ids.max())  # type: ignore[arg-type]
                        ordered = ordered and (last is None or last <= lo)
                        groups.append((i, lo, hi))
                        counts.append(ids.cast(pl.Int64).value_counts(name="rows"))
                        last = hi
                self.parts.append(_Part(f, pf.metadata, cols, tuple(groups), ordered))
        try:  # one table schema: a column's type may widen between files, not change kind
            self.schema = (
                pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise ConfigError(
                f"telemetry files {[str(f) for f in files][:3]}…: incompatible columns ({e})"
            ) from e
        per = (
            pl.concat(counts).group_by("token_id").agg(pl.col("rows").sum()).sort("token_id")
            if counts
            else pl.DataFrame(schema={"token_id": pl.Int64, "rows": pl.UInt32})
        )
        self.vehicles = per["token_id"].to_numpy()
        self.rows = per["rows"].to_numpy().astype(np.int64)

    def read(
        self, lo: int | None = None, hi: int | None = None, token_ids: Iterable[int] | None = None
    ) -> pl.DataFrame:
        """Conformed rows of the vehicles with ``lo <= token_id <= hi`` (all when None) and in ``token_ids``
        (when given), sorted by ``(token_id, timestamp)``; rows with equal keys keep file order."""
        ids = None if token_ids is None else pl.Series(list(token_ids), dtype=pl.Int64)
        frames = []
        for part in self.parts:
            groups = [g for g, a, b in part.groups if (hi is None or a <= hi) and (lo is None or b >= lo)]
            if not groups:
                continue
            pieces = []
            with pq.ParquetFile(part.path, metadata=part.metadata) as pf:
                # record batch by record batch: a large row group is never decoded whole
                for batch in pf.iter_batches(
                    batch_size=READ_ROWS, row_groups=groups, columns=list(part.columns)
                ):
                    if (
                        part.ordered
                        and hi is not None
                        and batch.num_rows
                        and batch.column("token_id")[0].as_py() > hi
                    ):
                        break
                    df = pl.from_arrow(batch)
                    assert isinstance(df, pl.DataFrame)
                    if lo is not None or hi is not None:
                        df = df.filter(
                            pl.col("token_id").is_between(
                                lo if lo is not None else -(2**63), hi if hi is not None else 2**63 - 1
                            )
                        )
                    if ids is not None:
                        df = df.filter(pl.col("token_id").is_in(ids.implode()))
                    if df.height:
                        pieces.append(df)
            if pieces:
                frames.append(conform(pl.concat(pieces)))
        if not frames:
            return conform(pl.DataFrame(schema={"token_id": pl.Int64, "timestamp": pl.Datetime("us", "UTC")}))
        return pl.concat(frames).sort(KEYS, maintain_order=True)

    def batches(self, batch_rows: int | None = None) -> Iterator[pl.DataFrame]:
        """:meth:`read` by batches of whole vehicles (ascending ``token_id``) of about ``batch_rows`` rows
        (default :data:`BATCH_ROWS`)."""
        limit = max(1, int(batch_rows or BATCH_ROWS))
        start, acc = 0, 0
        for i, n in enumerate(self.rows):
            acc += int(n)
            if acc >= limit or i == len(self.rows) - 1:
                yield self.read(int(self.vehicles[start]), int(self.vehicles[i]))
                start, acc = i + 1, 0


def read_telemetry(
    paths: Sequence[str | Path] | str | Path,
    token_ids: Iterable[int] | None = None,
    *,
    columns: Iterable[str] = SIGNALS,
) -> pl.DataFrame:
    """Read telemetry dataset(s) into one conformed frame sorted by ``(token_id, timestamp)`` (the whole
    table in memory: for bounded memory use :func:`by_vehicle_batches`)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files = [f for p in paths for f in dataset_files(Path(p))]
    return TelemetryFiles(files, columns).read(token_ids=token_ids)


def by_vehicle_batches(
    files: Sequence[str | Path],
    fn: Callable[[pl.DataFrame], pl.DataFrame],
    *,
    columns: Iterable[str] = SIGNALS,
    batch_rows: int | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """``fn`` (a per-vehicle feature builder: trips, windows) over ``files`` one vehicle batch at a time,
    reading only ``columns``: (its rows concatenated, the :func:`data_summary` of the telemetry). Equal to
    ``fn(read_telemetry(files))`` when ``fn`` treats each vehicle on its own; only one batch of telemetry is
    in memory at a time."""
    tf = TelemetryFiles(files, columns)
    summary, out = _Summary(), []
    for df in tf.batches(batch_rows):
        summary.add(df)
        out.append(fn(df))
    return (pl.concat(out) if out else fn(tf.read())), summary.result()


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
            if DELTA_LOG in f.parts:  # a Delta log checkpoint, not telemetry
                continue
            if f.name == "faults.parquet":
                faults = f
            elif f.name != "vehicles.parquet":
                telemetry.append(str(f))
    if not telemetry:
        raise ConfigError(f"inputs {[str(p) for p in paths]} hold no telemetry Parquet files; pass a dataset")
    return telemetry, faults
