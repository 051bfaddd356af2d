"""TelemetryStore: the Delta table's appends, watermarks, schema merge, reads, and crash and concurrency safety.

The crash and concurrency tests run on a local directory and on a local S3-compatible server (moto).
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from connectors.dimo import _delta
from connectors.dimo.schema import TIMESTAMP_TYPE, telemetry_schema
from connectors.dimo.store import TelemetryStore
from depin_core.errors import ConfigError
from tests.support.s3 import S3Server
from tests.support.store_writer import DAY_END, MINUTES, VEHICLES_PER_COMMIT, vehicle_rows, write_vehicles

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
    data = {"token_id": tokens, "timestamp": [T0 + h * HOUR for h in hours], "speed": speed, **extra}
    return pa.table({f.name: data[f.name] for f in schema}, schema=schema)


def rows(table: pa.Table) -> list[tuple]:
    return list(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))


def test_append_with_watermarks_is_exactly_once(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    t = make_table([7, 7, 3, 3], [0, 30, 1, 25], [10.0, 20.0, None, 40.0])
    marks = {7: T0 + 31 * HOUR, 3: T0 + 26 * HOUR}
    first = store.append(t, watermarks=marks)
    assert (first.rows_in, first.rows_added, first.rows_skipped) == (4, 4, 0)
    assert first.partitions == ["date=2026-03-01", "date=2026-03-02"]
    assert first.version == store.version() == 1  # 0 created the table
    before = store.read()

    second = store.append(t, watermarks=marks)  # a retried write: every row is behind its watermark
    assert (second.rows_added, second.rows_skipped, second.version) == (0, 4, None)
    assert store.version() == 1
    assert store.read().equals(before)
    assert rows(before) == [
        (3, T0 + 1 * HOUR, None),
        (3, T0 + 25 * HOUR, 40.0),
        (7, T0, 10.0),
        (7, T0 + 30 * HOUR, 20.0),
    ]


def test_rows_behind_the_watermark_are_dropped_the_rest_appended(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    store.append(make_table([1, 1, 2], [0, 1, 0], [1.0, 2.0, 9.0]), watermarks={1: T0 + 2 * HOUR})
    res = store.append(make_table([1, 1, 2], [1, 2, 1], [20.0, 30.0, 10.0]), watermarks={1: T0 + 3 * HOUR})
    assert (res.rows_added, res.rows_skipped) == (2, 1)  # vehicle 2 has no watermark: appended as given
    assert rows(store.read()) == [
        (1, T0, 1.0),
        (1, T0 + HOUR, 2.0),
        (1, T0 + 2 * HOUR, 30.0),
        (2, T0, 9.0),
        (2, T0 + HOUR, 10.0),
    ]


def test_duplicates_within_one_table_keep_the_last_row(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    res = store.append(make_table([1, 1, 1], [0, 0, 1], [1.0, 2.0, 3.0]))
    assert (res.rows_in, res.rows_added, res.rows_skipped) == (3, 2, 0)
    assert rows(store.read()) == [(1, T0, 2.0), (1, T0 + HOUR, 3.0)]


def test_a_write_adds_files_and_never_rewrites_old_ones(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    store.append(make_table([1, 2], [0, 0], [1.0, 2.0]))
    old = {f.path: f.size for f in store.version_files()}
    store.append(make_table([3], [1], [3.0]))
    new = {f.path: f.size for f in store.version_files()}
    assert set(old) < set(new) and all(new[p] == s for p, s in old.items())
    assert len(new) == 2


def test_schema_merge_adds_a_column_without_rewriting_old_files(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    store.append(make_table([1, 1], [0, 1], [1.0, 2.0]))
    old_files = {f.path: pq.read_schema(tmp_path / f.path).names for f in store.version_files()}
    store.append(make_table([2], [0], [5.0], extra={"powertrainType": ["ELECTRIC"]}))

    schema = store.schema()
    assert schema is not None and schema.names == ["token_id", "timestamp", "speed", "powertrainType"]
    assert schema.field("powertrainType").metadata[b"agg"]  # unit/agg metadata kept as column metadata
    for path, names in old_files.items():  # untouched: same file, still without the new column
        assert pq.read_schema(tmp_path / path).names == names
    assert rows(store.read()) == [(1, T0, 1.0, None), (1, T0 + HOUR, 2.0, None), (2, T0, 5.0, "ELECTRIC")]
    ops = [h["operation"] for h in DeltaTable(str(tmp_path)).history()]
    assert "ADD COLUMN" in ops


def test_type_conflict_is_refused(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    store.append(make_table([1], [0], [1.0]))
    bad = make_table([1], [1], [1.0]).set_column(2, "speed", pa.array(["fast"]))
    with pytest.raises(ConfigError, match=r"'speed' is double in the dataset .* but string"):
        store.append(bad)


def test_aggregation_conflict_is_refused(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    store.append(make_table([1], [0], [1.0]))
    t = make_table([1], [1], [2.0])
    f = t.schema.field("speed").with_metadata({"unit": "km/h", "agg": "MAX"})
    with pytest.raises(ConfigError, match=r"AVG aggregates .* but MAX"):
        store.append(t.cast(t.schema.set(2, f)))


def test_interval_mismatch_is_refused(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    store.append(make_table([1], [0], [1.0], interval="1h"))
    with pytest.raises(ConfigError, match=r"interval 1m0s .* holds interval 1h"):
        store.append(make_table([1], [1], [1.0], interval="1m0s"))
    store.ensure(interval="1h")
    with pytest.raises(ConfigError, match="holds 1h buckets, not 5m"):
        store.ensure(interval="5m")


def test_invalid_table_is_refused(tmp_path: Path) -> None:
    bad = pa.table({"token_id": [1], "timestamp": pa.array([1], pa.int64())})
    with pytest.raises(ConfigError, match="'timestamp' has type int64"):
        TelemetryStore(tmp_path).append(bad)


def test_watermarks_are_monotonic_and_persisted(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    store.append(make_table([1], [0], [1.0]), watermarks={1: T0 + 5 * HOUR})
    store.set_watermarks({1: T0 + HOUR, 2: T0 + 2 * HOUR})  # 1 would move back: kept
    assert store.watermarks() == {1: T0 + 5 * HOUR, 2: T0 + 2 * HOUR}
    again = TelemetryStore(tmp_path)  # a new process sees the same marks (they live in the table's log)
    assert again.watermarks() == {1: T0 + 5 * HOUR, 2: T0 + 2 * HOUR}
    assert again.watermark(2) == T0 + 2 * HOUR and again.watermark(3) is None
    assert again.watermarks([2, 3]) == {2: T0 + 2 * HOUR}


def test_set_watermarks_before_any_rows(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    store.set_watermarks({4: T0 + 3 * HOUR})
    assert store.watermarks() == {4: T0 + 3 * HOUR}
    store.append(make_table([4, 4], [2, 3], [0.5, 1.0]), watermarks={4: T0 + 4 * HOUR})
    assert store.watermarks() == {4: T0 + 4 * HOUR}
    assert rows(store.read()) == [(4, T0 + 3 * HOUR, 1.0)]  # hour 2 was behind the watermark


def test_watermarks_read_in_one_pass_equal_delta_rs_answers(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    for i in range(12):
        store.append(make_table([i, i + 100], [i, i], [1.0, 2.0]), watermarks={i: T0 + (i + 1) * HOUR})
        if i == 7:
            DeltaTable(str(tmp_path)).create_checkpoint()  # later reads start from the checkpoint
    dt = DeltaTable(str(tmp_path))
    expected = {i: T0 + (i + 1) * HOUR for i in range(12)}
    assert TelemetryStore(tmp_path).watermarks() == expected
    for i, mark in expected.items():
        us = dt.transaction_version(f"depin-ingest:{i}")
        assert us is not None and T0 + (us - int((T0.timestamp()) * 1e6)) * timedelta(microseconds=1) == mark
    assert _delta.app_transactions(store.location, dt.version(), "depin-ingest:") is not None


def test_read_filters_columns_days_and_versions(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    store.append(
        make_table(
            [1, 2, 3, 1, 2, 1],
            [0, 0, 0, 24, 30, 49],
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            extra={"powertrainType": ["a", "b", "c", "d", "e", "f"]},
        )
    )
    v1 = store.version()
    store.append(make_table([9], [50], [9.0], extra={"powertrainType": ["z"]}))
    got = store.read(token_ids=[1, 2], since=T0 + 24 * HOUR, until=T0 + 49 * HOUR)
    assert rows(got) == [(1, T0 + 24 * HOUR, "d", 4.0), (2, T0 + 30 * HOUR, "e", 5.0)]
    assert got.schema.field("timestamp").type == TIMESTAMP_TYPE
    assert "date" not in got.column_names

    only = store.read(columns=["powertrainType"], token_ids=[3])
    assert rows(only) == [(3, T0, "c")]
    assert only.schema.metadata[b"depin.interval"] == b"1h"
    with pytest.raises(ConfigError, match="not in the dataset"):
        store.read(columns=["date"])
    assert store.read(version=v1).num_rows == 6 and store.read().num_rows == 7  # time travel

    # Day pruning: a corrupt file of a day outside [since, until) is never opened.
    first_day = next(f.path for f in store.version_files() if f.path.startswith("date=2026-03-01"))
    (tmp_path / first_day).write_bytes(b"not parquet")
    assert store.read(since=T0 + 24 * HOUR).num_rows == 4
    with pytest.raises(pa.ArrowInvalid):
        store.read(until=T0 + 24 * HOUR)


def test_read_of_a_missing_table(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "none")
    got = store.read()
    assert got.num_rows == 0 and got.column_names == ["token_id", "timestamp"]
    assert (store.exists(), store.version(), store.watermarks()) == (False, None, {})


def test_summary_numbers_come_from_the_log(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    assert store.summary().rows == 0
    store.append(make_table([5, 6, 5, 6, 5], [0, 3, 24, 25, 70], [1.0, 2.0, 3.0, 4.0, 5.0]))
    s = store.summary()
    assert (s.rows, s.vehicles, s.partitions, s.files, s.interval) == (5, 2, 3, 3, "1h")
    assert (s.first, s.last) == (T0, T0 + 70 * HOUR)
    assert s.columns == ["token_id", "timestamp", "speed"]
    assert s.bytes == sum(f.size for f in store.version_files()) > 0
    assert s.version == store.version()


def test_old_parquet_layout_is_refused_with_the_migration_command(tmp_path: Path) -> None:
    (tmp_path / "_depin").mkdir()
    (tmp_path / "_depin" / "state.json").write_text("{}")
    with pytest.raises(ConfigError, match="depin dataset migrate"):
        TelemetryStore(tmp_path).watermarks()


# ------------------------------------------------------------------ crashes and concurrent writers


@pytest.fixture(params=["local", "s3"])
def table(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, str], dict[str, str]]:
    """(table URI, storage options, env for child writers) on a local directory or the test S3 server."""
    if request.param == "local":
        return str(tmp_path / "telemetry"), {}, {}
    server: S3Server = request.getfixturevalue("s3_server")
    return f"s3://{server.new_bucket()}/telemetry", server.storage_options, server.env


def _writer(
    uri: str, env: dict[str, str], mode: str, first: int, count: int, *barrier: str
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.support.store_writer", uri, mode, str(first), str(count), *barrier]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, **env, "PYTHONPATH": str(REPO)}
    )


def _clean_run(tmp_path: Path, first: int, count: int) -> pa.Table:
    clean = TelemetryStore(tmp_path / "clean")
    write_vehicles(clean, first, count)
    return clean.read()


def _data_files(store: TelemetryStore) -> set[str]:
    fs = _delta.filesystem(store.location)
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector("", recursive=True))
    return {i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
            and not i.path.startswith("_delta_log")}  # fmt: skip


@pytest.mark.parametrize("mode", ["crash-before-commit", "crash-after-commit"])
def test_a_crash_around_the_commit_then_a_rerun_equals_a_clean_run(
    table: tuple[str, dict[str, str], dict[str, str]], tmp_path: Path, mode: str
) -> None:
    uri, opts, env = table
    n = 3 * VEHICLES_PER_COMMIT
    proc = _writer(uri, env, mode, 1, n)
    proc.communicate(timeout=120)
    assert proc.returncode == 9

    store = TelemetryStore(uri, storage_options=opts)
    committed = 2 if mode == "crash-after-commit" else 1
    assert store.read().num_rows == committed * VEHICLES_PER_COMMIT * MINUTES
    assert set(store.watermarks()) == set(range(1, 1 + committed * VEHICLES_PER_COMMIT))
    referenced = {f.path for f in store.version_files()}
    orphans = _data_files(store) - referenced
    assert len(orphans) == (1 if mode == "crash-before-commit" else 0)  # staged, never committed

    rerun = _writer(uri, env, "write", 1, n)
    assert rerun.communicate(timeout=120)[0].strip() == "DONE"
    after = TelemetryStore(uri, storage_options=opts)
    assert after.read().equals(_clean_run(tmp_path, 1, n))
    assert after.watermarks() == dict.fromkeys(range(1, n + 1), DAY_END)
    again = after.version()
    rerun = _writer(uri, env, "write", 1, n)  # a third run has nothing to do
    assert rerun.communicate(timeout=120)[0].strip() == "DONE"
    assert TelemetryStore(uri, storage_options=opts).version() == again

    if orphans:  # only a full vacuum finds files that no commit ever referenced
        dt = DeltaTable(uri, storage_options=opts or None)
        lite = dt.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=True)
        full = dt.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False, full=True)
        assert not set(lite) & orphans and orphans <= set(full)
        assert not _data_files(after) & orphans
        assert after.read().num_rows == n * MINUTES


def test_sigkill_while_staging_leaves_the_table_unchanged(tmp_path: Path) -> None:
    uri = str(tmp_path / "telemetry")
    proc = _writer(uri, {}, "hang-in-stage", 1, 2 * VEHICLES_PER_COMMIT)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "HANGING"
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    store = TelemetryStore(uri)
    assert store.read().num_rows == VEHICLES_PER_COMMIT * MINUTES  # only the first commit
    _writer(uri, {}, "write", 1, 2 * VEHICLES_PER_COMMIT).communicate(timeout=120)
    assert TelemetryStore(uri).read().equals(_clean_run(tmp_path, 1, 2 * VEHICLES_PER_COMMIT))


@pytest.mark.parametrize("overlap", [False, True], ids=["disjoint", "overlapping"])
def test_two_concurrent_writers_both_commit_and_equal_one_run(
    table: tuple[str, dict[str, str], dict[str, str]], tmp_path: Path, overlap: bool
) -> None:
    uri, opts, env = table
    n = 4 * VEHICLES_PER_COMMIT
    TelemetryStore(uri, storage_options=opts).ensure(interval="1m0s")  # both writers open an existing table
    barrier = tmp_path / "go"
    # Disjoint: vehicles 1-12 and 13-24. Overlapping: both write 1-12 (the same watermarks race).
    second_first = 1 if overlap else n + 1
    procs = [
        _writer(uri, env, "write", 1, n, str(barrier)),
        _writer(uri, env, "write", second_first, n, str(barrier)),
    ]
    barrier.touch()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    total = n if overlap else 2 * n
    store = TelemetryStore(uri, storage_options=opts)
    assert store.read().equals(_clean_run(tmp_path, 1, total))
    assert store.watermarks() == dict.fromkeys(range(1, total + 1), DAY_END)


def test_writers_starting_together_on_a_new_table_all_commit(
    table: tuple[str, dict[str, str], dict[str, str]], tmp_path: Path
) -> None:
    """Shards of one ingest on a dataset that does not exist yet: each writer creates the table, one creation
    wins and the others write into its table (delta-rs answers the losers "protocol changed")."""
    uri, opts, env = table
    n, writers = VEHICLES_PER_COMMIT, 4
    barrier = tmp_path / "go"
    procs = [_writer(uri, env, "write", 1 + i * n, n, str(barrier)) for i in range(writers)]
    barrier.touch()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * writers, outs
    store = TelemetryStore(uri, storage_options=opts)
    assert store.read().equals(_clean_run(tmp_path, 1, writers * n))
    assert store.watermarks() == dict.fromkeys(range(1, writers * n + 1), DAY_END)


def test_a_lost_creation_race_writes_into_the_winners_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic form of the race above: the other writer's version 0 lands just before ours."""
    from deltalake.exceptions import CommitFailedError

    real_create = DeltaTable.create

    def lose_the_race(uri: str, schema: pa.Schema, **kw: object) -> None:
        real_create(uri, schema, **kw)  # type: ignore[arg-type]  # the winner's commit
        raise CommitFailedError("Failed to commit transaction: Protocol changed since last commit")

    monkeypatch.setattr("connectors.dimo.store.DeltaTable.create", lose_the_race)
    store = TelemetryStore(tmp_path / "telemetry")
    write_vehicles(store, 1, VEHICLES_PER_COMMIT)
    monkeypatch.undo()
    assert TelemetryStore(tmp_path / "telemetry").read().equals(_clean_run(tmp_path, 1, VEHICLES_PER_COMMIT))


def test_vehicle_rows_helper_is_a_valid_contract_table() -> None:
    t = vehicle_rows([1, 2])
    assert t.num_rows == 2 * MINUTES and t.schema.metadata[b"depin.interval"] == b"1m0s"
