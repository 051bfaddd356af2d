"""Model families on a REAL fleet dataset (emulator → DIMO client → ingest → TelemetryStore)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from gpu_jobs.models import anomaly as A
from gpu_jobs.models import features as F
from gpu_jobs.models import range as R
from gpu_jobs.models.anomaly import AnomalyFamily
from gpu_jobs.models.anomaly import features as AF
from gpu_jobs.models.range import RangeFamily
from gpu_jobs.models.range import features as RF
from tests.support.fleet_data import FleetData, build_fleet_data
from tests.support.model_ctx import MemoryCheckpointer, make_ctx

RANGE_SEED, ANOMALY_SEED = 1, 0
SPLITS = range(5)  # job seeds = vehicle splits


def range_passes(m: dict) -> bool:  # type: ignore[type-arg]
    """The issue's bar (≤ 0.5 × the fleet-mean baseline) and clearly better than the vehicle's own trip
    history (the per-vehicle calibration alone gets close to that, so the learned model must add to it)."""
    return m["mae"] <= 0.5 * m["baseline_mae"] and m["mae"] <= 0.9 * m["history_baseline_mae"]


def anomaly_passes(m: dict) -> bool:  # type: ignore[type-arg]
    """The issue's bar: recall ≥ 0.9 (majority-of-visible-windows rule) at ≤ 5 % false-positive windows."""
    return m["recall"] >= 0.9 and m["false_positive_rate"] <= 0.05


def train_splits(family: type, data: FleetData, inputs: list[Path], tmp: Path) -> list[dict]:  # type: ignore[type-arg]
    """Metrics of one training run per vehicle split in :data:`SPLITS`."""
    return [
        family().train(make_ctx(tmp / str(s), inputs, family.name, seed=s)).metrics  # type: ignore[attr-defined]
        for s in SPLITS
    ]


@pytest.fixture(scope="module")
def table(fleet: FleetData) -> pl.DataFrame:
    return F.read_telemetry(fleet.telemetry)


@pytest.fixture(scope="module")
def range_model(fleet: FleetData, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    ctx = make_ctx(tmp_path_factory.mktemp("range"), [fleet.telemetry], "range", seed=RANGE_SEED)
    return RangeFamily().train(ctx)


@pytest.fixture(scope="module")
def anomaly_model(fleet: FleetData, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    ctx = make_ctx(
        tmp_path_factory.mktemp("anom"), [fleet.telemetry, fleet.truth], "anomaly", seed=ANOMALY_SEED
    )
    return AnomalyFamily().train(ctx)


# ----------------------------------------------------------------------------------------------- features


def test_trip_windows_are_physical(table: pl.DataFrame) -> None:
    trips = RF.trip_windows(table)
    assert trips.columns[:3] == ["token_id", "start", "end"] and set(RF.RANGE_FEATURES) <= set(trips.columns)
    measured = trips.filter(pl.col("kwh_per_100km").is_not_null())
    assert measured.height > 100 and measured.height >= 0.9 * trips.height
    y = measured["kwh_per_100km"].to_numpy()
    assert y.min() > 8 and y.max() < 60, "EV consumption outside any plausible kWh/100 km"
    assert (trips["km"] >= 2.0).all() and (trips["end"] >= trips["start"]).all()
    ev = table.filter(pl.col(F.POWERTRAIN) == F.ELECTRIC)["token_id"].unique()
    assert set(trips["token_id"].unique()) <= set(ev), "trips only for EVs"


def test_anomaly_windows_shape_and_baseline(table: pl.DataFrame) -> None:
    w = AF.anomaly_windows(table, window_minutes=30)
    vehicles = table["token_id"].n_unique()
    days = (table["timestamp"].max() - table["timestamp"].min()).total_seconds() / 86400  # type: ignore[operator]
    assert abs(w.height - vehicles * days * 48) <= vehicles * 2
    assert (w["window_start"].dt.minute().is_in([0, 30])).all()
    assert (
        w.filter(pl.col("powertrain") == F.COMBUSTION)["batt_excess"].null_count()
        == w.filter(pl.col("powertrain") == F.COMBUSTION).height
    )
    # the per-vehicle tyre baseline removes the car's own offset: normal windows sit near 0 kPa
    assert abs(float(w["tire_dev_0"].median())) < 0.2  # type: ignore[arg-type]


def test_normalization_uses_training_vehicles_only(range_model, table: pl.DataFrame) -> None:  # type: ignore[no-untyped-def]
    cfg = range_model.model_config
    train, held = set(cfg["train_vehicles"]), set(cfg["heldout_vehicles"])
    assert train and held and not train & held
    trips = RF.trip_windows(table).filter(pl.col("kwh_per_100km").is_not_null())
    expect = F.fit_norm(trips.filter(pl.col("token_id").is_in(list(train))), list(RF.RANGE_FEATURES))
    leak = F.fit_norm(trips, list(RF.RANGE_FEATURES))
    assert cfg["norm"] == expect and cfg["norm"] != leak
    assert [f["name"] for f in cfg["features"]] == list(RF.RANGE_FEATURES) and all(
        f["unit"] for f in cfg["features"]
    )


def test_split_is_seeded_and_disjoint() -> None:
    ids = list(range(100, 130))
    a = F.split_vehicles(ids, holdout=0.3, seed=3)
    b = F.split_vehicles(reversed(ids), holdout=0.3, seed=3)
    c = F.split_vehicles(ids, holdout=0.3, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)) and not np.array_equal(a[1], c[1])
    assert len(a[1]) == 9 and not set(a[0]) & set(a[1])


# ----------------------------------------------------------------------------------------------- range


def test_range_meets_quality_bar_on_heldout_vehicles(range_model) -> None:  # type: ignore[no-untyped-def]
    m = range_model.metrics
    assert m["n_windows"] >= 30 and m["n_vehicles"] >= 4
    assert range_passes(m), m
    assert m["fleet_model_mae"] < m["baseline_mae"] and m["range_mae_km"] < m["baseline_range_mae_km"]


@pytest.mark.parametrize("which", ["fleet", "fleet_b"])
def test_range_quality_bar_holds_across_splits_and_fleets(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Every split of two fleet seeds meets the bar (20 s buckets; with 1-minute buckets the stop-and-go inside
    each minute is invisible and a few splits miss it — see README "GPU jobs")."""
    data: FleetData = request.getfixturevalue(which)
    runs = train_splits(RangeFamily, data, [data.telemetry], tmp_path)
    ratios = np.array([m["mae"] / m["baseline_mae"] for m in runs])
    assert all(range_passes(m) for m in runs), ratios


def test_range_trained_on_shuffled_targets_fails_the_bar(
    fleet: FleetData, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    real = RF.trip_windows

    def shuffled(df: pl.DataFrame, **kw: object) -> pl.DataFrame:
        trips = real(df, **kw).filter(pl.col("kwh_per_100km").is_not_null())  # type: ignore[arg-type]
        train, _ = F.split_vehicles(trips["token_id"], holdout=0.3, seed=RANGE_SEED)
        is_train = trips["token_id"].is_in(train.tolist())
        y = trips["kwh_per_100km"].to_numpy().copy()
        idx = np.flatnonzero(is_train.to_numpy())
        y[idx] = y[np.random.default_rng(0).permutation(idx)]
        return trips.with_columns(pl.Series("kwh_per_100km", y))

    monkeypatch.setattr(RF, "trip_windows", shuffled)
    m = RangeFamily().train(make_ctx(tmp_path, [fleet.telemetry], "range", seed=RANGE_SEED)).metrics
    assert not range_passes(m), m


def test_range_resume_after_crash_is_bit_identical(fleet: FleetData, tmp_path: Path) -> None:
    hp = {"epochs": 8}
    full = RangeFamily().train(make_ctx(tmp_path, [fleet.telemetry], "range", hp, seed=2, every=5))

    class Crash(Exception):
        pass

    def crash(step: int, total: int, **kw: object) -> None:
        if kw["epoch"] == 4:
            raise Crash

    ckpt = MemoryCheckpointer(5)
    with pytest.raises(Crash):
        RangeFamily().train(
            make_ctx(tmp_path, [fleet.telemetry], "range", hp, seed=2, checkpointer=ckpt, report=crash)
        )
    assert ckpt.saved, "a checkpoint was written before the crash"
    torch.manual_seed(
        12345
    )  # the resumed process starts from another RNG state: the checkpoint must restore it
    resumed = RangeFamily().train(
        make_ctx(tmp_path, [fleet.telemetry], "range", hp, seed=2, checkpointer=ckpt)
    )
    assert full.state_dict.keys() == resumed.state_dict.keys()
    assert all(torch.equal(full.state_dict[k], resumed.state_dict[k]) for k in full.state_dict)
    assert full.metrics == resumed.metrics


def test_range_streaming_scoring_matches_in_memory(range_model, fleet: FleetData, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    files, _ = F.split_inputs([fleet.telemetry])
    small = R.score_dataset(range_model.state_dict, range_model.model_config, files, tmp_path / "a.parquet",
                            batch_rows=3_000)  # fmt: skip
    big = R.score_dataset(range_model.state_dict, range_model.model_config, files, tmp_path / "b.parquet")
    a = pl.read_parquet(small.output).sort("token_id", "start")
    b = pl.read_parquet(big.output).sort("token_id", "start")
    assert small.rows == a.height == b.height > 100
    assert a.select("token_id", "start", "km").equals(b.select("token_id", "start", "km"))
    assert np.allclose(a["range_km"].to_numpy(), b["range_km"].to_numpy(), equal_nan=True)
    schema = pq.read_schema(small.output)
    assert {"token_id", "start", "end", "predicted_kwh_per_100km", "range_km"} <= set(schema.names)
    assert (a["range_km"].drop_nulls() > 0).all() and small.metrics["mae"] < small.metrics["baseline_mae"]


# ----------------------------------------------------------------------------------------------- anomaly


def test_anomaly_meets_quality_bar_on_heldout_vehicles(anomaly_model) -> None:  # type: ignore[no-untyped-def]
    m = anomaly_model.metrics
    assert m["n_faults"] >= 2 and m["n_clean_windows"] > 500
    assert anomaly_passes(m), m


@pytest.mark.parametrize("which", ["fleet", "fleet_b"])
def test_anomaly_quality_bar_holds_on_every_split(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    data: FleetData = request.getfixturevalue(which)
    runs = train_splits(AnomalyFamily, data, [data.telemetry, data.truth], tmp_path)
    assert sum(m["n_faults"] for m in runs) >= 10
    assert all(anomaly_passes(m) for m in runs if m["n_faults"]), [
        (m["recall"], m["false_positive_rate"]) for m in runs
    ]


def test_random_flags_fail_the_recall_rule(anomaly_model, table: pl.DataFrame, fleet: FleetData) -> None:  # type: ignore[no-untyped-def]
    cfg = anomaly_model.model_config
    w = AF.anomaly_windows(table).filter(pl.col("token_id").is_in(cfg["heldout_vehicles"]))
    rnd = w.with_columns(pl.Series("flagged", np.random.default_rng(1).random(w.height) < 0.05))
    m = A.evaluate(rnd, pl.read_parquet(fleet.truth / "faults.parquet"))
    assert m["recall"] < 0.5 and m["false_positive_rate"] < 0.1


def test_anomaly_streaming_scoring(anomaly_model, fleet: FleetData, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    files, faults = F.split_inputs([fleet.telemetry, fleet.truth])
    small = A.score_dataset(anomaly_model.state_dict, anomaly_model.model_config, files, tmp_path / "a.parquet",
                            faults=faults, batch_rows=2_000)  # fmt: skip
    big = A.score_dataset(anomaly_model.state_dict, anomaly_model.model_config, files, tmp_path / "b.parquet")
    a, b = pl.read_parquet(small.output), pl.read_parquet(big.output)
    assert small.rows == a.height == b.height > 1000
    a, b = a.sort("token_id", "window_start"), b.sort("token_id", "window_start")
    # same windows and features; scores agree up to float32 rounding (BLAS kernels depend on the batch size)
    assert a.drop("score", "flagged").equals(b.drop("score", "flagged"))
    assert np.allclose(a["score"].to_numpy(), b["score"].to_numpy(), rtol=1e-5)
    assert {"token_id", "window_start", "window_end", "score", "threshold", "flagged"} <= set(a.columns)
    assert 0 < small.metrics["flagged_share"] < 0.3 and small.metrics["recall"] >= 0.9


# ----------------------------------------------------------------------------------------------- real driving


@pytest.fixture(scope="module")
def cmap_fleet(tmp_path_factory: pytest.TempPathFactory) -> FleetData:
    """The real CMAP speed traces replayed as EVs through the emulator, next to two simulated vehicles."""
    return build_fleet_data(tmp_path_factory.mktemp("cmap"), vehicles=2, days=2.0, seed=3, cmap=True)


def test_real_cmap_traces_are_scored_by_both_models(  # type: ignore[no-untyped-def]
    range_model, anomaly_model, cmap_fleet: FleetData, tmp_path: Path
) -> None:
    truth = pl.read_parquet(cmap_fleet.truth / "vehicles.parquet")
    cmap_ids = truth.filter(pl.col("origin").str.starts_with("cmap:"))["token_id"].to_list()
    assert len(cmap_ids) >= 3
    files, faults = F.split_inputs([cmap_fleet.telemetry, cmap_fleet.truth])

    r = R.score_dataset(range_model.state_dict, range_model.model_config, files, tmp_path / "range.parquet")
    trips = pl.read_parquet(r.output).filter(pl.col("token_id").is_in(cmap_ids))
    # a trace whose logger gaps leave no bracketed trip ≥ min_km yields no trip row, which is correct
    assert trips["token_id"].n_unique() >= 2, trips
    pred = trips["predicted_kwh_per_100km"].to_numpy()
    assert np.isfinite(pred).all() and (pred > 5).all() and (pred < 60).all()
    assert (trips["range_km"].drop_nulls() > 0).all()
    measured = trips.drop_nulls("kwh_per_100km")
    assert measured.height >= 3 and {"mae", "baseline_mae"} <= set(r.metrics)
    y = measured["kwh_per_100km"].to_numpy()
    mae = float(np.abs(measured["predicted_kwh_per_100km"].to_numpy() - y).mean())
    assert mae < 0.15 * y.mean(), (mae, y.mean())  # a sane model on real speed profiles, not a quality bar

    a = A.score_dataset(anomaly_model.state_dict, anomaly_model.model_config, files, tmp_path / "anom.parquet",
                        faults=faults)  # fmt: skip
    windows = pl.read_parquet(a.output).filter(pl.col("token_id").is_in(cmap_ids))
    assert windows["token_id"].n_unique() == len(cmap_ids)
    assert np.isfinite(windows["score"].to_numpy()).all()
    # no fault is injected on replayed vehicles: the detector should stay quiet on real driving
    assert windows["flagged"].mean() <= 0.05, windows["flagged"].mean()


@pytest.mark.parametrize("family", ["range", "anomaly"])
def test_a_model_read_back_from_its_artifact_scores_like_the_trained_one(  # type: ignore[no-untyped-def]
    family: str, range_model, anomaly_model, fleet: FleetData, tmp_path: Path
) -> None:
    """model.json is written with sorted keys: the feature order must not come from the norm mapping."""
    from gpu_jobs.artifacts import load_artifact, write_artifact

    trained, mod, key = {"range": (range_model, R, "predicted_kwh_per_100km"),
                         "anomaly": (anomaly_model, A, "score")}[family]  # fmt: skip
    write_artifact(tmp_path / "art", state_dict=trained.state_dict, model_config=trained.model_config,
                   metrics=trained.metrics)  # fmt: skip
    art = load_artifact(tmp_path / "art")
    files, _ = F.split_inputs([fleet.telemetry])
    a = mod.score_dataset(trained.state_dict, trained.model_config, files, tmp_path / "a.parquet")
    b = mod.score_dataset(art.state_dict, art.model_config, files, tmp_path / "b.parquet")
    x, y = pl.read_parquet(a.output)[key].to_numpy(), pl.read_parquet(b.output)[key].to_numpy()
    assert len(x) == len(y) > 100 and np.allclose(x, y, rtol=1e-5, equal_nan=True)
