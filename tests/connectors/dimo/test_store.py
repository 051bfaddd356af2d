"""TelemetryStore: partitioned Parquet dataset with dedupe, schema evolution, watermarks and crash safety."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from connectors.dimo import store as store_mod
from connectors.dimo.schema import TIMESTAMP_TYPE, telemetry_schema
from connectors.dimo.store import TelemetryStore
from depin_core.errors import ConfigError

T0 = datetime(2026, 3, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
REPO = Path(__file__).resolve().parents[3]


def make_table(
    tokens: list[int],
    hours: list[int],
    speed: list[float | None],
    *,
    interval: str | None = "1h",
    extra: dict[str, list] | None = None,
) -> pa.Table:
    """A contract table: rows at T0 + hours[i] for tokens[i], with 'speed' and optional extra signals."""
    extra = extra or {}
    schema = telemetry_schema(["speed", *extra], interval=interval)
    data = {
        "token_id": tokens,
        "timestamp": [T0 + h * HOUR for h in hours],
        "speed": speed,
        **extra,
    }
    return pa.table({f.name: data[f.name] for f in schema}, schema=schema)


def rows(table: pa.Table) -> list[tuple]:
    return list(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))


def files_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.glob("date=*/*.parquet"))
    }


def hidden_temps(root: Path) -> list[Path]:
    return sorted(root.glob("date=*/.*.tmp")) + sorted(root.glob("_depin/.*.tmp"))


def test_same_write_twice_is_idempotent(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    t = make_table([7, 7, 3, 3], [0, 30, 1, 25], [10.0, 20.0, None, 40.0])
    first = store.write(t)
    assert (first.rows_in, first.rows_added, first.rows_replaced) == (4, 4, 0)
    assert first.partitions == ["date=2026-03-01", "date=2026-03-02"]
    before, digest = store.read(), files_digest(tmp_path)

    second = store.write(t)
    assert (second.rows_in, second.rows_added, second.rows_replaced) == (4, 0, 4)
    after = store.read()
    assert after.equals(before)
    assert files_digest(tmp_path) == digest
    assert rows(after) == [
        (3, T0 + 1 * HOUR, None),
        (3, T0 + 25 * HOUR, 40.0),
        (7, T0, 10.0),
        (7, T0 + 30 * HOUR, 20.0),
    ]


def test_overlap_replaces_overlapping_rows_and_keeps_the_rest(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    store.write(make_table([1, 1, 1, 2], [0, 1, 2, 0], [1.0, 2.0, 3.0, 9.0]))
    res = store.write(make_table([1, 1, 1], [2, 3, 24], [30.0, 40.0, 50.0]))
    assert (res.rows_added, res.rows_replaced) == (2, 1)
    assert rows(store.read()) == [
        (1, T0, 1.0),
        (1, T0 + HOUR, 2.0),
        (1, T0 + 2 * HOUR, 30.0),
        (1, T0 + 3 * HOUR, 40.0),
        (1, T0 + 24 * HOUR, 50.0),
        (2, T0, 9.0),
    ]


def test_duplicates_within_one_table_keep_the_last_row(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    res = store.write(make_table([1, 1, 1], [0, 0, 1], [1.0, 2.0, 3.0]))
    assert (res.rows_in, res.rows_added, res.rows_replaced) == (3, 2, 0)
    assert rows(store.read()) == [(1, T0, 2.0), (1, T0 + HOUR, 3.0)]


def test_schema_evolution_adds_a_column_null_in_old_rows(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    store.write(make_table([1, 1], [0, 24], [1.0, 2.0]))
    # Same day as an old row (merged file) and a new day; day 2 (hour 24) is untouched and lacks the column.
    store.write(make_table([1, 1], [1, 48], [3.0, 4.0], extra={"powertrainType": ["BEV", "HYBRID"]}))
    got = store.read()
    assert got.column_names == ["token_id", "timestamp", "speed", "powertrainType"]
    assert got.schema.field("powertrainType").type == pa.string()
    assert got.schema.field("speed").metadata[b"unit"] == b"km/h"
    assert rows(got) == [
        (1, T0, 1.0, None),
        (1, T0 + HOUR, 3.0, "BEV"),
        (1, T0 + 24 * HOUR, 2.0, None),
        (1, T0 + 48 * HOUR, 4.0, "HYBRID"),
    ]
    # The untouched day was rewritten with the new column, so readers that trust one file's schema see it all.
    assert {tuple(pq.read_schema(f).names) for f in tmp_path.glob("date=*/part-0.parquet")} == {
        ("token_id", "timestamp", "speed", "powertrainType")
    }
    df = pl.read_parquet(tmp_path / "**" / "*.parquet").sort("timestamp")
    assert df["powertrainType"].to_list() == [None, "BEV", None, "HYBRID"]


def test_interrupted_schema_rollout_is_finished_by_the_next_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = TelemetryStore(tmp_path)
    store.write(make_table([1, 1, 1], [0, 24, 48], [1.0, 2.0, 3.0]))
    real_replace = os.replace

    def fail_on_rollout(src: str, dst: str) -> None:
        if str(dst).endswith(".parquet") and "2026-03-01" not in str(dst):
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", fail_on_rollout)
    with pytest.raises(OSError):
        store.write(make_table([1], [1], [4.0], extra={"powertrainType": ["BEV"]}))
    monkeypatch.undo()
    got = store.read()  # the state already knows the column; files without it read as nulls
    assert got.column("powertrainType").to_pylist() == [None, "BEV", None, None]

    store.write(make_table([2], [0], [5.0]))  # touches day 1 only, and finishes the rollout
    assert {tuple(pq.read_schema(f).names) for f in tmp_path.glob("date=*/part-0.parquet")} == {
        ("token_id", "timestamp", "speed", "powertrainType")
    }
    assert json.loads((tmp_path / "_depin" / "state.json").read_text())["uniform"] is True
    assert store.read().num_rows == 5


def test_type_conflict_is_refused(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    store.write(make_table([1], [0], [1.0]))
    bad = make_table([1], [1], [2.0]).set_column(2, "speed", pa.array(["fast"]))
    with pytest.raises(ConfigError, match=r"'speed' is double in the dataset .* but string"):
        store.write(bad)
    assert store.read().num_rows == 1


def test_aggregation_conflict_is_refused(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    store.write(make_table([1], [0], [1.0]))
    t = make_table([1], [1], [2.0])
    other = pa.schema(
        [f.with_metadata({**f.metadata, b"agg": b"MAX"}) if f.name == "speed" else f for f in t.schema],
        metadata=t.schema.metadata,
    )
    with pytest.raises(ConfigError, match=r"AVG aggregates .* but MAX"):
        store.write(t.cast(other))


def test_interval_mismatch_is_refused(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    store.write(make_table([1], [0], [1.0], interval="1h"))
    assert store.interval == "1h"
    with pytest.raises(ConfigError, match=r"interval 5m .* interval 1h.*another --out directory"):
        store.write(make_table([1], [1], [2.0], interval="5m"))
    with pytest.raises(ConfigError, match="interval none"):
        store.write(make_table([1], [1], [2.0], interval=None))
    assert store.read().num_rows == 1


def test_empty_interval_metadata_means_no_interval_on_every_write(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    t = make_table([1], [0], [1.0], interval=None)
    t = t.replace_schema_metadata({**t.schema.metadata, b"depin.interval": b""})
    store.write(t)
    assert store.interval is None
    store.write(t)  # the same table again is not an interval mismatch
    assert store.read().num_rows == 1


def test_invalid_table_is_refused(tmp_path: Path) -> None:
    t = make_table([1], [0], [1.0]).set_column(0, "token_id", pa.array([1], pa.int32()))
    with pytest.raises(ConfigError, match="token_id"):
        TelemetryStore(tmp_path).write(t)
    assert not (tmp_path / "_depin" / "state.json").exists()


def test_watermarks_are_monotonic_and_persisted(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    assert store.watermark(1) is None and store.watermarks() == {}
    store.write(make_table([1, 2], [0, 0], [1.0, 2.0]), watermarks={1: T0 + HOUR, 2: T0 + HOUR})
    store.write(make_table([1], [1], [3.0]), watermarks={1: T0 + 2 * HOUR, 2: T0})  # 2 would move back
    # An empty window still completes: the watermark advances with no rows.
    empty = make_table([], [], [])
    res = store.write(empty, watermarks={3: datetime(2026, 3, 1, 5)})  # naive means UTC
    assert (res.rows_in, res.partitions) == (0, [])

    reopened = TelemetryStore(tmp_path)
    assert reopened.watermarks() == {1: T0 + 2 * HOUR, 2: T0 + HOUR, 3: T0 + 5 * HOUR}
    assert reopened.watermark(2) == T0 + HOUR
    assert reopened.watermark(2).tzinfo is not None
    state = json.loads((tmp_path / "_depin" / "state.json").read_text())
    assert state["format_version"] == 1 and state["interval"] == "1h"
    assert [c["name"] for c in state["columns"]] == ["token_id", "timestamp", "speed"]


def test_set_watermarks_before_any_rows(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    store.set_watermarks({4: T0 + 2 * HOUR})
    store.set_watermarks({4: T0})  # would move back: ignored
    assert store.watermarks() == {4: T0 + 2 * HOUR}
    assert store.interval is None and store.schema() is None and store.read().num_rows == 0

    store.write(make_table([4], [2], [1.0], interval="1h"), watermarks={4: T0 + 3 * HOUR})
    assert store.interval == "1h"
    assert store.watermarks() == {4: T0 + 3 * HOUR}
    assert rows(store.read()) == [(4, T0 + 2 * HOUR, 1.0)]


def test_failed_replace_leaves_whole_files_and_unchanged_watermarks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = TelemetryStore(tmp_path)
    store.write(make_table([1, 1, 1], [0, 24, 48], [1.0, 2.0, 3.0]), watermarks={1: T0 + 49 * HOUR})
    update = make_table([1, 1, 1, 1], [0, 24, 48, 72], [10.0, 20.0, 30.0, 40.0])

    real_replace = os.replace
    calls: list[str] = []

    def replace_then_die(src, dst):
        if str(dst).endswith(".parquet"):
            calls.append(str(dst))
            if len(calls) == 2:
                raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", replace_then_die)
    with pytest.raises(OSError, match="disk gone"):
        store.write(update, watermarks={1: T0 + 73 * HOUR})
    monkeypatch.undo()

    assert hidden_temps(tmp_path) == []
    for f in tmp_path.glob("date=*/part-0.parquet"):
        pq.read_table(f)  # every file is whole
    assert store.watermarks() == {1: T0 + 49 * HOUR}
    assert [r[2] for r in rows(store.read())] == [10.0, 2.0, 3.0]  # first partition landed, rest did not

    store.write(update, watermarks={1: T0 + 73 * HOUR})
    assert rows(store.read()) == [
        (1, T0 + h * HOUR, v) for h, v in [(0, 10.0), (24, 20.0), (48, 30.0), (72, 40.0)]
    ]
    assert store.watermarks() == {1: T0 + 73 * HOUR}


MINUTES = 3 * 1440  # three days a minute apart per vehicle


def three_day_table(n: int, speed: np.ndarray) -> pa.Table:
    """``n`` rows, vehicle ``i // MINUTES`` at minute ``i % MINUTES`` from T0, over three daily partitions."""
    minute = np.arange(n) % MINUTES
    return pa.table(
        {
            "token_id": np.arange(n) // MINUTES,
            "timestamp": np.datetime64("2026-03-01T00:00", "us") + minute.astype("timedelta64[m]"),
            "speed": speed,
        },
        schema=telemetry_schema(["speed"], interval="1m"),
    )


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    from connectors.dimo import store as store_mod
    from tests.connectors.dimo.test_store import T0, three_day_table

    root, hang_at, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def hang():
        print("HANGING", flush=True)
        time.sleep(60)

    if hang_at == "stage":  # after the first temp file is written, before any replace
        real_write = store_mod.pq.write_table
        def write_table(*a, **k):
            real_write(*a, **k)
            hang()
        store_mod.pq.write_table = write_table
    else:  # right after the first partition file was replaced
        real_replace = os.replace
        def replace(src, dst):
            real_replace(src, dst)
            if str(dst).endswith(".parquet"):
                hang()
        store_mod.os.replace = replace

    table = three_day_table(n, np.arange(n, dtype="float64"))
    store_mod.TelemetryStore(root).write(table, watermarks={1: T0.replace(day=9)})
    print("DONE", flush=True)
    """
)


@pytest.mark.parametrize("hang_at", ["stage", "replace"])
def test_sigkill_mid_write_leaves_a_readable_dataset_that_a_rerun_completes(
    tmp_path: Path, hang_at: str
) -> None:
    n, n_base = 200_000, 5000
    store = TelemetryStore(tmp_path)
    store.write(three_day_table(n_base, np.full(n_base, -1.0)), watermarks={1: T0})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", _KILL_SCRIPT, str(tmp_path), hang_at, str(n)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "HANGING"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert hidden_temps(tmp_path), "the killed write should have left a temp file behind"
    for f in tmp_path.glob("date=*/part-0.parquet"):
        pq.read_table(f)  # every file is whole
    assert store.watermarks() == {1: T0}
    assert ds.dataset(tmp_path, partitioning="hive").to_table().num_rows >= n_base  # temps are ignored
    got = store.read()
    first_day = pc.less(got.column("timestamp"), pa.scalar(T0 + 24 * HOUR, TIMESTAMP_TYPE)).to_numpy()
    new_rows = got.column("speed").to_numpy() >= 0
    if hang_at == "replace":  # day 1 is the new write's, days 2-3 still the old data
        assert np.array_equal(new_rows, first_day)
        assert new_rows.sum() == np.count_nonzero(np.arange(n) % MINUTES < 1440)
    else:
        assert not new_rows.any() and got.num_rows == n_base

    rerun = store.write(three_day_table(n, np.arange(n, dtype="float64")), watermarks={1: T0.replace(day=9)})
    assert rerun.rows_added + rerun.rows_replaced == n
    assert hidden_temps(tmp_path) == []
    got = store.read()
    assert got.num_rows == n
    assert np.array_equal(got.column("speed").to_numpy(), np.arange(n, dtype="float64"))
    assert store.watermarks() == {1: T0.replace(day=9)}


def test_read_filters_columns_and_partition_pruning(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    store.write(
        make_table(
            [1, 2, 3, 1, 2, 1],
            [0, 0, 0, 24, 30, 49],
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            extra={"powertrainType": ["a", "b", "c", "d", "e", "f"]},
        )
    )
    got = store.read(token_ids=[1, 2], since=T0 + 24 * HOUR, until=T0 + 49 * HOUR)
    assert rows(got) == [(1, T0 + 24 * HOUR, "d", 4.0), (2, T0 + 30 * HOUR, "e", 5.0)]
    assert got.schema.field("timestamp").type == TIMESTAMP_TYPE
    assert "date" not in got.column_names

    only = store.read(columns=["powertrainType"], token_ids=[3])
    assert rows(only) == [(3, T0, "c")]
    assert only.schema.metadata[b"depin.interval"] == b"1h"
    with pytest.raises(ConfigError, match="not in the dataset"):
        store.read(columns=["date"])

    # Pruning: a corrupt partition outside [since, until) is never opened.
    (tmp_path / "date=2026-03-01" / "part-0.parquet").write_bytes(b"not parquet")
    assert store.read(since=T0 + 24 * HOUR).num_rows == 3
    with pytest.raises(pa.ArrowInvalid):
        store.read(until=T0 + 24 * HOUR)


def test_read_of_empty_store(tmp_path: Path) -> None:
    got = TelemetryStore(tmp_path / "none").read()
    assert got.num_rows == 0 and got.column_names == ["token_id", "timestamp"]


def test_summary_numbers(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    assert store.summary().rows == 0
    store.write(make_table([5, 6, 5, 6, 5], [0, 3, 24, 25, 70], [1.0, 2.0, 3.0, 4.0, 5.0]))
    s = store.summary()
    assert (s.rows, s.vehicles, s.partitions, s.interval) == (5, 2, 3, "1h")
    assert (s.first, s.last) == (T0, T0 + 70 * HOUR)
    assert s.columns == ["token_id", "timestamp", "speed"]
    assert s.bytes == sum(p.stat().st_size for p in tmp_path.glob("date=*/part-0.parquet")) > 0


def test_readable_by_pyarrow_dataset_and_polars(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    store.write(make_table([1, 2, 1], [0, 5, 26], [1.0, 2.0, 3.0]))
    table = ds.dataset(tmp_path, partitioning="hive").to_table()
    assert table.num_rows == 3
    assert sorted(table.column("speed").to_pylist()) == [1.0, 2.0, 3.0]
    assert sorted(map(str, table.column("date").to_pylist())) == ["2026-03-01", "2026-03-01", "2026-03-02"]

    df = pl.read_parquet(tmp_path / "**" / "*.parquet").sort("token_id", "timestamp")
    assert df["speed"].to_list() == [1.0, 3.0, 2.0]
    assert df.schema["timestamp"] == pl.Datetime("us", "UTC")

    pdf = pd.read_parquet(tmp_path).sort_values(["token_id", "timestamp"])
    assert pdf["speed"].tolist() == [1.0, 3.0, 2.0]


def test_million_row_write_timing(tmp_path: Path) -> None:
    """Prints timings (not asserted): 1,000,000 rows over 7 daily partitions, fresh and merged."""
    signals = [
        "speed",
        "powertrainTransmissionTravelledDistance",
        "powertrainType",
        "currentLocationCoordinates",
    ]
    schema = telemetry_schema(signals, interval="1m")
    vehicles, steps = 100, 10_000  # one row a minute: 10,000 minutes ~ 7 days
    rng = np.random.default_rng(0)
    n = vehicles * steps
    table = pa.table(
        {
            "token_id": np.repeat(np.arange(vehicles), steps),
            "timestamp": np.datetime64("2026-03-01", "us")
            + np.tile(np.arange(steps), vehicles).astype("timedelta64[m]"),
            "speed": rng.uniform(0, 130, n),
            "powertrainTransmissionTravelledDistance": np.cumsum(rng.uniform(0, 2, n)),
            "powertrainType": rng.choice(["COMBUSTION", "HYBRID", "BEV"], n),
            "latitude": rng.uniform(-90, 90, n),
            "longitude": rng.uniform(-180, 180, n),
        },
        schema=schema,
    )
    store = TelemetryStore(tmp_path)
    t = time.perf_counter()
    fresh = store.write(table)
    t_fresh = time.perf_counter() - t
    t = time.perf_counter()
    merged = store.write(table)
    t_merge = time.perf_counter() - t
    t = time.perf_counter()
    back = store.read()
    t_read = time.perf_counter() - t
    print(
        f"\n1M rows / {len(fresh.partitions)} partitions: write {t_fresh:.2f}s, "
        f"merge-rewrite {t_merge:.2f}s, read {t_read:.2f}s, {store.summary().bytes / 1e6:.1f} MB"
    )
    assert (fresh.rows_added, merged.rows_replaced, back.num_rows) == (n, n, n)
    assert len(fresh.partitions) == 7
