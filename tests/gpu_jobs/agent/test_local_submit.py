"""``LocalRunner.submit(spec, job_id=…)`` (caller-chosen, idempotent ids), ``checkpoint.resume_from`` and
``checkpoint_dir``: what the agent and the runner chain build on."""

from __future__ import annotations

from pathlib import Path

import pytest

from depin_core.errors import ConfigError
from gpu_jobs.local import LocalRunner
from gpu_jobs.runner import JobNotFound
from gpu_jobs.spec import CheckpointPolicy, DatasetRef, JobSpec, JobState
from tests.gpu_jobs.agent.helpers import ENV, new_job_id, train_spec


def _resume_from(spec: JobSpec, directory: Path | None) -> JobSpec:
    checkpoint = spec.checkpoint.model_copy(
        update={"resume_from": None if directory is None else str(directory)}
    )
    return spec.model_copy(update={"checkpoint": checkpoint})


def test_caller_chosen_job_ids_are_idempotent(tmp_path: Path, data: DatasetRef) -> None:
    spec = train_spec(data, tmp_path / "m", steps=5)
    job_id = new_job_id(spec)
    with LocalRunner(tmp_path / "jobs", env=ENV) as runner:
        assert runner.submit(spec, job_id=job_id) == job_id
        res = runner.result(job_id, timeout=60)
        assert res.state == JobState.SUCCEEDED, res.error
        # the same spec again (outputs, limits and checkpoint policy are not part of the hash): the same job
        moved = spec.model_copy(
            update={"outputs": spec.outputs.model_copy(update={"dir": str(tmp_path / "x")})}
        )
        assert runner.submit(moved, job_id=job_id) == job_id
        assert runner.result(job_id, timeout=60) == res
        with pytest.raises(ConfigError, match="already exists with another spec"):
            runner.submit(spec.model_copy(update={"seed": 6}), job_id=job_id)
        for bad in ("../../etc", "ABCDEF012345-01234567", job_id + "0"):
            with pytest.raises(ConfigError, match="job_id"):
                runner.submit(spec, job_id=bad)
    # a new runner on the same root knows the job from its directory
    with LocalRunner(tmp_path / "jobs", env=ENV) as again:
        assert again.submit(spec, job_id=job_id) == job_id
        assert again.result(job_id) == res
        with pytest.raises(ConfigError):
            again.submit(spec.model_copy(update={"seed": 6}), job_id=job_id)


def test_resume_from_another_jobs_checkpoints(tmp_path: Path, data: DatasetRef) -> None:
    short = train_spec(data, tmp_path / "short", steps=20)  # checkpoints every 10 steps
    full = train_spec(data, tmp_path / "full", steps=30)
    with LocalRunner(tmp_path / "jobs", env=ENV, max_parallel=2) as runner:
        short_id, full_id = runner.submit(short), runner.submit(full)
        assert runner.result(short_id, timeout=60).state == JobState.SUCCEEDED
        ckpt = runner.checkpoint_dir(short_id)
        assert ckpt is not None and sorted(p.name for p in ckpt.iterdir()) == [
            "ckpt-000000010.json", "ckpt-000000010.safetensors",
            "ckpt-000000020.json", "ckpt-000000020.safetensors",
        ]  # fmt: skip
        resumed_spec = _resume_from(train_spec(data, tmp_path / "resumed", steps=30), ckpt)
        assert resumed_spec.spec_hash == full.spec_hash
        resumed_id = runner.submit(resumed_spec)
        resumed = runner.result(resumed_id, timeout=60)
        straight = runner.result(full_id, timeout=60)
        log = runner.logs(resumed_id)[0]

        no_ckpt = train_spec(data, tmp_path / "none", steps=3).model_copy(
            update={"checkpoint": CheckpointPolicy()}
        )
        plain_id = runner.submit(no_ckpt)
        assert runner.result(plain_id, timeout=60).state == JobState.SUCCEEDED
        assert runner.checkpoint_dir(plain_id) is None
        with pytest.raises(JobNotFound):
            runner.checkpoint_dir("0123456789ab-01234567")
        with pytest.raises(ConfigError, match="resume_from"):
            runner.submit(_resume_from(full, tmp_path / "no-such-dir"), job_id=new_job_id(full))
        assert len(list((tmp_path / "jobs").iterdir())) == 4  # the refused job left no directory

    assert "resumed from step 20" in log
    assert resumed.state == JobState.SUCCEEDED, resumed.error
    # ten steps from the step-20 checkpoint land exactly where thirty uninterrupted steps do
    assert resumed.metrics == straight.metrics
