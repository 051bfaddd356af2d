"""``depin report``: one self-contained HTML page of a model artifact (metrics, plots) and its dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipelines.cli._output import JsonOpt, emit_json, say


def report(
    model_dir: Annotated[Path, typer.Argument(help="model artifact directory (from depin train)")],
    out: Annotated[Path, typer.Option(help="the HTML file to write")] = Path("report.html"),
    dataset: Annotated[
        Path | None, typer.Option(help="telemetry dataset directory: add its fleet plots (tracks, coverage)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write one HTML file (images inline) with the model's metrics and plots, and the dataset's fleet plots."""
    from pipelines.report import write_report

    result = write_report(model_dir, out, dataset=dataset)
    for name, reason in result["missing"].items():
        say(f"plot {name} missing: {reason}")
    shown = len(result["plots"]) + len(result["fleet_plots"]) - len(result["missing"])
    say("report ", (str(out), "bold"), f": {shown} plots, {result['bytes'] / 1000:.0f} kB")
    if as_json:
        emit_json(result)
