"""JobSpec: hashing, dataset references, validation, JSON round trips."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from gpu_jobs.errors import JobError
from gpu_jobs.spec import (
    AttemptRecord,
    DatasetRef,
    DeviceInfo,
    FailureKind,
    JobResult,
    JobSpec,
    JobState,
)
from tests.support.toy_family import write_toy_dataset


def _spec_dict() -> dict:
    return {
        "kind": "train",
        "model": {"family": "range", "hyperparameters": {"hidden": [64, 64], "lr": 0.001, "epochs": 5}},
        "inputs": [{"path": "/data/a", "sha256": "a" * 64, "role": "telemetry"}],
        "seed": 7,
        "resources": {"gpu_count": 1, "min_vram_gb": 4, "cpu_fallback": True},
        "limits": {"max_wall_s": 600},
        "checkpoint": {"every_steps": 100, "keep_last": 2},
        "outputs": {"dir": "/out/model"},
    }


def _reversed_keys(value):
    if isinstance(value, dict):
        return {k: _reversed_keys(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reversed_keys(v) for v in value]
    return value


def test_spec_hash_is_stable_and_ignores_key_order() -> None:
    a = JobSpec.model_validate(_spec_dict())
    b = JobSpec.model_validate_json(json.dumps(_reversed_keys(_spec_dict())))
    c = JobSpec.model_validate_json(a.model_dump_json())
    assert a.spec_hash == b.spec_hash == c.spec_hash
    assert len(a.spec_hash) == 64 and int(a.spec_hash, 16) >= 0


@pytest.mark.parametrize(
    "path, value",
    [
        (("kind",), "infer"),
        (("model", "family"), "anomaly"),
        (("model", "hyperparameters", "lr"), 0.002),
        (("model", "hyperparameters", "hidden"), [64, 32]),
        (("model", "hyperparameters", "extra"), None),
        (("inputs", 0, "sha256"), "b" * 64),
        (("inputs", 0, "role"), "ground_truth"),
        (("seed",), 8),
        (("resources", "gpu_count"), 0),
        (("resources", "cpu_fallback"), False),
        (("resources", "min_vram_gb"), 8),
    ],
)
def test_any_result_relevant_change_changes_the_hash(path: tuple, value: object) -> None:
    base = JobSpec.model_validate(_spec_dict()).spec_hash
    d = _spec_dict()
    if path == ("kind",):  # an infer job also needs a model input
        d["inputs"].append({"path": "/m", "sha256": "c" * 64, "role": "model"})
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert JobSpec.model_validate(d).spec_hash != base


@pytest.mark.parametrize(
    "path, value",
    [
        (("outputs", "dir"), "/elsewhere"),
        (("limits", "max_wall_s"), 60),
        (("checkpoint", "every_steps"), 5),
        (("inputs", 0, "path"), "/staged/on/another/node"),
    ],
)
def test_where_and_when_do_not_change_the_hash(path: tuple, value: object) -> None:
    base = JobSpec.model_validate(_spec_dict()).spec_hash
    d = _spec_dict()
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert JobSpec.model_validate(d).spec_hash == base


def test_validation_rejects_bad_specs() -> None:
    d = _spec_dict()
    d["kind"] = "infer"
    with pytest.raises(ValidationError, match="exactly one input with role 'model'"):
        JobSpec.model_validate(d)
    with pytest.raises(ValidationError):
        JobSpec.model_validate({**_spec_dict(), "unknown_field": 1})
    with pytest.raises(ValidationError):
        JobSpec.model_validate({**_spec_dict(), "limits": {"max_wall_s": 0}})


def test_dataset_ref_from_directory_and_file(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_toy_dataset(root / "token_id=1" / "part-0.parquet", seed=1)
    write_toy_dataset(root / "token_id=2" / "part-0.parquet", seed=2)
    (root / "_SUCCESS").write_text("")  # not a dataset file: ignored
    ref = DatasetRef.from_path(root)
    assert [f.path for f in ref.files] == ["token_id=1/part-0.parquet", "token_id=2/part-0.parquet"]
    assert ref.verify() == [root / "token_id=1/part-0.parquet", root / "token_id=2/part-0.parquet"]
    assert DatasetRef.from_path(root).sha256 == ref.sha256

    single = DatasetRef.from_path(root / "token_id=1" / "part-0.parquet")
    assert single.files == [] and single.sha256 == ref.files[0].sha256

    write_toy_dataset(root / "token_id=2" / "part-0.parquet", seed=3)  # rewritten content
    with pytest.raises(JobError, match=r"token_id=2/part-0.parquet \(telemetry\) changed") as e:
        ref.verify()
    assert e.value.kind == FailureKind.USER
    write_toy_dataset(root / "token_id=3" / "part-0.parquet")
    with pytest.raises(JobError, match="unexpected"):
        ref.verify()
    with pytest.raises(JobError, match="no such file"):
        DatasetRef.from_path(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(JobError, match=r"no \*\.parquet files"):
        DatasetRef.from_path(tmp_path / "empty")


def test_result_round_trips_through_json() -> None:
    dev = DeviceInfo(type="cpu", name="cpu", torch_version="2.x", threads=1)
    t = datetime(2025, 1, 1, tzinfo=UTC)
    res = JobResult(
        job_id="j",
        spec_hash="h",
        state=JobState.FAILED,
        failure=FailureKind.INFRA,
        metrics={"mae": 1.5},
        device=dev,
        attempts=[
            AttemptRecord(
                attempt=1, runner="local", node="n", started=t, state=JobState.FAILED, failure="infra"
            )
        ],
        error="timed out",
    )
    again = JobResult.model_validate(json.loads(res.model_dump_json()))
    assert again == res
    assert JobState.FAILED.terminal and not JobState.RUNNING.terminal
