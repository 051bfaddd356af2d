"""Job inputs from a Delta table version: exactly that version's files, locally or copied from object storage."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from connectors.dimo.schema import telemetry_schema
from connectors.dimo.store import TelemetryStore
from depin_core.errors import ConfigError
from gpu_jobs import tables
from gpu_jobs.api import telemetry_ref
from gpu_jobs.errors import JobError
from gpu_jobs.spec import DatasetRef, JobKind, JobSpec, ModelSpec, Outputs
from tests.support.s3 import S3Server

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def _rows(token: int, hours: range) -> pa.Table:
    schema = telemetry_schema(["speed"], interval="1h")
    return pa.table(
        {"token_id": [token] * len(hours), "timestamp": [T0 + timedelta(hours=h) for h in hours],
         "speed": [float(h) for h in hours]},
        schema=schema,
    )  # fmt: skip


def _two_versions(where: str, opts: dict[str, str] | None = None) -> tuple[TelemetryStore, int, int]:
    store = TelemetryStore(where, storage_options=opts or {})
    v1 = store.append(_rows(1, range(30)), watermarks={1: T0 + timedelta(hours=30)}).version
    v2 = store.append(_rows(2, range(5)), watermarks={2: T0 + timedelta(hours=5)}).version
    assert v1 is not None and v2 is not None
    return store, v1, v2


def test_a_version_lists_only_its_files_and_ignores_others_in_the_directory(tmp_path: Path) -> None:
    store, v1, v2 = _two_versions(str(tmp_path / "t"))
    old = DatasetRef.from_table(tmp_path / "t", version=v1)
    new = DatasetRef.from_table(tmp_path / "t")
    assert (old.version, new.version) == (v1, v2) and old.table == new.table == str(tmp_path / "t")
    assert [f.path for f in old.files] == [f.path for f in store.version_files(v1)]
    assert set(f.path for f in old.files) < set(f.path for f in new.files)

    stray = tmp_path / "t" / "date=2026-03-01" / "part-orphan.zstd.parquet"  # e.g. a crashed writer's file
    stray.write_bytes(b"never committed")
    assert [str(p) for p in new.verify()] == [str(tmp_path / "t" / f.path) for f in new.files]
    assert DatasetRef.from_path(tmp_path / "t").files == new.files  # a table directory is read as a table

    DeltaTable(str(tmp_path / "t")).optimize.compact()  # rewrites the files: the old version keeps its own
    compacted = DatasetRef.from_table(tmp_path / "t")
    assert compacted.version is not None and compacted.version > v2
    day1 = {f.path for f in new.files if f.path.startswith("date=2026-03-01/")}
    assert len(day1) == 2 and not {f.path for f in compacted.files} & day1  # day 1's two files became one
    assert len(compacted.files) == len(new.files) - 1
    assert old.verify()  # still readable: nothing vacuumed yet


def test_content_not_location_makes_the_spec_hash(tmp_path: Path) -> None:
    _two_versions(str(tmp_path / "t"))
    ref = DatasetRef.from_table(tmp_path / "t")
    plain = ref.model_copy(update={"table": None, "version": None, "path": "/elsewhere"})

    def spec(r: DatasetRef) -> JobSpec:
        return JobSpec(
            kind=JobKind.TRAIN, model=ModelSpec(family="range"), inputs=[r], outputs=Outputs(dir="/o")
        )

    assert spec(ref).spec_hash == spec(plain).spec_hash
    changed = ref.model_copy(update={"files": ref.files[:1]})
    assert spec(changed).spec_hash != spec(ref).spec_hash


def test_a_changed_file_of_the_version_is_refused(tmp_path: Path) -> None:
    _two_versions(str(tmp_path / "t"))
    ref = DatasetRef.from_table(tmp_path / "t")
    (tmp_path / "t" / ref.files[0].path).write_bytes(b"tampered")
    with pytest.raises(JobError, match="changed"):
        ref.verify()


def test_unknown_version_and_versions_of_plain_folders_are_clear_errors(tmp_path: Path) -> None:
    _two_versions(str(tmp_path / "t"))
    with pytest.raises(ConfigError, match="cannot open version 99"):
        telemetry_ref(tmp_path / "t", version=99)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.parquet").write_bytes(b"")
    with pytest.raises(ConfigError, match="not a Delta table"):
        telemetry_ref(tmp_path / "plain", version=1)


def test_a_table_on_object_storage_is_copied_once_into_the_cache(s3_server: S3Server, tmp_path: Path) -> None:
    uri = f"s3://{s3_server.new_bucket()}/telemetry"
    opts = s3_server.storage_options
    store, v1, _ = _two_versions(uri, opts)
    ref = DatasetRef.from_table(uri, version=v1, storage_options=opts, cache_dir=tmp_path / "cache")
    assert ref.table == uri and ref.version == v1 and Path(ref.path).is_relative_to(tmp_path / "cache")
    files = ref.verify()
    got = pa.concat_tables([pa.parquet.read_table(f) for f in files])
    assert got.num_rows == store.read(version=v1).num_rows == 30
    before = {f: f.stat().st_mtime_ns for f in files}
    again = DatasetRef.from_table(uri, version=v1, storage_options=opts, cache_dir=tmp_path / "cache")
    assert (
        again == ref and {f: f.stat().st_mtime_ns for f in again.verify()} == before
    )  # not downloaded again
    assert tables.is_remote(uri) and tables.is_delta_table(uri, opts)
