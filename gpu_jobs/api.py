"""Train and score through the runner chain: the library calls behind ``depin train`` / ``depin score`` and
the flows' train and score steps.

Nothing here prints: a job's log lines go to ``on_log(line)`` and each status poll to
``on_status(chain_entry, status)``. ``train`` and ``score`` return the objects that ``depin train --json`` /
``depin score --json`` print. A job that no runner completed raises ``TransientError`` when the last failure
was the infrastructure's (another try may succeed), else ``PermanentError``; bad arguments raise
``ConfigError`` before anything runs."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from depin_core import paths
from depin_core.errors import ConfigError, PermanentError, TransientError
from gpu_jobs import tables
from gpu_jobs.chain import ChainResult, LogSink, RunnerFactory, StatusSink, Verifier, run_chain
from gpu_jobs.plots import render as render_plots
from gpu_jobs.registry import family_names
from gpu_jobs.spec import (
    CheckpointPolicy,
    DatasetRef,
    FailureKind,
    JobKind,
    JobResult,
    JobSpec,
    JobState,
    Limits,
    ModelSpec,
    Outputs,
)

__all__ = [
    "DEFAULT_JOBS_DIR",
    "LogSink",
    "StatusSink",
    "attempts_json",
    "model_family",
    "run_spec",
    "score",
    "train",
]

DEFAULT_JOBS_DIR = paths.JOBS_DIR


def run_spec(
    spec: JobSpec,
    runners: Sequence[str] | None = None,
    *,
    jobs_dir: Path = DEFAULT_JOBS_DIR,
    on_log: LogSink | None = None,
    on_status: StatusSink | None = None,
    factory: RunnerFactory | None = None,
    verify: bool | Verifier = True,
    max_total_s: float | None = None,
) -> ChainResult:
    """Run ``spec`` through the runner chain ``runners`` (default ``["local"]``; see
    :func:`gpu_jobs.chain.run_chain`) and return the chain's result, or raise when no runner completed it
    (the message names the job, its state and failure, and every attempt)."""
    out = run_chain(
        spec,
        list(runners) if runners else ["local"],
        factory=factory,
        jobs_dir=jobs_dir,
        verify=verify,
        max_total_s=max_total_s,
        on_log=on_log,
        on_status=on_status,
    )
    _raise_unless_succeeded(out.job_id, out.result)
    return out


def attempts_json(out: ChainResult) -> list[dict[str, Any]]:
    """The chain's attempts as JSON objects (runner, node, state, failure, reason, cost_usd, seconds, …)."""
    return [a.model_dump(mode="json") for a in out.attempts]


def train(
    *,
    dataset: Path | str,
    model: str,
    out: Path,
    runners: Sequence[str] | None = None,
    ground_truth: Path | None = None,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    max_wall_s: float = 3600.0,
    checkpoint_every: int = 200,
    jobs_dir: Path = DEFAULT_JOBS_DIR,
    on_log: LogSink | None = None,
    on_status: StatusSink | None = None,
    factory: RunnerFactory | None = None,
    max_total_s: float | None = None,
    dataset_version: int | None = None,
    storage_options: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train the family ``model`` on the telemetry dataset into the artifact directory ``out``, through the
    runner chain ``runners`` (default ``["local"]``); the ``depin train --json`` object, with every attempt
    and ``plots`` (drawn here once the result is verified and names the real vehicles; see
    :func:`gpu_jobs.plots.render`: a plot that fails is reported missing, never fails the run)."""
    if model not in (names := family_names()):
        raise ConfigError(f"--model {model!r}: choose one of {', '.join(names)}")
    spec = JobSpec(
        kind=JobKind.TRAIN,
        model=ModelSpec(family=model, hyperparameters=params or {}),
        inputs=_inputs(dataset, ground_truth, version=dataset_version, storage_options=storage_options),
        seed=seed,
        limits=Limits(max_wall_s=max_wall_s),
        checkpoint=CheckpointPolicy(every_steps=checkpoint_every),
        outputs=Outputs(dir=str(out.resolve())),
    )
    done = run_spec(
        spec,
        runners,
        jobs_dir=jobs_dir,
        on_log=on_log,
        on_status=on_status,
        factory=factory,
        max_total_s=max_total_s,
    )
    result = done.result
    plots = render_plots(out, on_log=on_log)
    return {
        "job_id": result.job_id,
        "state": result.state.value,
        "model": model,
        "metrics": result.metrics,
        "artifact": str(out),
        "dataset": _lineage(spec.inputs[0]),
        "plots": plots,
        "device": result.device.label if result.device else None,
        "spec_hash": result.spec_hash,
        "seconds": round(result.timings.get("total_s", 0.0), 3),
        "runner": done.runner,
        "attempts": attempts_json(done),
    }


def model_family(model_dir: Path) -> str:
    """The family named by the model artifact at ``model_dir`` (its ``model.json``); ``ConfigError`` when it
    is not an artifact of a known family."""
    config_path = model_dir / "model.json"
    if not config_path.exists():
        raise ConfigError(
            f"--model {model_dir}: not a model artifact (no model.json); train one with `depin train`"
        )
    try:
        family = json.loads(config_path.read_bytes()).get("family")
    except (ValueError, AttributeError) as e:
        raise ConfigError(
            f"--model {model_dir}: model.json is not a JSON object ({e}); re-train with `depin train`"
        ) from e
    if family not in (names := family_names()):
        raise ConfigError(
            f"--model {model_dir}: model.json names family {family!r}, not one of "
            f"{', '.join(names)}; score it with a model trained by `depin train`"
        )
    return str(family)


def score(
    *,
    model_dir: Path,
    dataset: Path | str,
    out: Path,
    runners: Sequence[str] | None = None,
    ground_truth: Path | None = None,
    max_wall_s: float = 3600.0,
    jobs_dir: Path = DEFAULT_JOBS_DIR,
    on_log: LogSink | None = None,
    on_status: StatusSink | None = None,
    factory: RunnerFactory | None = None,
    max_total_s: float | None = None,
) -> dict[str, Any]:
    """Batch-score ``dataset`` with the model artifact at ``model_dir`` into the Parquet file ``out``, through
    the runner chain ``runners`` (default ``["local"]``; untrusted runners' rows are spot-checked locally);
    the ``depin score --json`` object, with every attempt."""
    family = model_family(model_dir)
    inputs = _inputs(dataset, ground_truth, model_dir)
    staging = out.parent / f".{out.name}.job"
    spec = JobSpec(
        kind=JobKind.INFER,
        model=ModelSpec(family=family),
        inputs=inputs,
        limits=Limits(max_wall_s=max_wall_s),
        outputs=Outputs(dir=str(staging.resolve())),
    )
    try:
        done = run_spec(
            spec,
            runners,
            jobs_dir=jobs_dir,
            on_log=on_log,
            on_status=on_status,
            factory=factory,
            max_total_s=max_total_s,
        )
        result = done.result
        produced = next(Path(p) for p in result.artifacts)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(produced, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "job_id": result.job_id,
        "state": result.state.value,
        "model": str(model_dir),
        "family": family,
        "rows": result.metrics.get("rows"),
        "metrics": result.metrics,
        "output": str(out),
        "device": result.device.label if result.device else None,
        "seconds": round(result.timings.get("total_s", 0.0), 3),
        "runner": done.runner,
        "attempts": attempts_json(done),
    }


def _lineage(ref: DatasetRef) -> dict[str, Any]:
    """The data a job saw: table URI and version (Delta tables) and the digest of its files."""
    return {"path": ref.path, "table": ref.table, "version": ref.version, "sha256": ref.sha256}


def _dataset_ref(path: Path, role: str, flag: str) -> DatasetRef:
    if not path.exists():
        raise ConfigError(f"{flag} {path}: does not exist")
    return DatasetRef.from_path(path, role=role)  # type: ignore[arg-type]


def telemetry_ref(
    dataset: Path | str, *, version: int | None = None, storage_options: dict[str, str] | None = None
) -> DatasetRef:
    """The telemetry input: one version of a Delta table (local or ``s3://``), or a folder/file of Parquet."""
    if tables.is_remote(dataset) or tables.is_delta_table(dataset):
        return DatasetRef.from_table(dataset, version=version, storage_options=storage_options)
    if version is not None:
        raise ConfigError(f"--dataset-version: {dataset} is not a Delta table, so it has no versions")
    return _dataset_ref(Path(dataset), "telemetry", "--dataset")


def _inputs(
    dataset: Path | str,
    ground_truth: Path | None,
    model_dir: Path | None = None,
    *,
    version: int | None = None,
    storage_options: dict[str, str] | None = None,
) -> list[DatasetRef]:
    """A job's inputs in the order the families read them: telemetry, the model (scoring), ground truth."""
    inputs = [telemetry_ref(dataset, version=version, storage_options=storage_options)]
    if model_dir is not None:
        inputs.append(_dataset_ref(model_dir, "model", "--model"))
    if ground_truth is not None:
        inputs.append(_dataset_ref(ground_truth, "ground_truth", "--ground-truth"))
    return inputs


def _raise_unless_succeeded(job_id: str, result: JobResult) -> None:
    """``TransientError`` for a job that failed for the infrastructure's sake (``FAILED(infra)``), else
    ``PermanentError``; nothing for a job that succeeded."""
    if result.state != JobState.SUCCEEDED:
        failure = f"({result.failure.value})" if result.failure else ""
        error = TransientError if result.failure == FailureKind.INFRA else PermanentError
        raise error(f"job {job_id} {result.state.value}{failure}: {(result.error or '').strip()[-3000:]}")
