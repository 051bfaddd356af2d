"""Run the emulator: build the fleet, bind a socket, serve with uvicorn; or run it as a child process."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvicorn

from connectors.dimo.emulator.app import create_app
from connectors.dimo.emulator.faults import FaultSpec
from connectors.dimo.emulator.fleet import Fleet
from connectors.dimo.emulator.state import EmulatorConfig, EmulatorState, make_license
from depin_core.fs import atomic_write_bytes
from depin_core.net import free_port, listen_socket, url_host
from depin_core.proc import ServerProcess


def build_fleet(config: EmulatorConfig) -> Fleet:
    """The fleet ``config`` asks for: a replay file, or simulated vehicles plus optional CMAP vehicles."""
    from connectors.dimo.emulator.sim import simulator

    license = make_license(config.seed)
    end = (config.end or datetime.now(UTC)).astimezone(UTC)
    if config.replay is not None:
        from connectors.dimo.emulator import replay

        return replay.replay_fleet(license, config.replay)
    fleet = simulator.simulate_fleet(
        license,
        vehicles=config.vehicles,
        days=config.days,
        seed=config.seed,
        end=end,
        restricted_fraction=config.restricted_fraction,
        idle_fraction=config.idle_fraction,
        cache_bytes=int(config.history_cache_mb * 2**20),
    )
    if config.cmap_dir is not None:
        from connectors.dimo.emulator import replay

        fleet = replay.add_cmap_vehicles(fleet, config.cmap_dir, seed=config.seed)
    return fleet


def credentials_document(fleet: Fleet, base_url: str) -> dict[str, str]:
    """The ``--credentials-out`` JSON: a license whose signer may read every shared vehicle."""
    lic = fleet.license
    return {
        "client_id": lic.client_id,
        "domain": lic.domain,
        "private_key": lic.private_key,
        "auth_url": base_url,
        "token_exchange_url": base_url,
        "identity_url": f"{base_url}/identity/query",
        "telemetry_url": f"{base_url}/telemetry/query",
    }


def build_state(config: EmulatorConfig, public_url: str) -> EmulatorState:
    return EmulatorState(
        fleet=build_fleet(config),
        public_url=public_url,
        dev_jwt_ttl=timedelta(seconds=config.dev_jwt_ttl_s),
        vehicle_jwt_ttl=timedelta(seconds=config.vehicle_jwt_ttl_s),
        faults=FaultSpec.parse(config.faults),
        exchange_legacy_only=config.exchange_legacy_only,
        rate_limit_per_s=config.rate_limit_per_s,
        rate_limit_per=config.rate_limit_per,
    )


def write_outputs(config: EmulatorConfig, state: EmulatorState) -> None:
    """Write the credentials file and the ground-truth tables, when asked for."""
    if config.credentials_out:
        doc = credentials_document(state.fleet, state.public_url)
        atomic_write_bytes(config.credentials_out, json.dumps(doc, indent=2).encode())
        os.chmod(config.credentials_out, 0o600)
    if config.ground_truth_out:
        out = Path(config.ground_truth_out)
        out.mkdir(parents=True, exist_ok=True)
        state.fleet.truth_vehicles.write_parquet(out / "vehicles.parquet")
        state.fleet.truth_faults.write_parquet(out / "faults.parquet")


def serve(config: EmulatorConfig, *, on_ready: Any = None) -> None:
    """Build the fleet and serve until interrupted (Ctrl-C / SIGTERM)."""
    sock = listen_socket(config.host, config.port)
    port = sock.getsockname()[1]
    state = build_state(config, f"http://{url_host(config.host)}:{port}")
    write_outputs(config, state)
    server = uvicorn.Server(
        uvicorn.Config(create_app(state), log_level=config.log_level, access_log=False, lifespan="off")
    )
    if on_ready:
        on_ready(state)
    asyncio.run(server.serve(sockets=[sock]))


class EmulatorProcess(ServerProcess):
    """The emulator in a child process, for tests, benchmarks and the demo; ready once it has written its
    credentials file (``auth_url``: its URL) and ``/healthz`` answers. Always stopped on exit; its output goes
    to ``log_path``, whose end a failed start shows. ``cpu``: pin it to that CPU.

    >>> with EmulatorProcess(EmulatorConfig(vehicles=5, days=2)) as emu:
    ...     emu.credentials["telemetry_url"]
    """

    def __init__(
        self, config: EmulatorConfig, *, startup_timeout: float = 120.0, cpu: int | None = None
    ) -> None:
        super().__init__("emulator", startup_timeout=startup_timeout, ready_key="auth_url", cpu=cpu)
        self.ready_path = Path(config.credentials_out or self.ready_path.with_name("credentials.json"))
        # a child process gets a free port unless the caller chose one explicitly
        explicit = "port" in config.model_fields_set and config.port
        port = config.port if explicit else free_port(config.host)
        self.config = config.model_copy(update={"credentials_out": self.ready_path, "port": port})

    @property
    def credentials(self) -> dict[str, str]:
        """The credentials file's document (empty before ``start``)."""
        return self.ready

    @property
    def base_url(self) -> str:
        return self.url

    @property
    def credentials_path(self) -> Path:
        return self.ready_path

    def start(self) -> EmulatorProcess:
        cmd = [
            sys.executable,
            "-m",
            "connectors.dimo.emulator",
            "--config-json",
            self.config.model_dump_json(),
        ]
        self._launch(cmd, {}, [("/healthz", "emulator did not become ready")], timeout=1)
        return self
