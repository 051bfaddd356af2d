"""``depin train`` / ``depin score``: flags in, :mod:`gpu_jobs.api` with a stderr progress bar, the result out."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from depin_core.errors import ConfigError
from depin_core.plots import sig
from gpu_jobs.registry import FAMILIES, PLUGINS_ENV
from pipelines.cli._output import JsonOpt, emit_json, err_console, say

if TYPE_CHECKING:
    from rich.progress import TaskID

    from gpu_jobs.runner import JobStatus


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
    return " ".join(f"{k}={sig(v)}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


@contextlib.contextmanager
def job_progress(label: str) -> Iterator[dict[str, Any]]:
    """A stderr progress bar for one job, shown from its first log line or status (so an error found before
    the job starts prints alone) and gone when it ends; yields the ``on_log`` / ``on_status`` callbacks of
    :mod:`gpu_jobs.api` that draw it (each log line printed above the bar)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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


def dataset_storage_options(dataset: Path | str) -> dict[str, str] | None:
    """Object-store options (``DEPIN_DATASET_S3_*``) for a dataset URI; None for a local path."""
    from connectors.dimo.location import TableLocation

    loc = TableLocation.of(dataset)
    return None if loc.is_local else loc.storage_options


def train_cmd(*, model: str, dataset: Path | str, **kw: Any) -> dict[str, Any]:
    """:func:`gpu_jobs.api.train` with a progress bar."""
    from gpu_jobs import api

    with job_progress(f"train {model}") as callbacks:
        opts = dataset_storage_options(dataset)
        return api.train(model=model, dataset=dataset, storage_options=opts, **kw, **callbacks)


def score_cmd(*, model_dir: Path, **kw: Any) -> dict[str, Any]:
    """:func:`gpu_jobs.api.score` with a progress bar (labelled with the artifact's family, read first)."""
    from gpu_jobs import api

    with job_progress(f"infer {api.model_family(model_dir)}") as callbacks:
        return api.score(model_dir=model_dir, **kw, **callbacks)


def train(
    dataset: Annotated[
        str, typer.Option(help="telemetry dataset: directory or s3://bucket/prefix (from depin ingest)")
    ],
    model: Annotated[
        str, typer.Option(help=f"model family: {' or '.join(sorted(FAMILIES))} (plugins: {PLUGINS_ENV})")
    ],
    out: Annotated[Path, typer.Option(help="where to write the model artifact directory")],
    runner: Annotated[
        list[str] | None,
        typer.Option(
            help="runner chain, tried in order on infrastructure failures (repeatable): local (CUDA when "
            "available, else CPU), agent:<url>, node:<name>, vast, ionet, gpunet (default: local)"
        ),
    ] = None,
    ground_truth: Annotated[
        Path | None, typer.Option(help="emulator ground truth (--ground-truth-out) for fault recall")
    ] = None,
    param: Annotated[list[str] | None, typer.Option(help="hyperparameter key=value (repeatable)")] = None,
    seed: Annotated[int, typer.Option(help="seed (data split, init, shuffling)")] = 0,
    max_wall_s: Annotated[float, typer.Option(help="wall-time limit of the job")] = 3600.0,
    dataset_version: Annotated[
        int | None, typer.Option(help="train on this version of the dataset table (default: the latest)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a model on a telemetry dataset as a job (subprocess; checkpoints; artifact with sha256s)."""
    result = train_cmd(
        dataset=dataset,
        dataset_version=dataset_version,
        model=model,
        out=out,
        runners=runner or ["local"],
        ground_truth=ground_truth,
        params=parse_params(param or []),
        seed=seed,
        max_wall_s=max_wall_s,
    )
    shown = {k: v for k, v in result["metrics"].items() if isinstance(v, int | float)}
    for a in result["attempts"][:-1]:
        say(f"attempt {a['attempt']} on {a['runner']} failed: {a['reason']}")
    say(
        "trained ",
        (model, "bold"),
        f" on {result['runner']} ({result['device']}) in {sig(result['seconds'])} s → {result['artifact']}; "
        + ", ".join(f"{k}={sig(v)}" for k, v in list(shown.items())[:8]),
    )
    plots = result.get("plots", {})
    for name, entry in plots.items():
        if "missing" in entry:
            say(f"plot {name} missing: {entry['missing']}")
    if plots:
        drawn = sum("file" in e for e in plots.values())
        say(
            f"plots: {drawn} of {len(plots)} in {result['artifact']}/plots (depin report {result['artifact']})"
        )
    if as_json:
        emit_json(result)


def score(
    model: Annotated[Path, typer.Option(help="model artifact directory (from depin train)")],
    dataset: Annotated[Path, typer.Option(help="telemetry dataset directory")],
    out: Annotated[Path, typer.Option(help="Parquet file for the predictions")],
    runner: Annotated[
        list[str] | None,
        typer.Option(help="runner chain (repeatable), as for depin train (default: local)"),
    ] = None,
    ground_truth: Annotated[Path | None, typer.Option(help="emulator ground truth, for metrics")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Batch-score a telemetry dataset with a trained model (streamed; Parquet out)."""
    result = score_cmd(
        model_dir=model, dataset=dataset, out=out, runners=runner or ["local"], ground_truth=ground_truth
    )
    say(f"scored {result['rows']:,} rows with {result['family']} on {result['device']} → {out}")
    if as_json:
        emit_json(result)
