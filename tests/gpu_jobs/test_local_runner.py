"""LocalRunner end to end with real worker subprocesses and the toy family."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from gpu_jobs.artifacts import load_artifact
from gpu_jobs.errors import JobNotFinished, JobNotFound
from gpu_jobs.local import LocalRunner
from gpu_jobs.runner import JobRunner, JobStatus
from gpu_jobs.spec import DatasetRef, FailureKind, JobResult, JobSpec, JobState
from tests.support.toy_family import IMPORT_PATH, write_toy_dataset

REPO = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(REPO)}


@pytest.fixture()
def data(tmp_path: Path) -> DatasetRef:
    return DatasetRef.from_path(write_toy_dataset(tmp_path / "data" / "part-0.parquet").parent)


def _train(tmp_path: Path, data: DatasetRef, out: str = "model", **hp: object) -> JobSpec:
    return JobSpec(
        kind="train",
        model={"family": IMPORT_PATH, "hyperparameters": {"steps": 30, **hp}},
        inputs=[data],
        seed=5,
        limits={"max_wall_s": 60},
        outputs={"dir": str(tmp_path / out)},
    )


def _with(spec: JobSpec, **fields: object) -> JobSpec:
    return JobSpec.model_validate({**spec.model_dump(), **fields})


def _wait_running(runner: LocalRunner, job_id: str) -> JobStatus:
    deadline = time.monotonic() + 60
    while (st := runner.status(job_id)).step < 1:
        assert not st.state.terminal, runner.logs(job_id)[0]
        assert time.monotonic() < deadline, "the job never started running"
        time.sleep(0.05)
    return st


def test_train_then_infer_succeeds(tmp_path: Path, data: DatasetRef) -> None:
    with LocalRunner(tmp_path / "jobs", env=ENV) as runner:
        assert isinstance(runner, JobRunner)
        spec = _train(tmp_path, data)
        job_id = runner.submit(spec)
        res = runner.result(job_id, timeout=60)
        assert res.state == JobState.SUCCEEDED, res.error
        text, offset = runner.logs(job_id)
        assert "step 30/30" in text and offset == len(text.encode())
        assert runner.logs(job_id, offset) == ("", offset)
        st = runner.status(job_id)
        assert (st.state, st.step, st.total) == (JobState.SUCCEEDED, 30, 30) and "loss" in st.metrics

        infer = JobSpec(
            kind="infer",
            model={"family": IMPORT_PATH},
            inputs=[data, DatasetRef.from_path(tmp_path / "model", role="model")],
            outputs={"dir": str(tmp_path / "scores")},
        )
        scored = runner.result(runner.submit(infer), timeout=60)

    assert res.spec_hash == spec.spec_hash and res.job_id == job_id
    assert (
        res.device is not None and res.device.torch_version == torch.__version__ and res.device.threads >= 1
    )
    assert res.metrics["steps"] == 30 and res.metrics["mse"] > 0
    assert {"staging_s", "running_s", "uploading_s", "total_s"} <= set(res.timings)
    assert [(a.attempt, a.state) for a in res.attempts] == [(1, JobState.SUCCEEDED)]
    manifest = str((tmp_path / "model" / "manifest.json").resolve())
    art = load_artifact(tmp_path / "model", expected_manifest_sha256=res.artifacts[manifest])
    assert art.manifest["spec_hash"] == spec.spec_hash
    assert art.manifest["datasets"][0]["sha256"] == data.sha256
    assert art.metrics == res.metrics and art.model_config["features"] == ["x0", "x1", "x2", "x3"]
    assert JobResult.model_validate(json.loads(res.model_dump_json())) == res

    assert scored.state == JobState.SUCCEEDED, scored.error
    pred = tmp_path / "scores" / "predictions.parquet"
    assert scored.metrics["rows"] == 256 == pq.read_metadata(pred).num_rows
    assert list(scored.artifacts) == [str(pred.resolve())]


def test_failures_are_classified(tmp_path: Path, data: DatasetRef) -> None:
    edited = _with(_train(tmp_path, data), inputs=[{**data.model_dump(), "sha256": "0" * 64}])
    other = DatasetRef.from_path(write_toy_dataset(tmp_path / "data2" / "part-0.parquet"))
    # the data changes after the spec was made
    write_toy_dataset(tmp_path / "data2" / "part-0.parquet", seed=99)
    changed = _train(tmp_path, other, out="changed")
    crash = _train(tmp_path, data, out="crash", crash_at_step=3)
    slow = _with(_train(tmp_path, data, out="slow", sleep_s=30), limits={"max_wall_s": 2.5})
    to_cancel = _train(tmp_path, data, out="cancel", sleep_s=30)
    with LocalRunner(tmp_path / "jobs", env=ENV, max_parallel=5, kill_grace_s=2) as runner:
        jobs = [("edited", edited), ("changed", changed), ("crash", crash), ("slow", slow)]
        ids = {name: runner.submit(s) for name, s in jobs}
        ids["cancel"] = runner.submit(to_cancel)
        _wait_running(runner, ids["cancel"])
        with pytest.raises(JobNotFinished):
            runner.result(ids["cancel"], timeout=0.01)
        runner.cancel(ids["cancel"])
        results = {name: runner.result(job_id, timeout=60) for name, job_id in ids.items()}
        crash_log = runner.logs(ids["crash"])[0]
        with pytest.raises(JobNotFound):
            runner.status("../../etc")

    r = results["edited"]
    assert (r.state, r.failure) == (JobState.FAILED, FailureKind.USER)
    assert "the file list does not match its sha256" in (r.error or "")
    r = results["changed"]
    assert (r.state, r.failure) == (JobState.FAILED, FailureKind.USER)
    assert "part-0.parquet (telemetry) changed" in (r.error or "")
    assert "DatasetRef.from_path" in (r.error or "")

    r = results["crash"]
    assert (r.state, r.failure) == (JobState.FAILED, FailureKind.USER)
    assert "Traceback" in (r.error or "") and "toy family crashed on purpose at step 3" in (r.error or "")
    assert "toy family crashed on purpose" in crash_log
    assert not (tmp_path / "crash").exists()

    r = results["slow"]
    assert (r.state, r.failure) == (JobState.FAILED, FailureKind.INFRA)
    assert "timed out after 2.5 s" in (r.error or "")
    assert r.attempts[-1].reason == r.error

    r = results["cancel"]
    assert r.state == JobState.CANCELLED and r.failure is None
    assert [a.state for a in r.attempts] == [JobState.CANCELLED]


def test_queued_job_can_be_cancelled_before_it_starts(tmp_path: Path, data: DatasetRef) -> None:
    with LocalRunner(tmp_path / "jobs", env=ENV, max_parallel=1, kill_grace_s=2) as runner:
        first = runner.submit(_train(tmp_path, data, out="first", sleep_s=30))
        queued = runner.submit(_train(tmp_path, data, out="queued"))
        assert runner.status(queued).state == JobState.PENDING
        runner.cancel(queued)
        res = runner.result(queued, timeout=10)
        assert runner.status(first).state in (JobState.PENDING, JobState.STAGING, JobState.RUNNING)
        runner.cancel(first)
        assert runner.result(first, timeout=30).state == JobState.CANCELLED
    assert res.state == JobState.CANCELLED and res.attempts == [] and res.error == "cancelled before start"
    assert runner.status(queued).state == JobState.CANCELLED


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_required_without_gpu_fails_as_infra(tmp_path: Path, data: DatasetRef) -> None:
    spec = _with(_train(tmp_path, data), resources={"gpu_count": 1, "cpu_fallback": False})
    with LocalRunner(tmp_path / "jobs", env=ENV) as runner:
        res = runner.result(runner.submit(spec), timeout=60)
    assert (res.state, res.failure) == (JobState.FAILED, FailureKind.INFRA)
    assert (res.error or "").startswith("no GPU")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trains_on_cuda_when_available(tmp_path: Path, data: DatasetRef) -> None:
    spec = _with(_train(tmp_path, data), resources={"gpu_count": 1, "cpu_fallback": False})
    with LocalRunner(tmp_path / "jobs", env=ENV) as runner:
        res = runner.result(runner.submit(spec), timeout=120)
    assert res.state == JobState.SUCCEEDED, res.error
    assert res.device is not None and res.device.type == "cuda" and res.device.cuda_version
    assert res.device.bf16_autocast == torch.cuda.is_bf16_supported()
    assert load_artifact(tmp_path / "model").state_dict["0.weight"].device.type == "cpu"
