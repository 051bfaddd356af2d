"""Checkpoints: exact round trips without pickle, retention, damage tolerance, RNG capture, and resume
equivalence of a SIGKILLed job (subprocess workers through the LocalRunner)."""

from __future__ import annotations

import math
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from depin_core.errors import ConfigError
from gpu_jobs.checkpoint import FileCheckpointer, capture_rng, restore_rng
from gpu_jobs.local import LocalRunner
from gpu_jobs.spec import DatasetRef, FailureKind, JobSpec, JobState
from tests.support.toy_family import IMPORT_PATH, write_toy_dataset

REPO = Path(__file__).resolve().parents[2]


def _trained_state() -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 3)).sum().backward()
        opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def _assert_same(a, b) -> None:
    if isinstance(a, dict):  # OrderedDict (state_dict) comes back as a plain dict, same order
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
        return
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_round_trip_is_exact(tmp_path: Path) -> None:
    state = {
        **_trained_state(),
        "cursor": {"epoch": 2, "batch": 17, "order": np.arange(5, dtype=np.int32)},
        "scalars": [1.0 / 3.0, float("nan"), float("inf"), None, True, "text", (1, 2)],
        "half": torch.randn(3, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "flags": torch.tensor([True, False]),
    }
    ck = FileCheckpointer(tmp_path, every_steps=10)
    assert ck.restore() is None
    ck.save(10, state)
    restored = FileCheckpointer(tmp_path, every_steps=10).restore()
    _assert_same(state, restored)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.Adam(model.parameters())
    assert restored is not None
    model.load_state_dict(restored["model"])
    assert restored["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)
    opt.load_state_dict(restored["optimizer"])  # int param-id keys survive
    assert not any(p.suffix == ".pkl" for p in tmp_path.iterdir())


def test_due_keep_last_and_damaged_newest(tmp_path: Path) -> None:
    ck = FileCheckpointer(tmp_path, every_steps=5, keep_last=2)
    assert [s for s in range(0, 16) if ck.due(s)] == [5, 10, 15]
    assert not FileCheckpointer(tmp_path, every_steps=0).due(5)
    for step in (5, 10, 15):
        ck.save(step, {"step": step, "w": torch.full((2,), float(step))})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-000000010.json",
        "ckpt-000000010.safetensors",
        "ckpt-000000015.json",
        "ckpt-000000015.safetensors",
    ]
    newest = tmp_path / "ckpt-000000015.safetensors"
    newest.write_bytes(newest.read_bytes()[:-3] + b"xyz")  # torn / corrupted write
    state = FileCheckpointer(tmp_path, every_steps=5).restore()
    assert state is not None and state["step"] == 10 and torch.equal(state["w"], torch.full((2,), 10.0))


def test_unsupported_values_are_refused(tmp_path: Path) -> None:
    ck = FileCheckpointer(tmp_path, every_steps=1)
    with pytest.raises(ConfigError, match=r"state\.gen: Generator is not checkpointable"):
        ck.save(1, {"gen": torch.Generator()})
    with pytest.raises(ConfigError, match="key"):
        ck.save(1, {(1, 2): 3})


def test_rng_capture_restore_replays_every_generator(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    ck = FileCheckpointer(tmp_path, every_steps=1)
    ck.save(1, {"rng": capture_rng()})

    def draws() -> tuple:
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(), random.random()

    first = draws()
    state = ck.restore()
    assert state is not None
    restore_rng(state["rng"])
    assert draws() == first


# --- resume equivalence through real worker processes ------------------------------------------------------


def _spec(tmp_path: Path, data: DatasetRef, out: str) -> JobSpec:
    return JobSpec(
        kind="train",
        model={"family": IMPORT_PATH, "hyperparameters": {"steps": 40, "batch_size": 16}},
        inputs=[data],
        seed=123,
        limits={"max_wall_s": 120},
        checkpoint={"every_steps": 5, "keep_last": 2},
        outputs={"dir": str(tmp_path / out)},
    )


def test_killed_job_resumes_to_bit_identical_weights(tmp_path: Path) -> None:
    data = DatasetRef.from_path(write_toy_dataset(tmp_path / "data" / "part-0.parquet"))
    env = {"PYTHONPATH": str(REPO)}
    pause = 15
    with (
        LocalRunner(tmp_path / "jobs-a", env=env) as plain,
        LocalRunner(
            tmp_path / "jobs-b", env={**env, "TOY_PAUSE_AT_STEP": str(pause)}, max_attempts=2
        ) as paused,
    ):
        ref_id = plain.submit(_spec(tmp_path, data, "uninterrupted"))
        job_id = paused.submit(_spec(tmp_path, data, "resumed"))
        deadline = time.monotonic() + 60
        while True:  # the toy family sleeps after step 15 (checkpoint 15 written): kill it there
            st = paused.status(job_id)
            if st.step >= pause and st.checkpoint_step == pause and st.worker_pid:
                break
            assert st.state not in (JobState.SUCCEEDED, JobState.FAILED), paused.logs(job_id)[0]
            assert time.monotonic() < deadline, "worker never reached the pause step"
            time.sleep(0.05)
        os.kill(st.worker_pid, signal.SIGKILL)
        resumed = paused.result(job_id, timeout=90)
        reference = plain.result(ref_id, timeout=90)
        log = paused.logs(job_id)[0]

    assert reference.state == JobState.SUCCEEDED, reference.error
    assert resumed.state == JobState.SUCCEEDED, resumed.error
    assert [(a.attempt, a.state, a.failure) for a in resumed.attempts] == [
        (1, JobState.FAILED, FailureKind.INFRA),
        (2, JobState.SUCCEEDED, None),
    ]
    assert "SIGKILL" in (resumed.attempts[0].reason or "")
    assert f"resumed from step {pause}" in log
    assert resumed.spec_hash == reference.spec_hash
    assert resumed.metrics == reference.metrics
    a = (tmp_path / "uninterrupted" / "weights.safetensors").read_bytes()
    b = (tmp_path / "resumed" / "weights.safetensors").read_bytes()
    assert a == b
