"""``depin train`` / ``depin score``: flags in, :mod:`gpu_jobs.api` with a stderr progress bar, the result out."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from depin_core.errors import ConfigError
from gpu_jobs import api
from gpu_jobs.runner import JobStatus
from pipelines._output import err_console


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


def _metrics_text(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


@contextlib.contextmanager
def job_progress(label: str) -> Iterator[dict[str, Any]]:
    """A stderr progress bar for one job, shown from its first log line or status (so an error found before
    the job starts prints alone) and gone when it ends; yields the ``on_log`` / ``on_status`` callbacks of
    :mod:`gpu_jobs.api` that draw it (each log line printed above the bar)."""
    progress = Progress(
        TextColumn("{task.fields[label]}", style="bold blue", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}", markup=False),  # runner URLs may hold [::1]
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )
    task: TaskID | None = None

    def bar() -> TaskID:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task("job", total=None, info="", label=label)
        return task

    def on_log(line: str) -> None:
        bar()
        progress.console.print(line, style="dim", markup=False, highlight=False)

    def on_status(entry: str, st: JobStatus) -> None:
        info = _metrics_text(st.metrics)
        progress.update(bar(), total=st.total, completed=st.step, info=f"{entry} {st.state.value} {info}")

    try:
        yield {"on_log": on_log, "on_status": on_status}
    finally:
        if task is not None:
            progress.stop()


def train_cmd(*, model: str, **kw: Any) -> dict[str, Any]:
    """:func:`gpu_jobs.api.train` with a progress bar."""
    with job_progress(f"train {model}") as callbacks:
        return api.train(model=model, **kw, **callbacks)


def score_cmd(*, model_dir: Path, **kw: Any) -> dict[str, Any]:
    """:func:`gpu_jobs.api.score` with a progress bar (labelled with the artifact's family, read first)."""
    with job_progress(f"infer {api.model_family(model_dir)}") as callbacks:
        return api.score(model_dir=model_dir, **kw, **callbacks)
