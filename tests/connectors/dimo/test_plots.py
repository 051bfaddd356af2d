"""Fleet plots over a real TelemetryStore: the coverage counts are the dataset's rows per vehicle-hour, the
tracks are the dataset's moving positions, the PNGs carry the digest of that data and stay small."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from matplotlib.collections import PathCollection

from connectors.dimo import plots as FP
from connectors.dimo.schema import telemetry_schema
from connectors.dimo.store import TelemetryStore
from depin_core import plots as P

START = datetime(2026, 3, 1, 22, tzinfo=UTC)  # crosses midnight: two partition files
SIGNALS = ["speed", "powertrainTractionBatteryStateOfChargeCurrent", "currentLocationCoordinates"]


def fleet_table(location: bool = True) -> pa.Table:
    """Three vehicles, one row a minute for 6 h, with gaps: vehicle 2 misses hours 1–2, vehicle 3 sends
    every other minute in hour 4 and nothing after; vehicle 1 parks for the first hour (one position)."""
    rows: dict[str, list] = {"token_id": [], "timestamp": [], "speed": [], "soc": [], "lat": [], "lon": []}  # type: ignore[type-arg]
    for v in (1, 2, 3):
        for m in range(6 * 60):
            hour = m // 60
            if (v == 2 and hour in (1, 2)) or (v == 3 and (hour > 4 or (hour == 4 and m % 2))):
                continue
            parked = v == 1 and hour == 0
            rows["token_id"].append(v)
            rows["timestamp"].append(START + timedelta(minutes=m))
            rows["speed"].append(0.0 if parked else float(m % 90))
            rows["soc"].append(80.0 - m / 10)
            rows["lat"].append(40.0 + v if parked else 40.0 + v + m * 1e-4)
            rows["lon"].append(-100.0 if parked else -100.0 + m * 1e-4)
    signals = SIGNALS if location else SIGNALS[:2]
    schema = telemetry_schema(signals, interval="1m")
    cols = {
        "token_id": pa.array(rows["token_id"], pa.int64()),
        "timestamp": pa.array(rows["timestamp"], pa.timestamp("us", tz="UTC")),
        "speed": pa.array(rows["speed"]),
        "powertrainTractionBatteryStateOfChargeCurrent": pa.array(rows["soc"]),
    }
    if location:
        cols |= {"latitude": pa.array(rows["lat"]), "longitude": pa.array(rows["lon"])}
    return pa.table([cols[f.name] for f in schema], schema=schema)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fleet")
    TelemetryStore(root).append(fleet_table())
    assert len(list(root.glob("date=*/*.parquet"))) == 2
    return root


def read_all(root: Path) -> pl.DataFrame:
    return pl.read_parquet(root / "date=*" / "*.parquet", hive_partitioning=False)


@pytest.fixture(params=[65_536, 7], ids=["one-batch", "batches-of-7"])
def batch_rows(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Whole files per batch, and tiny batches (streaming across batch and file boundaries)."""
    monkeypatch.setattr(FP, "BATCH_ROWS", request.param)
    return int(request.param)


def test_coverage_counts_are_the_rows_per_vehicle_hour(dataset: Path, batch_rows: int) -> None:
    data = FP.coverage_data(dataset)
    df = read_all(dataset).with_columns(pl.col("timestamp").dt.truncate("1h").alias("hour"))
    want = df.group_by("token_id", "hour").len()
    assert data["vehicles"] == [1, 2, 3]
    assert data["hours"] == 6
    assert data["hour0_ms"] == int(START.timestamp() * 1000)
    counts = np.asarray(data["counts"])
    assert counts.sum() == df.height
    for tid, hour, n in want.iter_rows():
        h = int((hour - START).total_seconds() // 3600)
        assert counts[data["vehicles"].index(tid), h] == n
    assert counts[1, 1] == counts[1, 2] == 0  # the gaps are zeros
    assert counts[2, 4] == 30 and counts[2, 5] == 0


def test_coverage_heatmap_draws_the_counts_with_gaps_masked(dataset: Path) -> None:
    data = FP.coverage_data(dataset)
    fig = FP.draw_coverage(data)
    image = fig.axes[0].images[0].get_array()
    assert np.array_equal(image.filled(0), np.asarray(data["counts"]))
    assert image.mask.sum() == (np.asarray(data["counts"]) == 0).sum()
    png = P.encode_png(fig, data)
    assert len(png) <= P.MAX_PNG_BYTES
    assert P.png_text(png)[P.DATA_KEY] == P.data_digest(data)


def test_coverage_blocks_of_hours_keep_the_totals() -> None:
    data = {"vehicles": [1], "hour0_ms": 0, "hours": 10, "counts": [[1, 0, 0, 0, 2, 3, 0, 0, 0, 0]]}
    image = FP.draw_coverage(data, max_cols=4).axes[0].images[0].get_array()
    assert image.filled(0).tolist() == [[1.0, 5.0, 0.0, 0.0]]  # blocks of 3 hours; empty blocks masked
    assert image.mask.tolist() == [[False, False, True, True]]


def test_tracks_are_the_datasets_moving_positions(dataset: Path, batch_rows: int) -> None:
    df = read_all(dataset).sort("token_id", "timestamp")
    prev = [pl.col(c).shift(1).over("token_id").alias(f"_{c}") for c in ("latitude", "longitude")]
    moved = (
        df.with_columns(*prev, pl.col("timestamp").dt.date().alias("_day"))
        .filter(
            pl.col("_latitude").is_null()
            | (pl.col("latitude") != pl.col("_latitude"))
            | (pl.col("longitude") != pl.col("_longitude"))
        )
        .sort("_day", "token_id", "timestamp")  # the dataset's order: day files, then vehicle, time
    )
    full = FP.tracks_data(dataset, max_points=100_000)
    assert full["every"] == 1 and full["moves"] == moved.height
    assert full["latitude"] == moved["latitude"].to_list()
    assert full["value"] == moved["speed"].to_list()
    assert moved.height < df.height  # the parked hour is one position

    thin = FP.tracks_data(dataset, colour="soc", max_points=100)
    assert len(thin["latitude"]) <= 100 and thin["every"] > 1
    picked = moved[:: thin["every"]]  # every k-th moving position, whatever the batches
    assert thin["latitude"] == picked["latitude"].to_list()
    assert thin["token_id"] == picked["token_id"].to_list()
    assert thin["value"] == picked["powertrainTractionBatteryStateOfChargeCurrent"].to_list()


def test_tracks_figure_draws_the_points(dataset: Path) -> None:
    data = FP.tracks_data(dataset, max_points=500)
    fig = FP.draw_tracks(data)
    scatters = [c for ax in fig.axes for c in ax.collections if isinstance(c, PathCollection)]
    drawn = np.concatenate([c.get_offsets() for c in scatters])
    want = np.column_stack([data["longitude"], data["latitude"]])
    assert sorted(map(tuple, drawn.tolist())) == sorted(map(tuple, want.tolist()))
    png = P.encode_png(fig, data)
    assert len(png) <= P.MAX_PNG_BYTES
    assert P.png_text(png)[P.DATA_KEY] == P.data_digest(data)


def test_render_fleet_reports_a_missing_plot_and_draws_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "noloc"
    TelemetryStore(root).append(fleet_table(location=False))
    out = FP.render_fleet(root, tmp_path / "png")
    assert "latitude/longitude" in out["tracks"]["missing"]
    assert out["coverage"]["png"] == (tmp_path / "png" / "coverage.png").read_bytes()
    assert not (tmp_path / "png" / "tracks.png").exists()
    empty = FP.render_fleet(tmp_path / "nothing")
    assert set(empty) == {"coverage", "tracks"} and all("missing" in v for v in empty.values())
