"""``depin up`` / ``depin down`` / ``depin demo``: the local stack (:mod:`pipelines.stack`), printed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from depin_core import paths
from pipelines.cli._output import JsonOpt, emit_json, say, write_err


def demo(
    vehicles: Annotated[int, typer.Option(help="simulated vehicles")] = 30,
    days: Annotated[float, typer.Option(help="days of history")] = 7.0,
    seed: Annotated[int, typer.Option(help="seed of the simulated fleet")] = 3,
    out: Annotated[
        Path, typer.Option(help="where the demo writes its dataset, model and summary")
    ] = paths.DEMO_DIR,
    as_json: JsonOpt = False,
) -> None:
    """The main job, end to end on this machine: emulator → train_and_publish (ingest, train, evaluate,
    publish) → gateway → one invocation; summary in <out>/summary.json."""
    from pipelines.stack.demo import run_demo

    summary = run_demo(vehicles=vehicles, days=days, seed=seed, out=out, say=say)
    if as_json:
        emit_json(summary)


def up(
    host: Annotated[
        str, typer.Option(help="address every service binds (loopback by default)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Prefect server port: UI and /api (0 = a free port)")] = 4200,
    gateway_port: Annotated[int, typer.Option(help="function gateway port (0 = a free port)")] = 8787,
    emulator_port: Annotated[int, typer.Option(help="DIMO emulator port (0 = a free port)")] = 8765,
    emulator: Annotated[
        bool | None,
        typer.Option(
            "--emulator/--no-emulator",
            help="start the DIMO emulator (default: yes, unless DEPIN_DIMO_* points at real DIMO)",
        ),
    ] = None,
    vehicles: Annotated[int, typer.Option(help="simulated vehicles of the emulator")] = 20,
    days: Annotated[float, typer.Option(help="days of emulated history")] = 7.0,
    seed: Annotated[int, typer.Option(help="seed of the emulated fleet")] = 0,
    end: Annotated[
        str | None, typer.Option(help="end of the emulated history, ISO-8601 (default: start-up time)")
    ] = None,
    emulator_rate_limit: Annotated[
        float,
        typer.Option(
            help="the emulator answers 429 past this many requests/s per DIMO service and client host, as DIMO "
            "does (0 = no limit)"
        ),
    ] = 0.0,
    emulator_rate_limit_per: Annotated[
        str,
        typer.Option(help="the emulator's rate limit buckets: client-host (as DIMO documents) or license"),
    ] = "client-host",
    runner_poll_s: Annotated[int, typer.Option(help="how often served deployments look for runs (s)")] = 5,
    serve: Annotated[
        bool,
        typer.Option(
            "--serve/--no-serve",
            help="serve the deployments in this process; --no-serve when workers run them (depin deploy --pool)",
        ),
    ] = True,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="the Prefect server's database, e.g. postgresql+asyncpg://USER:PASSWORD@HOST:5432/prefect "
            "(default: DEPIN_UP_DATABASE_URL, else PREFECT_SERVER_DATABASE_CONNECTION_URL, else SQLite in "
            "the Prefect home); shown redacted",
            show_default=False,
        ),
    ] = None,
    background: Annotated[
        bool, typer.Option("--background", help=f"detach; `depin down` stops it (log {paths.UP_LOG})")
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="print the URLs (ui, api, gateway, emulator) as one JSON line once ready"
        ),
    ] = False,
) -> None:
    """Start the Prefect server + UI, the DIMO emulator and the gateway, and serve the deployments; Ctrl-C
    stops everything."""
    from pydantic import SecretStr

    from pipelines.stack.up import UpOptions, check_database_url, ready_text, start_background, supervise

    if database_url is not None:
        check_database_url(database_url, "--database-url")
    opts = UpOptions(
        host=host,
        port=port,
        gateway_port=gateway_port,
        emulator_port=emulator_port,
        emulator=emulator,
        vehicles=vehicles,
        days=days,
        seed=seed,
        end=end,
        emulator_rate_limit=emulator_rate_limit,
        emulator_rate_limit_per=emulator_rate_limit_per,  # checked by the model
        runner_poll_s=runner_poll_s,
        serve=serve,
        database_url=SecretStr(database_url) if database_url is not None else None,
    )
    if background:
        doc = start_background(opts)
        say(
            ("depin up", "bold green"),
            f" running in the background (pid {doc['pid']}): UI {doc['ui']}, gateway {doc['gateway']}; "
            "`depin down` stops it",
        )
        if as_json:
            emit_json(doc)
        return

    def ready(doc: dict[str, Any], notes: list[str]) -> None:
        write_err(ready_text(doc, notes))
        if as_json:
            emit_json(doc)

    supervise(opts, on_ready=ready, notify=lambda line: write_err(line + "\n"))


def down(
    timeout: Annotated[float, typer.Option(help="seconds to wait before killing what is left")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Stop a `depin up --background` running in this directory."""
    from pipelines.stack.up import stop_background

    result = stop_background(timeout_s=timeout)
    say(
        f"depin up (pid {result['pid']}) stopped"
        if result["stopped"]
        else f"nothing to stop: {result['reason']}"
    )
    if as_json:
        emit_json(result)
