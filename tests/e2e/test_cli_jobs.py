"""`depin train` and `depin score` as a user runs them: real dataset, subprocess jobs, JSON last lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gpu_jobs.artifacts import load_artifact
from tests.gpu_jobs.models.fleet_data import FleetData, build_fleet_data

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def small_fleet(tmp_path_factory: pytest.TempPathFactory) -> FleetData:
    return build_fleet_data(tmp_path_factory.mktemp("fleet"), vehicles=12, days=3, seed=7)


def depin(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


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
    assert proc.returncode == 2 and "--model 'gpt': choose one of anomaly, range" in proc.stderr
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
