"""``depin dataset info|optimize|vacuum|migrate``: the JSON line, human text on stderr, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from connectors.dimo.store import TelemetryStore
from pipelines.cli import app
from tests.support.s3 import S3Server
from tests.support.telemetry_tables import HOUR, T0, fill, make_table, write_old_dataset

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str) -> dict[str, Any]:
    res = CliRunner().invoke(app, ["dataset", *args, "--json"])
    assert res.exit_code == 0, (res.output, res.exception)
    return json.loads(res.stdout.strip().splitlines()[-1])


def depin(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "dataset", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(cwd)},
    )


def test_info_optimize_vacuum_print_one_json_line(tmp_path: Path) -> None:
    root = tmp_path / "telemetry"
    store = TelemetryStore(root)
    fill(store, appends=3)
    with pytest.raises(Exception, match="boom"):
        TelemetryStore(root, before_commit=lambda: (_ for _ in ()).throw(RuntimeError("boom"))).append(
            make_table([50], [1])
        )

    info = cli("info", str(root))
    assert set(info) == {"uri", "version", "versions", "rows", "vehicles", "first", "last", "files", "partitions",
                         "bytes", "columns", "interval", "watermarks", "watermark_min", "watermark_max",
                         "operations"}  # fmt: skip
    assert (info["uri"], info["rows"], info["vehicles"], info["files"], info["watermarks"]) == (
        str(root),
        12,
        3,
        6,
        3,
    )
    assert info["operations"][0] == {
        "version": 3,
        "timestamp": info["operations"][0]["timestamp"],
        "operation": "WRITE",
    }

    opt = cli("optimize", str(root))
    assert set(opt) == {"dataset", "version_before", "version_after", "files_before", "files_after",
                        "files_added", "files_removed", "partitions", "zorder"}  # fmt: skip
    assert (opt["files_before"], opt["files_after"], opt["version_after"]) == (6, 2, 4)

    dry = cli("vacuum", str(root), "--retention-hours", "0", "--force", "--dry-run", "--keep-version", "3")
    assert set(dry) == {
        "dataset",
        "dry_run",
        "full",
        "retention_hours",
        "keep_versions",
        "count",
        "files",
        "version",
    }
    assert (dry["dry_run"], dry["count"], dry["keep_versions"]) == (True, 1, [3])  # only the crash's orphan
    done = cli("vacuum", str(root), "--retention-hours", "0", "--force")
    assert done["count"] == 7 and dry["files"][0] in done["files"]  # + the 6 files optimize replaced
    assert TelemetryStore(root).read().num_rows == 12


def test_migrate_then_info_on_s3(
    tmp_path: Path, s3_server: S3Server, s3_table_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    old = tmp_path / "old"
    old.mkdir()
    write_old_dataset(old)
    doc = cli("migrate", str(old), s3_table_uri)
    assert set(doc) == {"source", "target", "days", "days_copied", "days_present", "rows", "rows_copied",
                        "watermarks", "watermarks_set", "version", "interval", "columns"}  # fmt: skip
    assert (doc["target"], doc["days_copied"], doc["rows_copied"], doc["watermarks_set"]) == (
        s3_table_uri,
        3,
        9,
        3,
    )
    again = cli("migrate", str(old), s3_table_uri)
    assert (again["days_copied"], again["days_present"], again["version"]) == (0, 3, doc["version"])
    info = cli("info", s3_table_uri)
    assert (info["uri"], info["rows"], info["watermarks"], info["interval"]) == (s3_table_uri, 9, 3, "1h")
    assert info["watermark_max"] == (T0 + 51 * HOUR).isoformat().replace("+00:00", "Z")


def test_errors_are_one_line_with_the_fix_and_exit_2(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    write_old_dataset(old)
    proc = depin("info", str(old), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert f"depin dataset migrate {old}" in proc.stderr and "Traceback" not in proc.stderr

    TelemetryStore(tmp_path / "t").append(make_table([1], [0]))
    proc = depin("vacuum", str(tmp_path / "t"), "--retention-hours", "1", cwd=tmp_path)
    assert proc.returncode == 2 and "retention_hours: 1 is below" in proc.stderr and "--force" in proc.stderr
    proc = depin("info", "gs://bucket/x", cwd=tmp_path)
    assert proc.returncode == 2 and "unsupported scheme 'gs'" in proc.stderr
