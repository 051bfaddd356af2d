"""`depin train` and `depin score` as a user runs them: real dataset, subprocess jobs, JSON last lines."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gpu_jobs.artifacts import load_artifact
from tests.support.fleet_data import FleetData, build_fleet_data

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def small_fleet(tmp_path_factory: pytest.TempPathFactory) -> FleetData:
    return build_fleet_data(tmp_path_factory.mktemp("fleet"), vehicles=12, days=3, seed=7)


def depin(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


def depin_on_terminal(*args: str, cwd: Path, columns: int) -> tuple[int, str]:
    """Run ``depin`` with stderr on a pseudo-terminal ``columns`` wide; its exit code and stderr text
    (colours stripped, newlines normalised)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    chunks: list[bytes] = []
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=slave,
            cwd=cwd,
            env=env,
        )
        os.close(slave)
        slave = -1
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal's last writer
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=300)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    text = b"".join(chunks).decode().replace("\r\n", "\n")
    return code, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def last_json(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_train_and_score_both_families(small_fleet: FleetData, tmp_path: Path) -> None:
    for family, expected in (
        ("range", {"mae", "baseline_mae"}),
        ("anomaly", {"recall", "false_positive_rate"}),
    ):
        model_dir = tmp_path / f"{family}-model"
        trained = last_json(
            depin(
                "train",
                "--dataset",
                str(small_fleet.telemetry),
                "--model",
                family,
                "--out",
                str(model_dir),
                "--ground-truth",
                str(small_fleet.truth),
                "--json",
                cwd=tmp_path,
            )
        )
        assert trained["state"] == "SUCCEEDED" and trained["device"].startswith(("cpu", "cuda"))
        assert expected <= trained["metrics"].keys(), trained["metrics"]
        assert trained["artifact"] == str(model_dir)
        art = load_artifact(model_dir)  # every sha256 verified
        assert art.manifest["spec_hash"] == trained["spec_hash"]

        scores = tmp_path / f"{family}.parquet"
        scored = last_json(
            depin(
                "score",
                "--model",
                str(model_dir),
                "--dataset",
                str(small_fleet.telemetry),
                "--out",
                str(scores),
                "--json",
                cwd=tmp_path,
            )
        )
        assert scored["output"] == str(scores) and scored["family"] == family
        assert scored["rows"] == pq.read_metadata(scores).num_rows > 0
        assert not (tmp_path / f".{scores.name}.job").exists()  # staging directory cleaned up


def test_bad_input_is_a_clear_error(small_fleet: FleetData, tmp_path: Path) -> None:
    proc = depin(
        "train",
        "--dataset",
        str(small_fleet.telemetry),
        "--model",
        "gpt",
        "--out",
        str(tmp_path / "m"),
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "--model 'gpt': choose one of anomaly, charging, range" in proc.stderr
    proc = depin(
        "score",
        "--model",
        str(tmp_path),
        "--dataset",
        str(small_fleet.telemetry),
        "--out",
        str(tmp_path / "s.parquet"),
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "not a model artifact" in proc.stderr


def test_score_refuses_a_foreign_model_directory(small_fleet: FleetData, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus-model"
    bogus.mkdir()
    for content, message in (
        ('{"family": "gpt"}', "model.json names family 'gpt'"),
        ("{not json", "model.json is not a JSON object"),
    ):
        (bogus / "model.json").write_text(content)
        proc = depin(
            "score",
            "--model",
            str(bogus),
            "--dataset",
            str(small_fleet.telemetry),
            "--out",
            str(tmp_path / "s.parquet"),
            cwd=tmp_path,
        )
        assert proc.returncode == 2 and message in proc.stderr


def test_errors_print_on_one_line_verbatim_at_any_width(tmp_path: Path) -> None:
    # a long path holding text that rich would read as markup ("[/x]" alone makes rich raise)
    odd = tmp_path / ("a-rather-long-directory-name-" * 6) / "[default] [bold]not bold[/bold] [/x]"
    odd.mkdir(parents=True)
    args = ("score", "--model", str(odd), "--dataset", str(tmp_path), "--out", str(tmp_path / "s.parquet"))
    expected = f"error: --model {odd}: not a model artifact (no model.json); train one with `depin train`"
    assert len(expected) > 200

    piped = depin(*args, cwd=tmp_path, env={**os.environ, "COLUMNS": "40"})  # stderr not a terminal
    code, on_terminal = depin_on_terminal(*args, cwd=tmp_path, columns=40)
    for rc, stderr in ((piped.returncode, piped.stderr), (code, on_terminal)):
        assert rc == 2, stderr
        assert [line for line in stderr.splitlines() if "error" in line] == [expected], stderr


def test_json_last_line_is_never_wrapped(tmp_path: Path) -> None:
    proc = depin("signals", "--json", cwd=tmp_path, env={**os.environ, "COLUMNS": "40"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and len(lines[0]) > 1000
    assert len(json.loads(lines[0])["signals"]) > 20


def test_human_lines_print_verbatim_unwrapped(capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.cli._output import error, say

    path = "/x/" + "deep-folder/" * 20 + "[default]/[/x]/:smile:/[bold]"
    say("published ", ("fn@3", "bold"), f" to {path}")
    error(f"--out {path}: [red]exists[/red]")
    assert capsys.readouterr().err.splitlines() == [
        f"published fn@3 to {path}",
        f"error: --out {path}: [red]exists[/red]",
    ]


def test_usage_errors_print_on_one_line(tmp_path: Path) -> None:
    """Errors found while parsing flags (typer's, not ours) print on one line too, at any width."""
    option = "--" + "a-rather-long-misspelled-option-name-" * 3 + "x"
    piped = depin("ingest", option, cwd=tmp_path, env={**os.environ, "COLUMNS": "40"})
    code, on_terminal = depin_on_terminal("ingest", option, cwd=tmp_path, columns=40)
    for rc, stderr in ((piped.returncode, piped.stderr), (code, on_terminal)):
        assert rc == 2, stderr
        errors = [line for line in stderr.splitlines() if "rror" in line]
        assert len(errors) == 1 and errors[0].startswith(f"Error: No such option: {option}"), stderr
