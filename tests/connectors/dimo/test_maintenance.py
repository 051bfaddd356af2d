"""Dataset maintenance (connectors.dimo.maintenance): optimize, vacuum, info and migration of the earlier
layout, on a local directory and on moto's S3 server."""

from __future__ import annotations

import functools
import json
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from connectors.dimo import _delta, maintenance
from connectors.dimo.store import TelemetryStore
from depin_core.errors import ConfigError, TransientError
from tests.support.telemetry_tables import (
    HOUR,
    T0,
    Where,
    data_files,
    expected_marks,
    fill,
    make_table,
    sorted_rows,
    where_for,
    write_old_dataset,
)


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Where:
    return where_for(request, tmp_path)


class Crash(Exception):
    pass


def crash() -> None:
    raise Crash("killed between staging and commit")


# ------------------------------------------------------------------------------------------- optimize


def test_optimize_compacts_keeps_rows_watermarks_and_time_travel_until_vacuum(where: Where) -> None:
    store = where.store()
    fill(store)
    rows, marks, v_before = store.read(), store.watermarks(), store.version()
    old_files = {f.path for f in store.version_files()}
    assert len(old_files) == 12 and v_before is not None

    res = maintenance.optimize(store)
    assert res["version_before"] == v_before and res["version_after"] == v_before + 1
    assert (res["files_before"], res["files_after"], res["files_removed"], res["partitions"]) == (
        12,
        2,
        12,
        2,
    )
    assert len(store.version_files()) == 2
    assert store.read().equals(rows, check_metadata=True)
    assert store.watermarks() == marks
    assert store.read(version=v_before).equals(rows)  # the old files are still there
    fs = _delta.filesystem(store.location)
    assert fs.get_file_info(f"_delta_log/{res['version_after']:020d}.checkpoint.parquet").is_file

    again = maintenance.optimize(store)  # nothing left to compact: no commit
    assert (again["version_after"], again["partitions"], again["files_added"]) == (v_before + 1, 0, 0)

    assert maintenance.vacuum(store) == []  # within the 7-day retention
    kept = maintenance.vacuum(store, retention_hours=0, force=True, keep_versions=[v_before])
    assert kept == [] and store.read(version=v_before).num_rows == rows.num_rows
    deleted = maintenance.vacuum(store, retention_hours=0, force=True)
    assert set(deleted) == old_files
    assert data_files(store) == {f.path for f in store.version_files()}
    assert store.read().equals(rows) and store.watermarks() == marks
    with pytest.raises(OSError):
        store.read(version=v_before)  # its files are gone


def test_optimize_without_zorder_compacts_only_crowded_days(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    store.append(make_table([1, 1], [0, 1]))
    store.append(make_table([2], [2]))
    store.append(make_table([2], [30]))  # day 2 holds one file: left alone
    res = maintenance.optimize(store, zorder=False, target_size=1 << 20)
    assert (res["files_before"], res["files_after"], res["partitions"], res["zorder"]) == (3, 2, 1, False)
    assert store.read().num_rows == 4
    with pytest.raises(ConfigError, match="target_size"):
        maintenance.optimize(store, target_size=0)


# --------------------------------------------------------------------------------------------- vacuum


def test_vacuum_lists_and_removes_exactly_the_files_of_a_crashed_write(where: Where) -> None:
    store = where.store()
    fill(store, appends=2)
    rows, version, before = store.read(), store.version(), data_files(store)
    with pytest.raises(Crash):
        where.store(before_commit=crash).append(
            make_table([77, 77], [3, 40]), watermarks={77: T0 + 41 * HOUR}
        )
    orphans = data_files(store) - before
    assert len(orphans) == 2 and store.version() == version and store.read().equals(rows)

    assert maintenance.vacuum(store, dry_run=True) == []  # younger than the retention
    assert maintenance.vacuum(store, retention_hours=0, force=True, full=False, dry_run=True) == []  # lite
    assert maintenance.vacuum(store, retention_hours=0, force=True, dry_run=True) == sorted(orphans)
    assert data_files(store) == before | orphans  # a dry run deletes nothing
    assert maintenance.vacuum(store, retention_hours=0, force=True) == sorted(orphans)
    assert data_files(store) == before
    assert store.read().equals(rows) and 77 not in store.watermarks()


def test_vacuum_refuses_a_short_retention_without_force(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path)
    fill(store, appends=1)
    with pytest.raises(ConfigError, match=r"retention_hours: 24 .*staged but not committed.*force"):
        maintenance.vacuum(store, retention_hours=24)
    with pytest.raises(ConfigError, match="negative"):
        maintenance.vacuum(store, retention_hours=-1, force=True)
    with pytest.raises(ConfigError, match=r"keep_versions: \[99\]"):
        maintenance.vacuum(store, keep_versions=[99])


def test_maintenance_of_a_location_without_a_table_names_the_fix(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "nothing")
    for call in (maintenance.info, maintenance.optimize, maintenance.vacuum):
        with pytest.raises(ConfigError, match="no Delta table; ingest into it first"):
            call(store)


# ----------------------------------------------------------------------------------------------- info


def test_info_numbers_equal_a_scan(where: Where) -> None:
    store = where.store()
    fill(store, appends=4)
    store.append(make_table([12], [50], extra=True), watermarks={12: T0 + 51 * HOUR})
    store.set_watermarks({99: T0 + 10 * HOUR})  # a vehicle whose window was empty
    doc = maintenance.info(store)

    scan = store.dataset().to_table()  # type: ignore[union-attr]
    files = store.version_files()
    fs = _delta.filesystem(store.location)
    assert doc.uri == where.uri and doc.version == store.version() and doc.versions == doc.version + 1
    assert doc.rows == scan.num_rows == 17
    assert doc.vehicles == len(pc.unique(scan.column("token_id"))) == 4
    assert doc.first == pc.min(scan.column("timestamp")).as_py()
    assert doc.last == pc.max(scan.column("timestamp")).as_py()
    assert doc.files == len(files) and doc.partitions == len(pc.unique(scan.column("date"))) == 3
    assert doc.bytes == sum(fs.get_file_info(f.path).size for f in files)
    assert doc.columns == ["token_id", "timestamp", "speed", "exteriorAirTemperature"]
    assert doc.interval == "1h"
    marks = store.watermarks()
    assert doc.watermarks == len(marks) == 5
    assert (doc.watermark_min, doc.watermark_max) == (T0 + 10 * HOUR, T0 + 51 * HOUR)
    assert [op.operation for op in doc.operations[:2]] == ["WRITE", "WRITE"]
    assert doc.operations[0].version == doc.version and doc.operations[-1].operation == "CREATE TABLE"
    json.loads(doc.model_dump_json())  # JSON-ready


# -------------------------------------------------------------------------------------------- migrate


def test_migrate_copies_rows_schema_and_watermarks_and_a_rerun_is_a_no_op(
    where: Where, tmp_path: Path
) -> None:
    old = tmp_path / "old"
    old.mkdir()
    old_rows = write_old_dataset(old)
    with pytest.raises(ConfigError, match="depin dataset migrate"):
        TelemetryStore(old).read()

    rep = maintenance.migrate(old, where.uri, storage_options=where.options)
    assert (rep.days, rep.days_copied, rep.days_present, rep.rows, rep.rows_copied) == (3, 3, 0, 9, 9)
    assert (rep.watermarks, rep.watermarks_set, rep.interval) == (3, 3, "1h")
    new = where.store()
    got = new.read()
    assert got.equals(sorted_rows(old_rows.cast(got.schema)))
    assert got.schema.field("timestamp").type == pa.timestamp("us", tz="UTC")
    assert new.schema() == old_rows.schema.with_metadata(
        {"depin.schema": "dimo-telemetry/1", "depin.interval": "1h"}
    )
    assert new.schema().field("exteriorAirTemperature").metadata == {b"unit": b"celsius", b"agg": b"AVG"}  # type: ignore[union-attr]
    assert new.watermarks() == expected_marks()
    version = new.version()

    again = maintenance.migrate(old, where.uri, storage_options=where.options)
    assert (again.days_copied, again.days_present, again.rows_copied, again.watermarks_set) == (0, 3, 0, 0)
    assert new.version() == again.version == version
    assert new.read().equals(got)
    assert (old / "_depin" / "state.json").is_file()  # the old dataset is only read


def test_migrate_resumes_after_a_crash_without_duplicates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, target = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    old_rows = write_old_dataset(old)
    commits = []

    def crash_on_second_day() -> None:
        commits.append(1)
        if len(commits) == 2:
            crash()

    monkeypatch.setattr(
        maintenance, "TelemetryStore", functools.partial(TelemetryStore, before_commit=crash_on_second_day)
    )
    with pytest.raises(Crash):
        maintenance.migrate(old, target)
    monkeypatch.undo()
    assert TelemetryStore(target).read().num_rows == 4 and TelemetryStore(target).watermarks() == {}

    rep = maintenance.migrate(old, target)
    assert (rep.days_present, rep.days_copied, rep.rows_copied) == (1, 2, 5)
    new = TelemetryStore(target)
    assert new.read().equals(sorted_rows(old_rows.cast(new.read().schema)))
    assert new.watermarks() == expected_marks()
    assert len(maintenance.vacuum(new, retention_hours=0, force=True)) == 1  # the crashed day's staged file


def test_migrate_refuses_foreign_data_and_wrong_sources(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    write_old_dataset(old)
    used = TelemetryStore(tmp_path / "used")
    used.append(make_table([1], [0], extra=True))
    with pytest.raises(ConfigError, match="already holds rows that are not from"):
        maintenance.migrate(old, used.root)
    marked = TelemetryStore(tmp_path / "marked")
    marked.set_watermarks({1: T0 + 100 * HOUR})
    with pytest.raises(ConfigError, match="watermark for vehicle 1"):
        maintenance.migrate(old, marked.root)
    with pytest.raises(ConfigError, match="already a Delta table"):
        maintenance.migrate(used.root, tmp_path / "x")
    with pytest.raises(ConfigError, match="not a dataset of the earlier layout"):
        maintenance.migrate(tmp_path / "empty", tmp_path / "x")
    with pytest.raises(ConfigError, match=r"is the old dataset .* or inside it"):
        maintenance.migrate(old, old / "delta")


def test_an_unreachable_object_store_is_a_one_line_transient_error() -> None:
    with socket.socket() as sock:  # a loopback port that nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ALLOW_HTTP": "true",
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
    }
    with pytest.raises(TransientError) as err:
        maintenance.info(TelemetryStore("s3://bucket/telemetry", storage_options=options))
    text = str(err.value)
    assert text.startswith("dataset s3://bucket/telemetry: ") and "\n" not in text and "\x1b" not in text
    assert "DEPIN_DATASET_S3_ENDPOINT_URL" in text and "refused" in text.lower()
