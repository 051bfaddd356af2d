"""Ingestion end to end: the real client over HTTP against emulator processes, into the Parquet store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from connectors.dimo.client import DimoClient
from connectors.dimo.emulator.server import EmulatorProcess
from connectors.dimo.ingest import ingest
from connectors.dimo.settings import DimoSettings
from connectors.dimo.store import TelemetryStore
from tests.support.emulator_ingest import FIXED_END, MINUTE, SIGNALS, fleet_config, run

pytestmark = pytest.mark.e2e


async def test_ingest_fleet_is_complete_typed_and_incremental(emulator, window, tmp_path) -> None:
    since, until = window
    report = await run(emulator, tmp_path, since, until)
    assert report.vehicles == 6 and report.skipped == []
    table = TelemetryStore(tmp_path).read()
    # every vehicle reports at least once a minute, so every bucket of the window is present
    assert table.num_rows == report.rows == 6 * 6 * 60
    assert table.schema.field("timestamp").type == pa.timestamp("us", tz="UTC")
    assert set(table.column_names) >= {"token_id", "timestamp", "speed", "latitude", "longitude"}
    ts = table.column("timestamp").cast(pa.int64()).to_numpy()
    assert (ts % 60_000_000 == 0).all()
    assert (
        pc.min(table.column("timestamp")).as_py() == since
        and pc.max(table.column("timestamp")).as_py() == until - MINUTE
    )
    assert pc.min(table.column("speed")).as_py() >= 0 and pc.max(table.column("speed")).as_py() < 250
    for tid in pc.unique(table.column("token_id")).to_pylist():
        odo = table.filter(pc.equal(table.column("token_id"), tid)).column(
            "powertrainTransmissionTravelledDistance"
        )
        values = odo.drop_null().to_numpy()
        assert (values[1:] >= values[:-1]).all(), "odometer must be monotonic"

    again = await run(emulator, tmp_path, since, until)  # nothing new: watermarks say done
    assert again.rows == 0 and again.up_to_date == 6
    wider = await run(emulator, tmp_path, since, until + timedelta(minutes=30))
    assert wider.rows == 6 * 30
    final = TelemetryStore(tmp_path).read()
    assert final.num_rows == 6 * 6 * 60 + 6 * 30
    keys = pa.table(
        {
            "k": pc.add(
                pc.multiply(final.column("token_id"), 10**13), final.column("timestamp").cast(pa.int64())
            )
        }
    )
    assert pc.count_distinct(keys.column("k")).as_py() == final.num_rows, "no duplicate (token_id, timestamp)"
    # readable by any Delta reader (here delta-rs' own Arrow dataset)
    assert DeltaTable(str(tmp_path)).to_pyarrow_dataset().count_rows() == final.num_rows


async def test_faults_at_20_percent_give_the_identical_dataset(emulator, window, tmp_path) -> None:
    since, until = window
    await run(emulator, tmp_path / "clean", since, until)
    with EmulatorProcess(fleet_config(faults="all=0.2,latency=0.05:20,retry_after=0,seed=5")) as faulty:
        report = await run(
            faulty, tmp_path / "faulty", since, until, max_retries=30, backoff_base_s=0.01, backoff_max_s=0.05
        )
    assert report.retries > 0, "faults were injected, so some requests must have been retried"
    clean = TelemetryStore(tmp_path / "clean").read()
    faulty_table = TelemetryStore(tmp_path / "faulty").read()
    assert faulty_table.num_rows == clean.num_rows > 0
    assert faulty_table.equals(clean)


async def test_rerun_over_an_overlapping_window_neither_duplicates_nor_drops(
    emulator, window, tmp_path
) -> None:
    since, until = window
    full = tmp_path / "full"
    await run(emulator, full, since, until)
    parts = tmp_path / "parts"
    await run(emulator, parts, since, until - timedelta(hours=2))
    # the second window overlaps the first: each vehicle resumes at its watermark (stored with its rows)
    second = await run(emulator, parts, since + timedelta(hours=1), until)
    assert 0 < second.rows < TelemetryStore(full).summary().rows
    assert TelemetryStore(parts).read().equals(TelemetryStore(full).read())


def test_cli_ingest_prints_json_last_line(emulator, window, tmp_path) -> None:
    since, until = window
    env = {**os.environ, "DEPIN_DIMO_RATE_LIMIT_PER_S": "0"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "ingest",
            "--since",
            since.isoformat(),
            "--until",
            until.isoformat(),
            "--interval",
            "5m",
            "--signals",
            "speed,exteriorAirTemperature",
            "--credentials",
            str(emulator.credentials_path),
            "--out",
            str(tmp_path / "cli"),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["vehicles"] == 6 and result["rows"] == 6 * 6 * 12
    assert result["requests"] >= 6 and result["dataset"] == str(tmp_path / "cli")
    assert {"retries", "seconds"} <= result.keys()


def test_cli_ingest_into_a_table_on_object_storage(emulator, window, s3_server, tmp_path) -> None:
    """``depin ingest --out s3://…`` with DEPIN_DATASET_S3_* settings (a local S3-compatible server)."""
    since, until = window
    uri = f"s3://{s3_server.new_bucket()}/telemetry"
    args = [sys.executable, "-m", "pipelines.cli", "ingest", "--since", since.isoformat(), "--until",
            until.isoformat(), "--interval", "5m", "--signals", "speed", "--credentials",
            str(emulator.credentials_path), "--out", uri, "--json"]  # fmt: skip
    env = {**os.environ, **s3_server.env, "DEPIN_DIMO_RATE_LIMIT_PER_S": "0"}
    for _ in range(2):  # the second run finds every vehicle at its watermark
        proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["dataset"] == uri and result["dataset_rows"] == 6 * 6 * 12
    assert result["rows"] == 0 and result["up_to_date"] == 6
    assert not list(tmp_path.iterdir())  # nothing written locally
    store = TelemetryStore(uri, storage_options=s3_server.storage_options)
    assert store.read().num_rows == 6 * 6 * 12 and len(store.watermarks()) == 6


@pytest.mark.parametrize("where", ["local", "s3"])
async def test_two_concurrent_ingest_processes_on_one_table_equal_one_run(
    emulator, window, tmp_path, request, where
) -> None:
    """Two ``depin ingest`` processes, each for half the fleet, write one table at the same time (a local
    directory, or a table on the S3-compatible test server, created by whichever starts first): both commit, and
    the table equals one run's."""
    since, until = window
    await run(emulator, tmp_path / "single", since, until)
    single = TelemetryStore(tmp_path / "single").read()
    ids = sorted(set(single.column("token_id").to_pylist()))
    env = {**os.environ, "DEPIN_DIMO_RATE_LIMIT_PER_S": "0"}
    opts: dict[str, str] = {}
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        uri, opts = f"s3://{server.new_bucket()}/telemetry", server.storage_options
        env.update(server.env)
    else:
        uri = str(tmp_path / "shared")
    common = ["--since", since.isoformat(), "--until", until.isoformat(), "--interval", "1m", "--signals",
              ",".join(SIGNALS), "--credentials", str(emulator.credentials_path), "--out", uri, "--json"]  # fmt: skip
    halves = [ids[: len(ids) // 2], ids[len(ids) // 2 :]]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipelines.cli",
                "ingest",
                "--vehicles",
                ",".join(map(str, half)),
                *common,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for half in halves
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    reports = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert [r["vehicles"] for r in reports] == [len(h) for h in halves]
    shared = TelemetryStore(uri, storage_options=opts)
    assert shared.read().equals(single)
    assert shared.watermarks() == TelemetryStore(tmp_path / "single").watermarks()


def test_cli_bad_input_is_a_clear_error(emulator, tmp_path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "ingest",
            "--interval",
            "1d",
            "--credentials",
            str(emulator.credentials_path),
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "interval" in proc.stderr and "24h" in proc.stderr


async def test_vehicles_lacking_privileges_are_skipped_or_trimmed_with_a_log_line(
    tmp_path, caplog, window
) -> None:
    since, until = window
    with EmulatorProcess(fleet_config(vehicles=8, restricted_fraction=0.5)) as emu:
        report = await run(emu, tmp_path, since, until)
    # half the restricted vehicles are not shared at all (not discovered); the other half lack location
    table = TelemetryStore(tmp_path).read()
    assert report.vehicles == pc.count_distinct(table.column("token_id")).as_py() < 8
    no_location = table.filter(pc.is_null(table.column("latitude")))
    assert no_location.num_rows > 0 and pc.count_distinct(no_location.column("token_id")).as_py() >= 1
    assert any("GetLocationHistory" in r.getMessage() for r in caplog.records)


async def test_ingest_under_dimo_rate_limit_with_idle_vehicles(tmp_path) -> None:
    """The production-like path: the emulator enforces DIMO's documented 10 requests/s per service and half the
    fleet went idle; the client runs its defaults (limiter 10/s, dataSummary planning) except max_concurrency 4
    (in flight + limiter burst must fit the server's one-second bucket: see emulator/ratelimit.py)."""
    config = fleet_config(idle_fraction=0.5, rate_limit_per_s=10, days=1.0)
    until = FIXED_END
    since = until - timedelta(days=1)
    with EmulatorProcess(config) as emu:
        reports = {}
        for use in (True, False):
            settings = DimoSettings.from_credentials_file(
                emu.credentials_path, max_concurrency=4, max_window=timedelta(hours=3), use_data_summary=use
            )
            assert settings.rate_limit_per_s == 10  # the default limiter
            async with DimoClient(settings) as client:
                reports[use] = await ingest(
                    client,
                    TelemetryStore(tmp_path / str(use)),
                    since=since,
                    until=until,
                    interval=MINUTE,
                    signals=SIGNALS,
                )
                assert client.stats.statuses[429] == 0 and client.stats.retries == 0
    planned, plain = reports[True], reports[False]
    assert planned.vehicles == plain.vehicles == 6 and planned.rows == plain.rows > 0
    assert planned.requests < plain.requests  # idle vehicles' empty windows were not asked for
    a = (
        TelemetryStore(tmp_path / "True")
        .read()
        .sort_by([("token_id", "ascending"), ("timestamp", "ascending")])
    )
    b = (
        TelemetryStore(tmp_path / "False")
        .read()
        .sort_by([("token_id", "ascending"), ("timestamp", "ascending")])
    )
    assert a.equals(b)
