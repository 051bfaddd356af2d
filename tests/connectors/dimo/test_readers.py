"""Third-party readers of the telemetry Delta table (pyarrow, polars, pandas, DuckDB) return exactly what
TelemetryStore.read() returns, on a local directory and on moto's S3 server: for a table written by appends
with a column added later, and for one written by the real ingest from the DIMO emulator."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from connectors.dimo.client import DimoClient
from connectors.dimo.emulator.server import EmulatorProcess
from connectors.dimo.ingest import ingest
from connectors.dimo.schema import telemetry_schema
from connectors.dimo.store import TelemetryStore
from tests.support.emulator_ingest import FIXED_END, MINUTE, fleet_config, settings_for
from tests.support.telemetry_tables import HOUR, T0, Where, where_for


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Where:
    return where_for(request, tmp_path)


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorProcess]:
    with EmulatorProcess(fleet_config(vehicles=3, days=1.0)) as emu:
        yield emu


def appended(store: TelemetryStore) -> None:
    """Three commits over two days; the third adds a column that the older files lack."""
    speed = telemetry_schema(["speed"], interval="1h")
    both = telemetry_schema(["speed", "exteriorAirTemperature"], interval="1h")
    store.append(pa.table({"token_id": [1, 1, 2], "timestamp": [T0, T0 + HOUR, T0], "speed": [1.0, None, 3.0]},
                          schema=speed))  # fmt: skip
    store.append(pa.table({"token_id": [3, 3], "timestamp": [T0 + 25 * HOUR, T0 + 2 * HOUR], "speed": [4.0, 5.0]},
                          schema=speed))  # fmt: skip
    store.append(
        pa.table(
            {
                "token_id": [2, 4],
                "timestamp": [T0 + 26 * HOUR, T0 + 3 * HOUR],
                "speed": [6.0, 7.0],
                "exteriorAirTemperature": [21.5, None],
            },
            schema=both,
        )
    )


def ingested(store: TelemetryStore, emu: EmulatorProcess) -> None:
    """Two ingest runs of the real client against the emulator (two windows, several commits)."""
    until = FIXED_END - HOUR

    async def go() -> None:
        async with DimoClient(settings_for(emu, rate_limit_per_s=0)) as client:
            for lo, hi in ((until - 3 * HOUR, until - HOUR), (until - HOUR, until)):
                await ingest(client, store, since=lo, until=hi, interval=MINUTE,
                             signals=["speed", "exteriorAirTemperature", "currentLocationCoordinates"])  # fmt: skip

    asyncio.run(go())


def key_sorted(table: pa.Table, like: pa.Schema) -> pa.Table:
    """``table`` with ``like``'s columns and types (no ``date``), sorted by (token_id, timestamp)."""
    table = table.select(like.names).cast(like.remove_metadata())
    return table.sort_by([("token_id", "ascending"), ("timestamp", "ascending")])


def check_readers(where: Where) -> pa.Table:
    """Every reader equals TelemetryStore.read(); returns that table."""
    store = where.store()
    want = store.read()
    assert want.num_rows > 0
    plain = want.schema.remove_metadata()
    want_plain = want.cast(plain)
    opts = where.options or None

    dataset = store.dataset()
    assert dataset is not None and "date" in dataset.schema.names
    assert key_sorted(dataset.to_table(), plain).equals(want_plain)
    dt = DeltaTable(where.uri, storage_options=opts)
    assert key_sorted(dt.to_pyarrow_dataset().to_table(), plain).equals(want_plain)

    frame = pl.scan_delta(where.uri, storage_options=opts).collect()
    assert "date" in frame.columns
    assert key_sorted(frame.to_arrow(), plain).equals(want_plain)

    pdf = dt.to_pandas()
    assert isinstance(pdf, pd.DataFrame)
    assert key_sorted(pa.Table.from_pandas(pdf, preserve_index=False), plain).equals(want_plain)

    con = duckdb.connect()
    try:
        con.register("telemetry", dt.to_pyarrow_dataset())
        cols = ", ".join(f'"{c}"' for c in plain.names)
        got = con.sql(f"SELECT {cols} FROM telemetry ORDER BY token_id, timestamp").to_arrow_table()
        assert key_sorted(got, plain).equals(want_plain)
        one = int(want.column("token_id")[0].as_py())
        count = con.execute("SELECT count(*) FROM telemetry WHERE token_id = ?", [one]).fetchone()
        assert count is not None and count[0] == store.read(token_ids=[one]).num_rows
    finally:
        con.close()

    one = int(want.column("token_id")[-1].as_py())
    picked = pl.scan_delta(where.uri, storage_options=opts).filter(pl.col("token_id") == one).collect()
    assert key_sorted(picked.to_arrow(), plain).equals(store.read(token_ids=[one]).cast(plain))
    return want


def test_readers_of_an_appended_table_with_a_later_column(where: Where) -> None:
    appended(where.store())
    want = check_readers(where)
    assert want.num_rows == 7 and want.column("exteriorAirTemperature").null_count == 6
    # IS NULL on a column added later: polars (and filtering after the scan) count the older files' rows
    nulls = pl.scan_delta(where.uri, storage_options=where.options or None).filter(
        pl.col("exteriorAirTemperature").is_null()
    )
    assert nulls.collect().height == 6


def test_readers_of_a_table_written_by_ingest(where: Where, emulator: EmulatorProcess) -> None:
    store = where.store()
    ingested(store, emulator)
    want = check_readers(where)
    assert set(want.column_names) >= {"speed", "exteriorAirTemperature", "latitude", "longitude"}
    version = store.version()
    assert len(pc.unique(want.column("token_id"))) == 3 and version is not None and version >= 2


_DELTA_SCAN = """
import json, pathlib, sys
import duckdb, duckdb_ext
ext = pathlib.Path(list(duckdb_ext.__path__)[0]) / "extensions"
con = duckdb.connect()
con.execute("SET autoinstall_known_extensions = false")  # never download: load the wheel's extension
con.execute("SET extension_directory = ?", [str(ext)])
con.execute("LOAD delta")
rows = con.execute(
    "SELECT token_id, count(*), count(speed), sum(speed) FROM delta_scan(?) GROUP BY 1 ORDER BY 1", [sys.argv[1]]
).fetchall()
print(json.dumps([[int(t), int(n), int(c), float(s or 0)] for t, n, c, s in rows]))
"""


def test_duckdb_delta_scan_reads_a_table_written_by_ingest(tmp_path: Path, emulator: EmulatorProcess) -> None:
    """DuckDB's delta extension (PyPI wheel ``duckdb-ext-delta``, DuckDB 1.4.4, in a venv of its own)."""
    import json
    import subprocess

    from tests.support.client_venvs import DUCKDB_DELTA, obtain

    python = obtain(DUCKDB_DELTA)
    store = TelemetryStore(tmp_path / "telemetry")
    ingested(store, emulator)
    out = subprocess.run(
        [str(python), "-c", _DELTA_SCAN, store.root], capture_output=True, text=True, timeout=300, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = store.read(columns=["speed"])
    expected = []
    for tok in sorted(set(want.column("token_id").to_pylist())):
        speed = want.filter(pc.equal(want.column("token_id"), tok)).column("speed")
        expected.append([tok, len(speed), len(speed) - speed.null_count, float(pc.sum(speed).as_py() or 0)])
    assert [g[:3] for g in got] == [e[:3] for e in expected] and len(got) == 3
    assert all(g[3] == pytest.approx(e[3], rel=1e-9) for g, e in zip(got, expected, strict=True))
