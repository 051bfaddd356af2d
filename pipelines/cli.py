"""The ``depin`` command line. Every command that does work takes ``--json`` and then prints one JSON
object as its last stdout line; progress and human text go to stderr."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from depin_core import paths
from depin_core.errors import DepinError
from depin_core.names import FUNCTION_NAME_RULE
from gpu_jobs.registry import FAMILIES, PLUGINS_ENV
from pipelines._output import emit_json, err_console, error, say

app = typer.Typer(
    name="depin",
    help="DePIN data-to-GPU AI pipeline: DIMO telemetry -> Arrow -> torch jobs -> served functions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # click's plain help and usage errors: typer's rich panels wrap an error at the terminal width
    rich_markup_mode=None,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object as the last stdout line")]


@app.command()
def emulator(
    host: Annotated[str, typer.Option(help="address to bind (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind (0 = any free port)")] = 8765,
    vehicles: Annotated[int, typer.Option(help="simulated vehicles")] = 20,
    days: Annotated[float, typer.Option(help="days of history up to now")] = 7.0,
    seed: Annotated[int, typer.Option(help="seed of the simulated fleet and license")] = 0,
    replay: Annotated[
        Path | None, typer.Option(help="serve this (token_id, signal, ts, value) Parquet/CSV instead")
    ] = None,
    cmap_dir: Annotated[
        Path | None, typer.Option(help="add the CMAP 1 Hz speed traces in this folder as vehicles")
    ] = None,
    cmap: Annotated[
        bool, typer.Option("--cmap", help="add the bundled real CMAP recordings as vehicles")
    ] = False,
    faults: Annotated[str, typer.Option(help="fault spec, e.g. 'all=0.2,latency=0.1:50,retry_after=1'")] = "",
    credentials_out: Annotated[Path | None, typer.Option(help="write license credentials JSON here")] = None,
    ground_truth_out: Annotated[
        Path | None, typer.Option(help="write the ground-truth tables (Parquet) here")
    ] = None,
    restricted_fraction: Annotated[float, typer.Option(help="share of vehicles not fully shared")] = 0.0,
    idle_fraction: Annotated[
        float, typer.Option(help="share of vehicles whose device went offline early (one never reported)")
    ] = 0.0,
    rate_limit: Annotated[
        float, typer.Option(help="requests/s per service and client before 429 (DIMO: 10); 0 = off")
    ] = 0.0,
    exchange_legacy_only: Annotated[
        bool, typer.Option(help="token exchange accepts only the legacy nftContractAddress/privileges body")
    ] = False,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "warning",
) -> None:
    """Run the DIMO-compatible emulator (Auth, Token Exchange, Identity, Telemetry) until Ctrl-C."""
    from connectors.dimo.emulator.server import serve
    from connectors.dimo.emulator.state import EmulatorConfig

    if cmap and cmap_dir is None:
        from connectors.dimo.emulator.fleet import bundled_cmap_dir

        cmap_dir = bundled_cmap_dir()
    config = EmulatorConfig(
        host=host,
        port=port,
        vehicles=vehicles,
        days=days,
        seed=seed,
        replay=replay,
        cmap_dir=cmap_dir,
        faults=faults,
        credentials_out=credentials_out,
        ground_truth_out=ground_truth_out,
        restricted_fraction=restricted_fraction,
        idle_fraction=idle_fraction,
        rate_limit_per_s=rate_limit,
        exchange_legacy_only=exchange_legacy_only,
        log_level=log_level,
    )

    def ready(state: Any) -> None:
        say(
            ("DIMO emulator", "bold green"),
            f" on {state.public_url}: {len(state.fleet.vehicles)} vehicles, "
            f"{state.fleet.start:%Y-%m-%d %H:%M} → {state.fleet.end:%Y-%m-%d %H:%M} UTC"
            + (f"; credentials → {credentials_out}" if credentials_out else "")
            + (f"; faults: {faults}" if faults else ""),
        )

    with contextlib.suppress(KeyboardInterrupt):
        serve(config, on_ready=ready)


@app.command()
def ingest(
    since: Annotated[str, typer.Option(help="start: ISO-8601 time or relative duration such as 7d")] = "7d",
    until: Annotated[
        str, typer.Option(help="end (exclusive): ISO-8601 time, relative duration, or 'now'")
    ] = "now",
    interval: Annotated[str, typer.Option(help="bucket width (Go duration: 1m, 30s, 1h)")] = "1m",
    signals: Annotated[
        str | None, typer.Option(help="comma-separated DIMO signals; default: all reported")
    ] = None,
    vehicles: Annotated[
        str | None, typer.Option(help="comma-separated token ids; default: all shared")
    ] = None,
    out: Annotated[
        Path, typer.Option(help="dataset directory (Parquet, partitioned by date)")
    ] = paths.DATASET_DIR,
    credentials: Annotated[
        Path | None, typer.Option(help="credentials JSON (from depin emulator --credentials-out)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Ingest DIMO telemetry into a Parquet dataset, incrementally (per-vehicle watermarks, no duplicates)."""
    from pipelines._ingest_cmd import run_ingest

    report = asyncio.run(
        run_ingest(
            since=since,
            until=until,
            interval=interval,
            signals=signals,
            vehicles=vehicles,
            out=out,
            credentials=credentials,
            show_progress=True,
        )
    )
    say(
        "ingested ",
        (f"{report.rows:,}", "bold"),
        f" rows from {report.vehicles} vehicles in {report.seconds:.1f}s "
        f"({report.requests} requests, {report.retries} retries) → {report.dataset}"
        + (f"; {report.up_to_date} already up to date" if report.up_to_date else "")
        + (f"; skipped {len(report.skipped)}" if report.skipped else ""),
    )
    if as_json:
        emit_json(report.to_json())


@app.command()
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
    from pipelines._demo import run_demo

    summary = run_demo(vehicles=vehicles, days=days, seed=seed, out=out)
    if as_json:
        emit_json(summary)


@app.command()
def train(
    dataset: Annotated[Path, typer.Option(help="telemetry dataset directory (from depin ingest)")],
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
    as_json: JsonOpt = False,
) -> None:
    """Train a model on a telemetry dataset as a job (subprocess; checkpoints; artifact with sha256s)."""
    from pipelines._jobs_cmd import parse_params, train_cmd

    result = train_cmd(
        dataset=dataset,
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
        f" on {result['runner']} ({result['device']}) in {result['seconds']:.1f}s → {result['artifact']}; "
        + ", ".join(f"{k}={v:.4g}" for k, v in list(shown.items())[:8]),
    )
    if as_json:
        emit_json(result)


@app.command()
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
    from pipelines._jobs_cmd import score_cmd

    result = score_cmd(
        model_dir=model, dataset=dataset, out=out, runners=runner or ["local"], ground_truth=ground_truth
    )
    say(f"scored {result['rows']:,} rows with {result['family']} on {result['device']} → {out}")
    if as_json:
        emit_json(result)


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="address to bind (default: 127.0.0.1, or DEPIN_GATEWAY_HOST)")
    ] = None,
    port: Annotated[int | None, typer.Option(help="port (0 = any free port) (default: 8787)")] = None,
    registry: Annotated[
        Path | None, typer.Option(help=f"registry directory (default: {paths.REGISTRY_DIR})")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print one JSON line (url, port, …) on stdout once listening")
    ] = False,
) -> None:
    """Run the function gateway on the registry until Ctrl-C (admin key generated on first start)."""
    from pipelines._serve_cmd import run_serve

    run_serve(host=host, port=port, registry=registry, as_json=as_json)


@app.command()
def publish(
    model: Annotated[Path, typer.Option(help="model artifact directory (from depin train) or a bundle")],
    name: Annotated[str, typer.Option(help=f"function name: {FUNCTION_NAME_RULE}")],
    alias: Annotated[
        str | None, typer.Option(help="also point this alias (e.g. prod) at the version")
    ] = None,
    target: Annotated[
        str,
        typer.Option(
            help="'local' (the registry directory), 'fluence' (a gateway VM on Fluence; DEPIN_FLUENCE_API_KEY) "
            "or a gateway URL"
        ),
    ] = "local",
    registry: Annotated[
        Path | None,
        typer.Option(help=f"registry directory for --target local (default: {paths.REGISTRY_DIR})"),
    ] = None,
    fluence_target: Annotated[
        str | None,
        typer.Option(
            help="--target fluence: deployment name, VM depin-gw-<name> (default DEPIN_FLUENCE_TARGET)"
        ),
    ] = None,
    max_usd_per_day: Annotated[
        float | None,
        typer.Option(
            help="--target fluence: refuse a new VM costing more (default DEPIN_FLUENCE_MAX_USD_PER_DAY, 5)"
        ),
    ] = None,
    admin_key_file: Annotated[
        Path | None,
        typer.Option(
            help="file with the gateway's admin key (default: DEPIN_ADMIN_KEY, else <registry>/admin.key)"
        ),
    ] = None,
    max_batch_size: Annotated[int, typer.Option(help="most rows per request and per batch")] = 1024,
    tls_cert: Annotated[
        Path | None, typer.Option(help="--target https://…: the gateway's certificate (PEM) to pin")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Sign a model as a versioned function bundle and publish it: verified upload, a smoke call of the new
    version with its manifest's example, then the alias moves (not if the smoke call fails)."""
    from pipelines._serve_cmd import run_publish

    result = run_publish(
        model=model,
        name=name,
        alias=alias,
        target=target,
        registry=registry,
        admin_key_file=admin_key_file,
        max_batch_size=max_batch_size,
        fluence_target=fluence_target,
        max_usd_per_day=max_usd_per_day,
        tls_cert=tls_cert,
    )
    moved = ", ".join(result["moved"]) or "none (version already present)"
    say(
        "published ",
        (f"{result['name']}@{result['version']}", "bold"),
        f" by {result['publisher']} to {result['target']}; aliases moved: {moved}",
    )
    if as_json:
        emit_json(result)


@app.command()
def invoke(
    ref: Annotated[str, typer.Argument(help="function: name, name@alias or name@version")],
    data: Annotated[str, typer.Option(help='a JSON row, a list of rows, {"inputs": [...]}, or @file.json')],
    target: Annotated[
        str | None,
        typer.Option(
            help="gateway URL, or 'fluence' (the recorded Fluence gateway) (default: DEPIN_GATEWAY_URL, else "
            "http://127.0.0.1:8787)"
        ),
    ] = None,
    request_id: Annotated[str | None, typer.Option(help="X-Request-Id (keys sticky weighted splits)")] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            help="the gateway's certificate (PEM) to pin; a Fluence gateway's is pinned from "
            f"{paths.FLUENCE_STATE_DIR}"
        ),
    ] = None,
    insecure_http: Annotated[
        bool,
        typer.Option(
            "--insecure-http",
            help="allow a plain-HTTP gateway on another machine (the rows cross the network in clear)",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Call a served function with input rows and print its output rows."""
    from pipelines._serve_cmd import run_invoke

    doc = run_invoke(
        ref=ref,
        data=data,
        target=target,
        request_id=request_id,
        tls_cert=tls_cert,
        insecure_http=insecure_http,
    )
    say(f"{doc['function']}@{doc['version']} in {doc['latency_ms']:.1f} ms:")
    if as_json:
        emit_json(doc)
    else:
        for row in doc["outputs"]:
            say(json.dumps(row, separators=(",", ":")))


@app.command()
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
    runner_poll_s: Annotated[int, typer.Option(help="how often served deployments look for runs (s)")] = 5,
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
    from pipelines._up import UpOptions, start_background, supervise

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
        runner_poll_s=runner_poll_s,
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
    supervise(opts, on_ready=emit_json if as_json else lambda _doc: None)


@app.command()
def down(
    timeout: Annotated[float, typer.Option(help="seconds to wait before killing what is left")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Stop a `depin up --background` running in this directory."""
    from pipelines._up import stop_background

    result = stop_background(timeout_s=timeout)
    say(
        f"depin up (pid {result['pid']}) stopped"
        if result["stopped"]
        else f"nothing to stop: {result['reason']}"
    )
    if as_json:
        emit_json(result)


@app.command(name="signals")
def list_signals(as_json: JsonOpt = False) -> None:
    """List the DIMO signals the connector knows (name, type, unit, privilege)."""
    from rich.table import Table

    from connectors.dimo.catalog import current_signals

    sigs = current_signals()
    table = Table("signal", "type", "unit", "privilege", "agg")
    for s in sigs.values():
        table.add_row(s.name, s.gql_type, s.unit, s.privilege.removeprefix("VEHICLE_"), s.default_agg)
    err_console.print(table)
    if as_json:
        emit_json(
            {
                "signals": [
                    {
                        "name": s.name,
                        "type": s.gql_type,
                        "unit": s.unit,
                        "privilege": s.privilege,
                        "agg": s.default_agg,
                    }
                    for s in sigs.values()
                ]
            }
        )


def _fluence_app() -> typer.Typer:
    from pipelines import _fluence_cmd

    sub = typer.Typer(
        name="fluence",
        rich_markup_mode=None,
        help="The function gateway on Fluence: show or delete what `depin publish --target fluence` created.",
        no_args_is_help=True,
    )
    sub.command("status")(_fluence_cmd.status)
    sub.command("down")(_fluence_cmd.down)
    return sub


def _worker_app() -> typer.Typer:
    from pipelines import _nodes_cmd, _worker_cmd

    sub = typer.Typer(
        name="worker",
        rich_markup_mode=None,
        help="GPU workers: run the agent on a GPU node, register nodes, quote and reap rented instances.",
        no_args_is_help=True,
    )
    sub.command("serve")(_worker_cmd.serve)
    for fn in (
        _nodes_cmd.register,
        _nodes_cmd.nodes,
        _nodes_cmd.remove,
        _nodes_cmd.quote,
        _nodes_cmd.reap,
        _nodes_cmd.script,
    ):
        sub.command(fn.__name__)(fn)
    return sub


app.add_typer(_fluence_app())
app.add_typer(_worker_app())


def main() -> None:
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


if __name__ == "__main__":
    main()
