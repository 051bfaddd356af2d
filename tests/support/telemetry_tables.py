"""Small telemetry Delta tables for the dataset tests: a location (local or moto S3), rows, a dataset of the
earlier Parquet layout."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from connectors.dimo import _delta
from connectors.dimo.schema import telemetry_schema
from connectors.dimo.store import TelemetryStore
from tests.support.s3 import S3Server

T0 = datetime(2026, 3, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)


@dataclass
class Where:
    uri: str
    options: dict[str, str] | None

    def store(self, **kw: object) -> TelemetryStore:
        return TelemetryStore(self.uri, storage_options=self.options, **kw)  # type: ignore[arg-type]


def where_for(request: pytest.FixtureRequest, tmp_path: Path) -> Where:
    """A fresh table location for a test parametrized with "local" / "s3"."""
    if request.param == "local":
        return Where(str(tmp_path / "telemetry"), None)
    server: S3Server = request.getfixturevalue("s3_server")
    return Where(request.getfixturevalue("s3_table_uri"), server.storage_options)


def make_table(tokens: list[int], hours: list[int], *, extra: bool = False) -> pa.Table:
    """Rows at T0 + hours[i] for tokens[i] ('speed'; with ``extra`` also 'exteriorAirTemperature')."""
    schema = telemetry_schema(["speed", *(["exteriorAirTemperature"] if extra else [])], interval="1h")
    data = {
        "token_id": tokens,
        "timestamp": [T0 + h * HOUR for h in hours],
        "speed": [float(h) for h in hours],
        "exteriorAirTemperature": [20.0 + t for t in tokens],
    }
    return pa.table({f.name: data[f.name] for f in schema}, schema=schema)


def fill(store: TelemetryStore, appends: int = 6) -> None:
    """``appends`` commits of one vehicle each over two days (one file per day per commit)."""
    for i in range(appends):
        tokens = [10 + i] * 4
        hours = [i, i + 6, 24 + i, 30 + i]
        store.append(make_table(tokens, hours), watermarks={tokens[0]: T0 + (31 + i) * HOUR})


def data_files(store: TelemetryStore) -> set[str]:
    """Every Parquet file under the table (table-relative), referenced or not."""
    fs = _delta.filesystem(store.location)
    infos = fs.get_file_info(pafs.FileSelector("", recursive=True))
    return {
        i.path.lstrip("/")
        for i in infos
        if i.type == pafs.FileType.File and i.path.endswith(".parquet") and "_delta_log" not in i.path
    }


def write_old_dataset(root: Path) -> pa.Table:
    """A dataset of the earlier layout, as its TelemetryStore wrote it: one sorted file per day with the
    dataset schema (a column added on the second day is null before), and ``_depin/state.json``."""
    schema = make_table([1], [0], extra=True).schema
    rows = pa.concat_tables(
        [
            make_table([1, 1, 2, 2], [0, 5, 1, 7], extra=True),
            make_table([1, 2, 2, 3], [30, 31, 40, 50], extra=True),
            make_table([3], [49], extra=True),
        ]
    )
    rows = sorted_rows(rows)
    day_of = pc.cast(rows.column("timestamp"), pa.date32())
    parts = []
    for day in sorted(set(day_of.to_pylist())):
        part = rows.filter(pc.equal(day_of, pa.scalar(day, pa.date32())))
        if day == T0.date():  # written before the column existed: all nulls
            part = part.set_column(3, schema.field(3), pa.nulls(part.num_rows, pa.float64()))
        (root / f"date={day.isoformat()}").mkdir(parents=True)
        pq.write_table(part, root / f"date={day.isoformat()}" / "part-0.parquet", compression="zstd")
        parts.append(part)
    state = {
        "format_version": 1,
        "schema_id": "dimo-telemetry/1",
        "interval": "1h",
        "columns": [{"name": f.name, "type": str(f.type)} for f in schema],
        "arrow_schema": base64.b64encode(schema.serialize().to_pybytes()).decode(),
        "watermarks": {
            "1": (T0 + 31 * HOUR).isoformat(),
            "2": (T0 + 51 * HOUR).isoformat(),
            "4": T0.isoformat(),
        },
        "uniform": True,
    }
    (root / "_depin").mkdir()
    (root / "_depin" / "state.json").write_text(json.dumps(state))
    return pa.concat_tables(parts)


def expected_marks() -> dict[int, datetime]:
    return {1: T0 + 31 * HOUR, 2: T0 + 51 * HOUR, 4: T0}


def sorted_rows(t: pa.Table) -> pa.Table:
    return t.sort_by([("token_id", "ascending"), ("timestamp", "ascending")])


def table_differences(got: TelemetryStore, want: TelemetryStore, rtol: float = 1e-12) -> list[str]:
    """What differs between two telemetry tables (empty: the same): schema, rows, keys and nulls exactly,
    watermarks exactly, float values to ``rtol``.

    A vehicle fetched twice (a shard killed and run again, or the same fleet ingested twice) gets its bucket
    means recomputed by the emulator, whose parallel aggregation (polars) may round the last bit differently
    between two requests of the same window (measured: 6 of 8,640 values, relative 1e-16); anything more is a
    real difference."""
    import numpy as np
    import pyarrow.types as pat

    a, b = sorted_rows(got.read()), sorted_rows(want.read())
    if not a.schema.equals(b.schema, check_metadata=False):
        return [f"schemas differ:\n{a.schema}\n!=\n{b.schema}"]
    if a.num_rows != b.num_rows:
        return [f"rows differ: {a.num_rows} vs {b.num_rows}"]
    out = []
    for name in b.column_names:
        x, y = a.column(name), b.column(name)
        if not pat.is_floating(y.type):
            if not x.equals(y):
                out.append(f"{name}: values differ")
            continue
        xs, ys = x.to_numpy(zero_copy_only=False), y.to_numpy(zero_copy_only=False)
        if not np.array_equal(np.isnan(xs), np.isnan(ys)):
            out.append(f"{name}: nulls differ")
        elif not np.allclose(xs, ys, rtol=rtol, atol=0.0, equal_nan=True):
            out.append(f"{name}: values differ beyond {rtol:g} relative")
    if got.watermarks() != want.watermarks():
        out.append("watermarks differ")
    return out
