"""``depin emulator``: the DIMO-compatible emulator in the foreground."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer

from pipelines.cli._output import say


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
    rate_limit_per: Annotated[
        str,
        typer.Option(
            help="whose requests share a bucket: client-host (as DIMO documents) or license (all clients)"
        ),
    ] = "client-host",
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
        rate_limit_per=rate_limit_per,  # checked by the model
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
