"""``depin train`` / ``depin score``: build a JobSpec, run it through the runner chain, stream its progress."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from depin_core.errors import ConfigError, PermanentError, TransientError
from gpu_jobs.chain import ChainResult, RunnerFactory, Verifier, run_chain
from gpu_jobs.registry import FAMILIES
from gpu_jobs.runner import JobRunner, JobStatus
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
from pipelines._output import err_console

DEFAULT_JOBS_DIR = Path(".depin/jobs")


def parse_params(items: list[str]) -> dict[str, Any]:
    """``key=value`` hyperparameters; values are JSON when they parse (``epochs=20``, ``hidden=[64,64]``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param {item!r}: use key=value, e.g. --param epochs=20")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _check_family(model: str) -> None:
    if model not in FAMILIES:
        raise ConfigError(f"--model {model!r}: choose one of {', '.join(sorted(FAMILIES))}")


def _dataset_ref(path: Path, role: str, flag: str) -> DatasetRef:
    if not path.exists():
        raise ConfigError(f"{flag} {path}: does not exist")
    return DatasetRef.from_path(path, role=role)  # type: ignore[arg-type]


LogSink = Callable[[str], None]


def _progress(spec: JobSpec, show_progress: bool) -> Progress:
    """The stderr progress bar of a job (disabled without ``show_progress``)."""
    return Progress(
        TextColumn(f"[bold blue]{spec.kind.value} {spec.model.family}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err_console,
        disable=not show_progress,
        transient=True,
    )


def _echo(progress: Progress, show_progress: bool, on_log: LogSink | None) -> LogSink:
    """A sink that prints each log line above the bar (with ``show_progress``) and passes it to ``on_log``."""

    def log(line: str) -> None:
        if show_progress:
            progress.console.print(line, style="dim", markup=False, highlight=False)
        if on_log is not None:
            on_log(line)

    return log


def _metrics_text(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def _raise_unless_succeeded(job_id: str, result: JobResult) -> None:
    """``TransientError`` for a job that failed for the infrastructure's sake (``FAILED(infra)``), else
    ``PermanentError``; nothing for a job that succeeded."""
    if result.state != JobState.SUCCEEDED:
        failure = f"({result.failure.value})" if result.failure else ""
        error = TransientError if result.failure == FailureKind.INFRA else PermanentError
        raise error(f"job {job_id} {result.state.value}{failure}: {(result.error or '').strip()[-3000:]}")


def run_job(
    runner: JobRunner, spec: JobSpec, *, show_progress: bool = True, on_log: LogSink | None = None
) -> JobResult:
    """Submit ``spec``, stream its log lines and progress to stderr (with ``show_progress``) and each line
    to ``on_log``, return the final result. A failed job raises ``TransientError`` when another attempt or
    node may succeed (``FAILED(infra)``), else ``PermanentError``."""
    job_id = runner.submit(spec)
    offset = 0
    with _progress(spec, show_progress) as progress:
        task = progress.add_task("job", total=None, info="")
        log = _echo(progress, show_progress, on_log)
        while True:
            status = runner.status(job_id)
            text, offset = runner.logs(job_id, offset)
            for line in text.splitlines():
                log(line)
            info = _metrics_text(status.metrics)
            progress.update(
                task, total=status.total, completed=status.step, info=f"{status.state.value} {info}"
            )
            if status.state.terminal:
                break
            time.sleep(0.2)
    result = runner.result(job_id)
    _raise_unless_succeeded(job_id, result)
    return result


def _chain(runners: Sequence[str] | None, runner: str | None) -> list[str]:
    chain = list(runners) if runners else ([runner] if runner else ["local"])
    if runners and runner:
        raise ConfigError("give the runner chain as runners=[…] or one runner=…, not both")
    return chain


def run_on_chain(
    spec: JobSpec,
    runners: Sequence[str],
    *,
    jobs_dir: Path = DEFAULT_JOBS_DIR,
    show_progress: bool = True,
    on_log: LogSink | None = None,
    factory: RunnerFactory | None = None,
    verify: bool | Verifier = True,
    max_total_s: float | None = None,
) -> ChainResult:
    """Run ``spec`` through the runner chain (``gpu_jobs.chain.run_chain``), streaming its log lines and
    progress to stderr (with ``show_progress``) and each line to ``on_log``. A job that no runner completed
    raises ``TransientError`` when the last failure was the infrastructure's, else ``PermanentError``; the
    message lists every attempt."""
    with _progress(spec, show_progress) as progress:
        task = progress.add_task("job", total=None, info="")

        def status(entry: str, st: JobStatus) -> None:
            info = _metrics_text(st.metrics)
            progress.update(task, total=st.total, completed=st.step, info=f"{entry} {st.state.value} {info}")

        out = run_chain(
            spec,
            runners,
            factory=factory,
            jobs_dir=jobs_dir,
            verify=verify,
            max_total_s=max_total_s,
            on_log=_echo(progress, show_progress, on_log),
            on_status=status,
        )
    _raise_unless_succeeded(out.job_id, out.result)
    return out


def attempts_json(out: ChainResult) -> list[dict[str, Any]]:
    """The chain's attempts as JSON objects (runner, node, state, failure, reason, cost_usd, seconds, …)."""
    return [a.model_dump(mode="json") for a in out.attempts]


def run_train(
    *,
    dataset: Path,
    model: str,
    out: Path,
    runners: Sequence[str] | None = None,
    runner: str | None = None,
    ground_truth: Path | None = None,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    max_wall_s: float = 3600.0,
    checkpoint_every: int = 200,
    jobs_dir: Path = DEFAULT_JOBS_DIR,
    show_progress: bool = True,
    on_log: LogSink | None = None,
    factory: RunnerFactory | None = None,
    max_total_s: float | None = None,
) -> dict[str, Any]:
    """Train ``model`` on the telemetry dataset through the runner chain ``runners`` (default ``["local"]``;
    ``runner`` is the one-entry form); returns the ``depin train --json`` object, with every attempt."""
    chain = _chain(runners, runner)
    _check_family(model)
    inputs = [_dataset_ref(dataset, "telemetry", "--dataset")]
    if ground_truth is not None:
        inputs.append(_dataset_ref(ground_truth, "ground_truth", "--ground-truth"))
    spec = JobSpec(
        kind=JobKind.TRAIN,
        model=ModelSpec(family=model, hyperparameters=params or {}),
        inputs=inputs,
        seed=seed,
        limits=Limits(max_wall_s=max_wall_s),
        checkpoint=CheckpointPolicy(every_steps=checkpoint_every),
        outputs=Outputs(dir=str(out.resolve())),
    )
    done = run_on_chain(
        spec,
        chain,
        jobs_dir=jobs_dir,
        show_progress=show_progress,
        on_log=on_log,
        factory=factory,
        max_total_s=max_total_s,
    )
    result = done.result
    return {
        "job_id": result.job_id,
        "state": result.state.value,
        "model": model,
        "metrics": result.metrics,
        "artifact": str(out),
        "device": result.device.label if result.device else None,
        "spec_hash": result.spec_hash,
        "seconds": round(result.timings.get("total_s", 0.0), 3),
        "runner": done.runner,
        "attempts": attempts_json(done),
    }


def run_score(
    *,
    model_dir: Path,
    dataset: Path,
    out: Path,
    runners: Sequence[str] | None = None,
    runner: str | None = None,
    ground_truth: Path | None = None,
    max_wall_s: float = 3600.0,
    jobs_dir: Path = DEFAULT_JOBS_DIR,
    show_progress: bool = True,
    on_log: LogSink | None = None,
    factory: RunnerFactory | None = None,
    max_total_s: float | None = None,
) -> dict[str, Any]:
    """Batch-score ``dataset`` with the model artifact at ``model_dir`` into the Parquet file ``out``, through
    the runner chain ``runners`` (default ``["local"]``); untrusted runners' rows are spot-checked locally."""
    chain = _chain(runners, runner)
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
    if family not in FAMILIES:
        raise ConfigError(
            f"--model {model_dir}: model.json names family {family!r}, not one of "
            f"{', '.join(sorted(FAMILIES))}; score it with a model trained by `depin train`"
        )
    inputs = [_dataset_ref(dataset, "telemetry", "--dataset"), _dataset_ref(model_dir, "model", "--model")]
    if ground_truth is not None:
        inputs.append(_dataset_ref(ground_truth, "ground_truth", "--ground-truth"))
    staging = out.parent / f".{out.name}.job"
    spec = JobSpec(
        kind=JobKind.INFER,
        model=ModelSpec(family=str(family)),
        inputs=inputs,
        limits=Limits(max_wall_s=max_wall_s),
        outputs=Outputs(dir=str(staging.resolve())),
    )
    try:
        done = run_on_chain(
            spec,
            chain,
            jobs_dir=jobs_dir,
            show_progress=show_progress,
            on_log=on_log,
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
