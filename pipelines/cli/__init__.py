"""The ``depin`` command line. Every command that does work takes ``--json`` and then prints one JSON
object as its last stdout line; progress and human text go to stderr.

This package only parses flags and prints; the work is done by the library calls the commands make. One
module per command group: :mod:`~pipelines.cli.emulator`, :mod:`~pipelines.cli.ingest` (and ``signals``),
:mod:`~pipelines.cli.dataset` (``dataset info|optimize|vacuum|migrate``), :mod:`~pipelines.cli.jobs` (``train``, ``score``), :mod:`~pipelines.cli.report` (``report``), :mod:`~pipelines.cli.plan` (``plan``), :mod:`~pipelines.cli.serve` (``serve``, ``publish``,
``invoke``), :mod:`~pipelines.cli.stack` (``up``, ``down``, ``demo``), :mod:`~pipelines.cli.deploy` (``deploy``, ``pool-worker``), :mod:`~pipelines.cli.fluence` and
:mod:`~pipelines.cli.worker` (with :mod:`~pipelines.cli.nodes`); output helpers in ``_output``."""

from __future__ import annotations

import logging

import typer
from pydantic import ValidationError

from depin_core.errors import DepinError
from pipelines.cli import dataset, deploy, emulator, fluence, ingest, jobs, plan, report, serve, stack, worker
from pipelines.cli._output import error

app = typer.Typer(
    name="depin",
    help="DePIN data-to-GPU AI pipeline: DIMO telemetry -> Arrow -> torch jobs -> served functions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # click's plain help and usage errors: typer's rich panels wrap an error at the terminal width
    rich_markup_mode=None,
)

# in the order `depin --help` lists them
app.command()(emulator.emulator)
app.command()(ingest.ingest)
app.command()(stack.demo)
app.command()(jobs.train)
app.command()(jobs.score)
app.command()(report.report)
app.command()(serve.serve)
app.command()(serve.publish)
app.command()(serve.invoke)
app.command()(plan.plan)
app.command()(stack.up)
app.command()(stack.down)
app.command()(deploy.deploy)
app.command(name="pool-worker")(deploy.pool_worker)
app.command(name="signals")(ingest.list_signals)
app.add_typer(dataset.app)
app.add_typer(fluence.app)
app.add_typer(worker.app)


def main() -> None:
    """The ``depin`` console script: run the app; a ``DepinError`` or a flag that fails validation prints
    ``error: …`` on one line and exits 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except DepinError as exc:
        error(str(exc))
        raise SystemExit(2) from None
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "input"
            error(f"--{where.replace('_', '-')}: {err['msg']}")
        raise SystemExit(2) from None


__all__ = ["app", "main"]
