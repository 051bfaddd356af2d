"""Prefect overhead: ``train_and_publish`` as a flow vs the same steps called as plain functions, same run.

One process, one DIMO emulator process (a simulated fleet), a Prefect test server (temporary SQLite, all
default services on — what a local run pays; started before timing, its start reported apart):
1. warm-up: each side once, untimed (imports, torch, first-run registration);
2. ``--repeat`` rounds, alternating: the plain steps (``pipelines._steps``: discover → ingest batches on a
   thread pool of the same width as the flow's task runner → dataset summary → per-vehicle table → training
   job through ``LocalRunner`` → quality bar → publish → smoke call → alias), then the flow
   (``pipelines.flows.train_and_publish``: the same functions as tasks and subflows, plus artifacts, state
   tracking, logging to the API). Each round starts from an empty dataset, models directory and registry.
The best round of each side counts. Every run (warm-ups included) must produce the same outcome — rows,
dataset hash, function name, and the model artifact's files (weights, config and metrics sha256) — or the run
fails: the comparison is only fair when both sides did the same work. The function *version* is reported, not
compared: it is the content hash of the bundle, which holds the artifact's ``manifest.json``, and that file
records the training run's ``created_at`` and timings, so every run — even two plain ones — gets a new version.
Last stdout line, JSON: ``flow_s``, ``plain_s``, ``overhead_s`` (flow − plain), ``overhead_ratio`` (flow ÷
plain), per-stage seconds of both, ``server_start_s``, rows, device, ``flow_version``/``plain_version``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# before prefect is imported: this machine may be offline
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from connectors.dimo.emulator.server import EmulatorProcess
from connectors.dimo.emulator.state import EmulatorConfig
from pipelines import _steps as S
from pipelines.blocks import resolve_dimo_settings
from pipelines.params import (
    INGEST_WORKERS,
    IngestParams,
    PublishParams,
    TrainAndPublishParams,
    TrainParams,
)

END = datetime(2026, 11, 25, tzinfo=UTC)


def plain_train_and_publish(params: TrainAndPublishParams) -> tuple[dict[str, Any], dict[str, float]]:
    """The flow's steps as plain calls (the same functions the tasks wrap), timed by stage."""
    stages: dict[str, float] = {}
    t = time.perf_counter()
    ip = params.ingest
    window = S.resolve_window(ip)
    signals = S.resolve_signal_names(ip)
    settings, _ = resolve_dimo_settings(ip.credentials, None)
    vehicles = S.discover_vehicles(settings, ip.vehicles)
    batches = S.plan_batches(vehicles, ip.batch_size)
    per_task = S.batch_settings(settings, ip)
    with ThreadPoolExecutor(INGEST_WORKERS) as pool:
        reports = list(pool.map(lambda b: S.ingest_batch(per_task, ip.dataset, window, b, signals), batches))
    info = S.dataset_info(ip.dataset)
    S.vehicle_table(ip.dataset, {k: v for r in reports for k, v in r.per_vehicle.items()}, [])
    stages["ingest"] = time.perf_counter() - t

    t = time.perf_counter()
    tp = params.train.model_copy(update={"dataset": ip.dataset})
    trained = S.train_model_step(tp, ip.dataset)
    S.metrics_rows(trained), S.metrics_markdown(trained)
    S.require_better(trained)
    stages["train"] = time.perf_counter() - t

    t = time.perf_counter()
    pp = params.publish.model_copy(update={"model_dir": Path(trained.model_dir)})
    published = S.publish_function_step(pp, Path(trained.model_dir))
    stages["publish"] = time.perf_counter() - t
    out = outcome(
        info.rows, trained.dataset_sha256, Path(trained.model_dir), published.name, published.version
    )
    return {**out, "device": trained.device}, stages


def outcome(rows: int, dataset_sha256: str, model_dir: Path, function: str, version: str) -> dict[str, Any]:
    """What a run produced; every key but ``version`` must be the same for all runs (see the module doc)."""
    files = json.loads((model_dir / "manifest.json").read_text())["files"]
    return {
        "rows": rows,
        "dataset_sha256": dataset_sha256,
        "model_files": files,
        "function": function,
        "version": version,
    }


def require_same(reference: dict[str, Any], other: dict[str, Any], what: str) -> None:
    """Fail the run when ``other`` differs from ``reference`` in anything but the version."""
    diff = [k for k in reference if k not in ("version", "device") and reference[k] != other[k]]
    if diff:
        detail = "; ".join(f"{k}: {reference[k]!r} vs {other[k]!r}" for k in diff)
        raise SystemExit(
            f"bench failed: {what} produced a different outcome than the first plain run ({detail})"
        )


def flow_outcome(result: Any) -> dict[str, Any]:
    return outcome(
        result.rows,
        result.dataset_sha256,
        Path(result.model_dir),
        result.function_name,
        result.function_version,
    )


def run_params(
    work: Path, credentials: Path, days: float, epochs: int, batch_size: int
) -> TrainAndPublishParams:
    for sub in ("data", "models", "jobs", "registry"):
        shutil.rmtree(work / sub, ignore_errors=True)
    return TrainAndPublishParams(
        ingest=IngestParams(
            dataset=work / "data",
            credentials=credentials,
            since=(END - timedelta(days=days)).isoformat(),
            until=END.isoformat(),
            rate_limit_per_s=0,
            batch_size=batch_size,
        ),
        train=TrainParams(hyperparameters={"epochs": epochs}, out=work / "models", jobs_dir=work / "jobs"),
        publish=PublishParams(registry=work / "registry"),
    )


@contextlib.contextmanager
def prefect_backend(home: Path) -> Any:
    """A temporary Prefect server (default services) and the ``dimo-api`` limit ``depin up`` creates."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with (
        temporary_settings({PREFECT_HOME: home, PREFECT_LOCAL_STORAGE_PATH: home / "storage"}),
        prefect_test_harness(server_startup_timeout=120),
    ):
        with get_client(sync_client=True) as client:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="dimo-api", limit=1))
        yield


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vehicles", type=int, default=20)
    ap.add_argument("--days", type=float, default=3.0)
    ap.add_argument("--epochs", type=int, default=60, help="range model epochs")
    ap.add_argument("--batch-size", type=int, default=5, help="vehicles per ingestion task")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="depin-bench-pipeline-"))
    os.chdir(work)  # the publisher key and any default path land here, not in the checkout
    try:
        import logging

        logging.getLogger("prefect").setLevel(logging.WARNING)
        t = time.perf_counter()
        with prefect_backend(work / "prefect-home"):
            server_s = time.perf_counter() - t
            from pipelines.flows import train_and_publish

            config = EmulatorConfig(vehicles=args.vehicles, days=args.days, seed=5, end=END)
            with EmulatorProcess(config) as emu:
                creds = emu.credentials_path

                def params() -> TrainAndPublishParams:
                    return run_params(work, creds, args.days, args.epochs, args.batch_size)

                info, _ = plain_train_and_publish(params())  # warm-up; its outcome is the reference
                require_same(info, flow_outcome(train_and_publish(params())), "the warm-up flow")
                plain: list[tuple[float, dict[str, float]]] = []
                flows: list[tuple[float, dict[str, float]]] = []
                flow_version = ""
                for r in range(args.repeat):
                    p = params()
                    t = time.perf_counter()
                    plain_info, stages = plain_train_and_publish(p)
                    plain.append((time.perf_counter() - t, stages))
                    require_same(info, plain_info, f"plain round {r + 1}")
                    p = params()
                    t = time.perf_counter()
                    result = train_and_publish(p)
                    flows.append((time.perf_counter() - t, result.stage_seconds))
                    require_same(info, flow_outcome(result), f"flow round {r + 1}")
                    flow_version = result.function_version
                    print(
                        f"round {r + 1}: plain {plain[-1][0]:.2f}s, flow {flows[-1][0]:.2f}s", file=sys.stderr
                    )
    finally:
        os.chdir(ROOT)
        shutil.rmtree(work, ignore_errors=True)

    plain_s, plain_stages = min(plain, key=lambda x: x[0])
    flow_s, flow_stages = min(flows, key=lambda x: x[0])
    out = {
        "flow_s": round(flow_s, 3),
        "plain_s": round(plain_s, 3),
        "overhead_s": round(flow_s - plain_s, 3),
        "overhead_ratio": round(flow_s / plain_s, 3),
        "flow_stage_s": {k: round(v, 3) for k, v in flow_stages.items()},
        "plain_stage_s": {k: round(v, 3) for k, v in plain_stages.items()},
        "server_start_s": round(server_s, 2),
        "rows": info["rows"],
        "vehicles": args.vehicles,
        "days": args.days,
        "epochs": args.epochs,
        "repeat": args.repeat,
        "device": info["device"],
        "same_outcome": True,  # rows, dataset, function name and model files matched in every run
        "flow_version": flow_version,
        "plain_version": plain_info["version"],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
