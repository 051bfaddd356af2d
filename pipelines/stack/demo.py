"""``make demo`` / ``depin demo``: the main job on one machine, end to end.

1. start, side by side: the DIMO emulator (a simulated fleet), a GPU worker agent (``depin worker serve``, the
   process a rented GPU node runs; here on loopback with a fresh token), the function gateway on the demo's
   registry and a Prefect server (``PREFECT_HOME`` :data:`depin_core.paths.PREFECT_HOME`, so the runs show
   later in ``depin up``'s UI; the server of a running ``depin up`` or ``PREFECT_API_URL`` is used instead when
   there is one);
2. run the ``train_and_publish`` flow: ingest the fleet through the real DIMO client over HTTP, train the
   range model as a job dispatched through the runner chain ``["agent:<the worker>", "local"]`` (inputs uploaded
   as content-addressed blobs, the artifact downloaded and verified, the held-out metrics re-computed here
   before the result is trusted), evaluate it against its naive baseline, publish it as a signed function;
3. invoke the function once on the gateway with its manifest's example;
4. report a short summary and return the JSON summary (``rows``, ``vehicles``, ``metrics``, ``baseline``,
   ``function_url``, ``invoke_result``, ``stage_seconds``, …), also written to ``<out>/summary.json``.

The fleet is fixed (seed, size and end of history), so every run sees the same data and the same model
quality. Only the signals the range model reads are ingested. Progress lines go to the ``say`` callback
(the CLI prints them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from depin_core.fs import atomic_write_bytes
from depin_core.net import free_port
from depin_core.plots import quantity, sig

SUMMARY_FILE = "summary.json"
# The demo fleet: 30 simulated vehicles, a week of history ending at a fixed time (the fleet and quality of
# bench/quality.py; the range model's held-out MAE is ~0.26x its fleet-mean baseline on it).
FLEET_END = datetime(2026, 11, 25, tzinfo=UTC)
FLEET = {"vehicles": 30, "days": 7.0, "seed": 3}
FUNCTION = "range"
ALIAS = "prod"


class Say(Protocol):
    """Where the demo's progress lines go: one line per call, each part a ``str`` or ``(text, style)``
    (a style such as ``"bold"`` for a console that shows them)."""

    def __call__(self, *parts: str | tuple[str, str]) -> None: ...


def _silent(*parts: str | tuple[str, str]) -> None:
    pass


def range_signals() -> list[str]:
    """The DIMO signals the range model reads (the demo ingests only these)."""
    from gpu_jobs.models import features as F

    return [F.SPEED, F.ODOMETER, F.IGNITION, F.AIR, F.POWERTRAIN, F.SOC, F.GROSS, F.SOH, F.POWER, F.CHARGING]


def demo_params(
    *,
    credentials: Path | None,
    days: float,
    end: datetime,
    out: Path,
    gateway_url: str,
    registry: Path | None = None,
    runners: list[str] | None = None,
) -> Any:
    """``TrainAndPublishParams`` of the demo: the fleet's whole history, the range model, the local registry."""
    from pipelines.params import IngestParams, PublishParams, TrainAndPublishParams, TrainParams

    since = end - timedelta(days=days)
    return TrainAndPublishParams(
        ingest=IngestParams(
            dataset=out / "dataset",
            since=since.isoformat(),
            until=end.isoformat(),
            signals=range_signals(),
            credentials=credentials,
            rate_limit_per_s=0,  # the local emulator has no rate limit to respect
        ),
        train=TrainParams(out=out / "models", jobs_dir=out / "jobs", runners=runners or ["local"]),
        publish=PublishParams(
            name=FUNCTION, alias=ALIAS, registry=registry or out / "registry", gateway_url=gateway_url
        ),
    )


def _prefect_api(out: Path, stack: ExitStack) -> tuple[str, Any]:
    """The Prefect API to run against: PREFECT_API_URL, a running ``depin up``, else a server started now
    (returns its URL and a callable that waits until it is healthy)."""
    from depin_core.proc import Child
    from pipelines.stack.up import PREFECT_HOME, http_ok, prefect_server_command, read_state, wait_ready

    if api := os.environ.get("PREFECT_API_URL", "").strip():
        return api.rstrip("/"), lambda: None
    if (state := read_state()) is not None and state.get("ready"):
        return state["urls"]["api"], lambda: None
    cmd, env, api = prefect_server_command(
        "127.0.0.1", free_port(), Path.cwd() / PREFECT_HOME, dict(os.environ)
    )
    child = Child("prefect-server", cmd, log_path=out / "prefect-server.log", env=env, cwd=Path.cwd()).start()
    stack.callback(child.stop)
    return api, lambda: wait_ready(
        child, "the Prefect server", lambda: http_ok(f"{api}/health"), timeout_s=180
    )


def _start_services(
    out: Path, vehicles: int, days: float, seed: int, stack: ExitStack
) -> tuple[Any, Any, Any, str]:
    """Emulator, worker agent, gateway and Prefect server, started side by side: (emulator, agent, gateway,
    Prefect API URL). The agent's token is a fresh one in ``DEPIN_AGENT_TOKEN`` (how the runner chain finds
    the token of an ``agent:<url>`` entry); it is never printed. The agent serves HTTPS with a certificate made
    here, pinned by its fingerprint in ``DEPIN_AGENT_TLS_FINGERPRINT``."""
    from connectors.dimo.emulator.server import EmulatorProcess
    from connectors.dimo.emulator.state import EmulatorConfig
    from depin_core.tls import make_certificate
    from gpu_jobs.agent.process import AgentProcess
    from gpu_jobs.providers import new_agent_token
    from gpu_jobs.settings import AGENT_FINGERPRINT_ENV, AGENT_TOKEN_ENV
    from pipelines.stack.gateway import serve_settings
    from serving.server import GatewayProcess

    api, wait_prefect = _prefect_api(out, stack)
    emu = EmulatorProcess(
        EmulatorConfig(
            vehicles=vehicles, days=days, seed=seed, end=FLEET_END, ground_truth_out=out / "ground_truth"
        )
    )
    settings, _notes, _key = serve_settings("127.0.0.1", 0, out / "registry")
    del _key  # a new admin key stays in its 0600 file; the demo never prints it
    gw = GatewayProcess(settings)
    token = new_agent_token()
    os.environ[AGENT_TOKEN_ENV] = token.get_secret_value()
    tls = make_certificate()
    os.environ[AGENT_FINGERPRINT_ENV] = tls.fingerprint
    agent = AgentProcess(out / "agent", token, tls=tls)
    errors: list[BaseException] = []

    def start(proc: Any) -> None:
        try:
            proc.start()
        except BaseException as exc:  # re-raised below, in the caller's thread
            errors.append(exc)

    stack.callback(emu.close)
    stack.callback(gw.close)
    stack.callback(agent.stop)
    threads = [threading.Thread(target=start, args=(p,)) for p in (emu, gw, agent)]
    for t in threads:
        t.start()
    try:
        wait_prefect()
    finally:  # never stop a half-started child under a starting thread
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return emu, agent, gw, api


def invoke_once(gateway_url: str, name: str, version: str, timeout_s: float = 60) -> dict[str, Any]:
    """Invoke ``name@prod`` once on the gateway with the example of ``version``'s manifest (waiting until the
    gateway has loaded it); returns the inputs, outputs and latency."""
    from serving.bundle import parse_manifest
    from serving.client import GatewayClient, GatewayRefused

    with GatewayClient(gateway_url, retries=3, timeout=60) as client:
        deadline = time.monotonic() + timeout_s
        while True:  # the gateway notices a registry change within its poll interval (1 s)
            try:
                example = list(parse_manifest(client.manifest_bytes(name, version)).example)
                t0 = time.perf_counter()
                doc, _ = client.invoke(f"{name}@{ALIAS}", example)
                break
            except GatewayRefused as exc:
                if exc.status != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        latency_ms = round((time.perf_counter() - t0) * 1e3, 2)
    return {
        "function": doc["function"],
        "version": doc["version"],
        "inputs": example,
        "outputs": doc["outputs"],
        "latency_ms": latency_ms,
    }


def _drain_prefect() -> None:
    """Send the buffered run logs and events while the Prefect server still runs (else the exit waits on
    retries against a stopped server)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    with contextlib.suppress(RuntimeError):  # never started
        APILogWorker.instance().drain()
    EventsWorker.drain_all()


def _quiet_prefect_console() -> None:
    """Flow-run logs go to the Prefect API (and UI) in full; the demo's console shows warnings only."""
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def run_demo(*, vehicles: int, days: float, seed: int, out: Path, say: Say = _silent) -> dict[str, Any]:
    """Run the demo and return its JSON summary (also written to ``out/summary.json``); progress lines go to
    ``say``."""
    out = out.resolve()
    for sub in ("dataset", "models", "jobs", "registry", "ground_truth", "agent"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    started = t = time.perf_counter()
    say(
        ("1/4", "bold"),
        f" starting the DIMO emulator ({vehicles} simulated vehicles, {days:g} days), a GPU worker "
        "agent, the function gateway (and a Prefect server unless depin up or PREFECT_API_URL provides one)",
    )
    with ExitStack() as stack:
        emu, agent, gw, api = _start_services(out, vehicles, days, seed, stack)
        stages["start_services"] = round(time.perf_counter() - t, 2)
        say(
            f"    emulator {emu.base_url}, worker agent {agent.url}, gateway {gw.base_url}, Prefect API {api} "
            f"({stages['start_services']:.1f}s)"
        )

        say(
            ("2/4", "bold"),
            " train_and_publish: ingest → train on the worker agent (verified here) → evaluate → "
            "publish (Prefect flow)",
        )
        os.environ["PREFECT_API_URL"] = api  # before prefect is imported (pipelines.flows)
        _quiet_prefect_console()
        from pipelines.flows import train_and_publish
        from pipelines.params import DIMO_API_SLOTS
        from pipelines.stack.up import ensure_concurrency_limit

        for handler in logging.getLogger().handlers:  # run logs are in the Prefect API; here warnings only
            handler.setLevel(max(handler.level, logging.WARNING))
        ensure_concurrency_limit(api, DIMO_API_SLOTS)
        stack.callback(_drain_prefect)  # runs before the services stop (LIFO)

        params = demo_params(
            credentials=emu.credentials_path,
            days=days,
            end=FLEET_END,
            out=out,
            gateway_url=gw.base_url,
            runners=[f"agent:{agent.url}", "local"],
        )
        t = time.perf_counter()
        result = train_and_publish(params)
        stages["train_and_publish"] = round(time.perf_counter() - t, 2)
        for stage, seconds in result.stage_seconds.items():
            stages[stage] = round(seconds, 2)
        say(
            f"    {result.rows:,} rows from {result.vehicles} vehicles; {result.family} model "
            f"{_metric_line(result.metrics, result.baseline)}, trained on {_attempts_line(result.train.attempts)}; "
            f"published {result.function_name}@"
            f"{result.function_version} ({stages['train_and_publish']:.1f}s)"
        )

        say(("3/4", "bold"), f" invoking {FUNCTION}@{ALIAS} once on the gateway")
        t = time.perf_counter()
        invoked = invoke_once(gw.base_url, result.function_name, result.function_version)
        stages["invoke"] = round(time.perf_counter() - t, 2)
    stages["total"] = round(time.perf_counter() - started, 2)

    say(("4/4", "bold"), " summary")
    summary: dict[str, Any] = {
        "rows": result.rows,
        "vehicles": result.vehicles,
        "family": result.family,
        "metrics": result.metrics,
        "baseline": result.baseline,
        "function_url": result.function_url,
        "manifest_url": result.manifest_url,
        "function": f"{result.function_name}@{result.function_version}",
        "invoke_result": invoked,
        "dataset": result.dataset,
        "model_dir": result.model_dir,
        "runner": result.train.runner,
        "attempts": result.train.attempts,
        "prefect_api": api,
        "stage_seconds": stages,
    }
    atomic_write_bytes(out / SUMMARY_FILE, json.dumps(summary, indent=2, default=str).encode())
    first = invoked["outputs"][0] if invoked["outputs"] else {}
    say(
        "\n",
        ("demo done", "bold green"),
        f" in {stages['total']:.1f}s: {summary['rows']:,} rows × "
        f"{summary['vehicles']} vehicles → {result.family} model ({_metric_line(result.metrics, result.baseline)})"
        f" → {result.function_url}\n    invoke: {len(invoked['inputs'])} row(s) → {_outputs_line(first)} "
        f"in {invoked['latency_ms']:.1f} ms; summary → {out / SUMMARY_FILE}\n    plots: "
        f"{Path(result.model_dir) / 'plots'} (one page: depin report {result.model_dir} --dataset {result.dataset})",
    )
    return summary


def _attempts_line(attempts: list[dict[str, Any]]) -> str:
    """``agent:http://… (verified)`` — and the attempts that failed before it, if any."""
    parts = []
    for a in attempts:
        if a.get("state") == "SUCCEEDED":
            parts.append(f"{a.get('runner')}" + (" (verified here)" if a.get("verified") else ""))
        else:
            parts.append(f"{a.get('runner')} failed: {a.get('reason')}")
    return "; then ".join(parts) or "?"


OUTPUT_UNITS = {"kwh_per_100km": "kWh/100 km", "range_km": "km"}  # the range function's output fields


def _outputs_line(row: dict[str, Any]) -> str:
    """One output row for people: ``kwh_per_100km 20.1 kWh/100 km, range_km 239 km`` (the JSON keeps all)."""
    return ", ".join(
        f"{k} {quantity(v, OUTPUT_UNITS.get(k)) if isinstance(v, int | float) else v}" for k, v in row.items()
    )


def _metric_line(metrics: dict[str, Any], baseline: dict[str, Any]) -> str:
    mae, base = metrics.get("mae"), baseline.get("baseline_mae", metrics.get("baseline_mae"))
    if isinstance(mae, int | float) and isinstance(base, int | float):
        return f"held-out MAE {quantity(mae, 'kWh/100 km')} vs baseline {quantity(base, 'kWh/100 km')}"
    return ", ".join(f"{k}={sig(v)}" for k, v in list(metrics.items())[:4] if isinstance(v, int | float))


__all__ = ["FLEET", "FLEET_END", "Say", "demo_params", "invoke_once", "range_signals", "run_demo"]
