"""``LocalRunner.submit(spec, job_id=…)`` (caller-chosen, idempotent ids), ``checkpoint.resume_from`` and
``checkpoint_dir``: what the agent and the runner chain build on."""

from __future__ import annotations

from pathlib import Path

import pytest

from depin_core.errors import ConfigError
from gpu_jobs.errors import JobNotFound
from gpu_jobs.local import LocalRunner
from gpu_jobs.spec import CheckpointPolicy, DatasetRef, JobSpec, JobState
from tests.gpu_jobs.agent.helpers import ENV, new_job_id, train_spec


def _resume_from(spec: JobSpec, directory: Path | None) -> JobSpec:
    checkpoint = spec.checkpoint.model_copy(
        update={"resume_from": None if directory is None else str(directory)}
    )
    return spec.model_copy(update={"checkpoint": checkpoint})


def test_caller_chosen_ids_resume_from_another_jobs_checkpoints_and_checkpoint_dir(
    tmp_path: Path, data: DatasetRef
) -> None:
    short = train_spec(data, tmp_path / "short", steps=20)  # checkpoints every 10 steps
    # no checkpoint policy (not part of the spec_hash): the uninterrupted reference run keeps no checkpoints
    full = train_spec(data, tmp_path / "full", steps=30).model_copy(update={"checkpoint": CheckpointPolicy()})
    short_id = new_job_id(short)
    with LocalRunner(tmp_path / "jobs", env=ENV, max_parallel=2) as runner:
        assert runner.submit(short, job_id=short_id) == short_id
        full_id = runner.submit(full)
        res = runner.result(short_id, timeout=60)
        assert res.state == JobState.SUCCEEDED, res.error
        # caller-chosen ids are idempotent: the same spec again (outputs, limits and checkpoint policy are not
        # part of the hash) is the same job; another spec under that id is refused; malformed ids are refused
        moved = short.model_copy(
            update={"outputs": short.outputs.model_copy(update={"dir": str(tmp_path / "x")})}
        )
        assert runner.submit(moved, job_id=short_id) == short_id
        assert runner.result(short_id, timeout=60) == res
        with pytest.raises(ConfigError, match="already exists with another spec"):
            runner.submit(short.model_copy(update={"seed": 6}), job_id=short_id)
        for bad in ("../../etc", "ABCDEF012345-01234567", short_id + "0"):
            with pytest.raises(ConfigError, match="job_id"):
                runner.submit(short, job_id=bad)

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

        assert straight.state == JobState.SUCCEEDED and runner.checkpoint_dir(full_id) is None
        with pytest.raises(JobNotFound):
            runner.checkpoint_dir("0123456789ab-01234567")
        with pytest.raises(ConfigError, match="resume_from"):
            runner.submit(_resume_from(full, tmp_path / "no-such-dir"), job_id=new_job_id(full))
        assert len(list((tmp_path / "jobs").iterdir())) == 3  # the refused jobs left no directory

    assert "resumed from step 20" in log
    assert resumed.state == JobState.SUCCEEDED, resumed.error
    # ten steps from the step-20 checkpoint land exactly where thirty uninterrupted steps do
    assert resumed.metrics == straight.metrics

    # a new runner on the same root knows a job from its directory
    with LocalRunner(tmp_path / "jobs", env=ENV) as again:
        assert again.submit(short, job_id=short_id) == short_id
        assert again.result(short_id) == res
        with pytest.raises(ConfigError):
            again.submit(short.model_copy(update={"seed": 6}), job_id=short_id)
