"""Lazy feature building: telemetry read by vehicle batches gives exactly the eager features, trainings and
scores; files of a Delta table with an evolved schema (older files lack newer columns), hive ``date=`` folders,
files outside the table's version never read."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import polars.selectors as cs
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from deltalake import DeltaTable, write_deltalake
from polars.testing import assert_frame_equal

from depin_core.errors import ConfigError
from gpu_jobs.models import features as F
from gpu_jobs.models import range as R
from gpu_jobs.models.anomaly import AnomalyFamily
from gpu_jobs.models.anomaly import features as AF
from gpu_jobs.models.range import RangeFamily
from gpu_jobs.models.range import features as RF
from gpu_jobs.models.range.model import calibration, net_from_config, predict_trips
from tests.support.fleet_data import FleetData
from tests.support.model_ctx import make_ctx

LATE = (*F.TIRES, F.BATT_TEMP)  # columns the table gains after its first append


def _trips(df: pl.DataFrame) -> pl.DataFrame:
    return RF.trip_windows(df)


def _windows(df: pl.DataFrame) -> pl.DataFrame:
    return AF.anomaly_windows(df, window_minutes=30)


@pytest.fixture(scope="module")
def table(fleet: FleetData) -> pl.DataFrame:
    return F.read_telemetry(fleet.telemetry)


@pytest.fixture(scope="module")
def delta(table: pl.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame]:
    """The fleet as a Delta table: three appends (by vehicle), the first without :data:`LATE` (merged into
    the schema by the second), one vehicle deleted afterwards (its old files stay on disk, removed from the
    log) and a stray Parquet file in a partition folder. Returns (root, the rows the table now holds)."""
    root = tmp_path_factory.mktemp("delta") / "telemetry"
    ids = table["token_id"].unique().sort().to_list()
    thirds = [ids[i::3] for i in range(3)]
    expected = []
    for k, part_ids in enumerate(thirds):
        part = table.filter(pl.col("token_id").is_in(part_ids))
        if k == 0:
            part = part.drop(*LATE)
        expected.append(F.conform(part))
        data = part.with_columns(pl.col("timestamp").dt.date().cast(pl.String).alias("date"))
        write_deltalake(str(root), data.to_arrow(), mode="append", partition_by=["date"], schema_mode="merge")
    gone = thirds[1][0]  # not in the first append: its files keep their old schema
    DeltaTable(str(root)).delete(f"token_id = {gone}")
    some = next(root.glob("date=*/*.parquet"))
    shutil.copy(some, some.with_name("part-orphan-from-a-crashed-writer.parquet"))
    rows = pl.concat(expected).filter(pl.col("token_id") != gone).sort(F.KEYS, maintain_order=True)
    return root, rows


# ----------------------------------------------------------------------------------------------- fleet


@pytest.mark.parametrize("batch_rows", [1, 7_000, None])
def test_vehicle_batches_give_the_eager_features(
    fleet: FleetData, table: pl.DataFrame, batch_rows: int | None
) -> None:
    files, _ = F.split_inputs([fleet.telemetry])
    if batch_rows is None:  # the eager reader against a plain one
        plain = pl.concat(
            [pl.read_parquet(f, hive_partitioning=False) for f in files], how="diagonal_relaxed"
        )
        assert_frame_equal(table, F.conform(plain).sort(F.KEYS, maintain_order=True), check_exact=True)
    batches = list(F.TelemetryFiles(files).batches(batch_rows))
    if batch_rows == 1:
        assert len(batches) == table["token_id"].n_unique()
    assert len(batches) > (3 if batch_rows else 0)
    assert_frame_equal(pl.concat(batches), table, check_exact=True)
    trips, summary = F.by_vehicle_batches(files, _trips, columns=RF.RANGE_SIGNALS, batch_rows=batch_rows)
    assert_frame_equal(trips, _trips(table), check_exact=True)
    assert trips.height > 100 and summary == F.data_summary(table)
    windows, _ = F.by_vehicle_batches(files, _windows, columns=AF.ANOMALY_SIGNALS, batch_rows=batch_rows)
    assert_frame_equal(windows, _windows(table), check_exact=True)


@pytest.mark.parametrize("family", [RangeFamily, AnomalyFamily])
def test_training_does_not_depend_on_the_batch_size(
    family: type, fleet: FleetData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hp = {"epochs": 2}
    inputs = [fleet.telemetry, fleet.truth]
    whole = family().train(make_ctx(tmp_path / "a", inputs, family.name, hp, seed=3))  # type: ignore[attr-defined]
    monkeypatch.setattr(F, "BATCH_ROWS", 5_000)  # ~ a few vehicle-days per batch
    small = family().train(make_ctx(tmp_path / "b", inputs, family.name, hp, seed=3))  # type: ignore[attr-defined]
    assert small.metrics == whole.metrics and small.model_config == whole.model_config
    assert all(torch.equal(small.state_dict[k], whole.state_dict[k]) for k in whole.state_dict)
    assert whole.model_config["data"]["rows"] > 10_000


# ----------------------------------------------------------------------------------------------- Delta


def test_a_delta_table_reads_its_current_files_only(delta: tuple[Path, pl.DataFrame], tmp_path: Path) -> None:
    root, rows = delta
    current = sorted(DeltaTable(str(root)).file_uris())
    on_disk = sorted(str(p) for p in root.glob("date=*/*.parquet"))
    assert len(on_disk) > len(current) and not any("orphan" in f for f in current)
    assert F.dataset_files(root) == current
    day = next(root.glob("date=*"))  # a partition folder: the table's current files in it
    assert F.dataset_files(day) == [f for f in current if Path(f).parent == day]
    holder = tmp_path / "inputs"  # a plain folder holding the table: the table by its log, never a glob
    holder.mkdir()
    shutil.copytree(root, holder / "telemetry")  # orphans and removed files included
    assert [Path(f).name for f in F.dataset_files(holder)] == [Path(f).name for f in current]
    assert F.split_inputs([root])[0] == current
    got = F.read_telemetry(root)
    assert got.columns == [*F.KEYS, *F.SIGNALS]  # no `date` column from the hive folders
    assert_frame_equal(got, rows, check_exact=True)


def test_files_of_different_schemas_read_as_nulls_and_batch_like_eager(
    delta: tuple[Path, pl.DataFrame],
) -> None:
    root, rows = delta
    files = F.dataset_files(root)
    names = {frozenset(pq.read_schema(f).names) for f in files}
    assert len(names) == 2 and all("date" not in n for n in names)  # old files lack LATE; no partition column
    tf = F.TelemetryFiles(files)
    assert {c for c in LATE if c in tf.schema.names} == set(LATE)
    old = rows.filter(pl.col(F.TIRES[0]).is_null())["token_id"].unique()
    old_rows = rows.filter(pl.col("token_id").is_in(old.implode()))
    assert old.len() >= 3 and all(old_rows[c].is_null().all() for c in LATE)
    eager = F.read_telemetry(files)
    assert_frame_equal(eager, rows, check_exact=True)
    given = files[1:]  # a job reads the files it is given, whatever else the folder holds
    assert F.read_telemetry(given).height == sum(pq.ParquetFile(f).metadata.num_rows for f in given)
    for fn, cols in ((_trips, RF.RANGE_SIGNALS), (_windows, AF.ANOMALY_SIGNALS)):
        lazy, summary = F.by_vehicle_batches(files, fn, columns=cols, batch_rows=4_000)
        assert_frame_equal(lazy, fn(eager), check_exact=True)
        assert lazy.height > 50 and summary == F.data_summary(rows)
    windows = _windows(eager)
    assert windows.filter(pl.col("token_id").is_in(old.implode()))["tire_dev_0"].is_null().all()


def test_batch_scoring_of_a_delta_table_equals_scoring_its_eager_trips(
    delta: tuple[Path, pl.DataFrame], tmp_path: Path
) -> None:
    root, rows = delta
    files = F.split_inputs([root])[0]
    model = RangeFamily().train(make_ctx(tmp_path, [root], "range", {"epochs": 2}, seed=1))
    out = R.score_dataset(
        model.state_dict, model.model_config, files, tmp_path / "p.parquet", batch_rows=3_000
    )
    got = pl.read_parquet(out.output)
    config = model.model_config
    net = net_from_config(config, model.state_dict)
    trips = RF.trip_windows(rows, min_km=float(config["hyperparameters"]["min_km"])).sort("token_id", "start")
    want = predict_trips(net, config, trips, calibration(config))
    assert out.rows == got.height == want.height > 50
    assert got["token_id"].is_sorted()  # batches come in vehicle order
    assert_frame_equal(got.select(~cs.float()), want.select(~cs.float()), check_exact=True)
    for c in ("km", "kwh_per_100km", "soc_start"):
        assert_frame_equal(got.select(c), want.select(c), check_exact=True)
    # the net's outputs may differ by float32 rounding (BLAS kernels depend on the batch's size)
    assert np.allclose(got["predicted_kwh_per_100km"], want["predicted_kwh_per_100km"], rtol=1e-5)


# ----------------------------------------------------------------------------------------------- errors, folders


def test_incompatible_column_types_name_the_files(tmp_path: Path) -> None:
    base = {"token_id": pa.array([1, 1], pa.int64()),
            "timestamp": pa.array([0, 60_000_000], pa.timestamp("us", "UTC"))}  # fmt: skip
    pq.write_table(pa.table({**base, F.SPEED: pa.array([1.0, 2.0])}), tmp_path / "a.parquet")
    pq.write_table(pa.table({**base, F.SPEED: pa.array(["fast", "slow"])}), tmp_path / "b.parquet")
    pq.write_table(pa.table({F.SPEED: pa.array([1.0])}), tmp_path / "c.parquet")
    with pytest.raises(ConfigError, match="incompatible columns"):
        F.TelemetryFiles([tmp_path / "a.parquet", tmp_path / "b.parquet"])
    with pytest.raises(ConfigError, match=r"c\.parquet lacks key column"):
        F.read_telemetry(tmp_path / "c.parquet")


def test_a_plain_folder_lists_its_files_as_before(tmp_path: Path) -> None:
    for rel in ("date=2026-01-01/part-0.parquet", "date=2026-01-02/part-0.parquet", "_depin/state.parquet",
                ".tmp/x.parquet", "date=2026-01-02/.part-0.parquet.tmp"):  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert F.dataset_files(tmp_path) == [
        str(tmp_path / "date=2026-01-01/part-0.parquet"),
        str(tmp_path / "date=2026-01-02/part-0.parquet"),
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no Parquet files"):
        F.dataset_files(tmp_path / "empty")
