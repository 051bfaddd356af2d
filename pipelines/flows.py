"""The Prefect flows: ingest → train → evaluate → publish, and batch scoring.

Thin: the work is in ``pipelines._steps`` (plain functions, tested directly), wrapped as tasks in
``pipelines._tasks``. Each flow takes one pydantic parameter model (a form in the UI; a dict works too) and
returns a small pydantic result (persisted as JSON). From Python::

    from pipelines import train_and_publish, TrainAndPublishParams, IngestParams
    run = train_and_publish(TrainAndPublishParams(ingest=IngestParams(credentials="creds.json", since="2d")))
    print(run.function_url, run.metrics["mae"], run.baseline["baseline_mae"])
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.concurrency.sync import concurrency
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from connectors.dimo.client import VehicleInfo
from connectors.dimo.location import TableLocation
from connectors.dimo.settings import DimoSettings
from depin_core.errors import ConfigError
from pipelines import _steps as S
from pipelines import _tasks as T
from pipelines import fleet_rate, shards
from pipelines.blocks import resolve_dimo_settings
from pipelines.params import (
    DEFAULT_DATASET,
    DIMO_CONCURRENCY_LIMIT,
    INGEST_WORKERS,
    IngestParams,
    PublishParams,
    ScoreParams,
    TrainAndPublishParams,
    TrainParams,
)
from pipelines.results import (
    BatchReport,
    IngestResult,
    PublishFunctionResult,
    ScoreResult,
    TrainAndPublishResult,
    TrainResult,
)

_RESULTS: dict[str, Any] = {"persist_result": True, "result_serializer": "json"}
# IngestResult count ← BatchReport field
_COUNTS = {
    "new_rows": "rows",
    "vehicles_ingested": "vehicles",
    "up_to_date": "up_to_date",
    "requests": "requests",
    "retries": "retries",
}


def _label(batch: list[VehicleInfo]) -> str:
    first, last = batch[0].token_id, batch[-1].token_id
    return f"{first}" if len(batch) == 1 else f"{first}-to-{last}"


@flow(
    name="ingest-telemetry",
    description="DIMO telemetry → Parquet dataset, incrementally (per-vehicle watermarks), in vehicle batches.",
    task_runner=ThreadPoolTaskRunner(max_workers=INGEST_WORKERS),  # type: ignore[arg-type]  # Prefect types it invariantly
    **_RESULTS,
)
def ingest_telemetry(params: IngestParams = IngestParams()) -> IngestResult:
    """Discover the shared vehicles and ingest them in batches (``INGEST_WORKERS`` tasks at once, sharing the
    DIMO request rate) while holding one slot of the ``dimo-api`` global concurrency limit (non-strict: without
    the limit it runs, with a warning); report progress as batches finish; end with a per-vehicle table.

    With ``shards > 1`` the vehicles are split into child runs of ``shard_deployment`` instead, run by the
    pool's workers under one fleet-wide DIMO rate limit (``pipelines.shards``, ``pipelines.fleet_rate``)."""
    log = get_run_logger()
    started = time.perf_counter()
    window = S.resolve_window(params)
    signals = S.resolve_signal_names(params)
    settings, source = resolve_dimo_settings(params.credentials, params.credentials_block)
    log.info("DIMO %s settings from %s", settings.environment, source)
    fleet = params.rate_limit_scope == "fleet" or params.shards > 1
    if fleet:
        rate = S.request_rate(settings, params)
        if changed := fleet_rate.ensure_limits(rate):
            log.info("fleet-wide DIMO rate limits %s set to %g requests/s", ", ".join(changed), rate)
    if params.shards > 1:
        # One slot of dimo-api for the whole sharded run: its shards share the fleet-wide rate limit instead.
        with concurrency(DIMO_CONCURRENCY_LIMIT, occupy=1, strict=False):
            vehicles = T.discover_vehicles(settings, params.vehicles, fleet=True)
            shard_runs, reports = _run_shards(params, settings, window, signals, vehicles)
        errors: list[BaseException] = []
    else:
        # One slot of the global limit per ingestion run (not per task): each acquisition is a database write,
        # and on a SQLite server it contends with the task-run recorder (measured: ~2 s client backoffs each).
        # A shard (fleet scope) takes none: the fleet-wide rate limit paces it, its parent holds the slot.
        slot = nullcontext() if fleet else concurrency(DIMO_CONCURRENCY_LIMIT, occupy=1, strict=False)
        with slot:
            vehicles = T.discover_vehicles(settings, params.vehicles, fleet=fleet)
            reports, errors = _ingest_batches(params, settings, window, signals, vehicles, fleet)
        shard_runs = []

    info = T.dataset_info(str(params.dataset), with_hash=params.report)
    new_rows = {t: n for r in reports for t, n in r.per_vehicle.items()}
    skipped = [s for r in reports for s in r.skipped]
    totals = {
        count: sum(getattr(r, batch) for r in reports)
        + sum(s.result.get(count, 0) for s in shard_runs if not s.in_parent)  # its rows are in `reports`
        for count, batch in _COUNTS.items()
    }
    if shard_runs:
        create_table_artifact(
            table=[s.row() for s in shard_runs],
            key="ingest-shards",
            description=f"{len(shard_runs)} shards of {len(vehicles)} vehicles: their runs and rows",
        )
    elif params.report:
        create_table_artifact(
            table=S.vehicle_table(params.dataset, new_rows, skipped),
            key="ingest-vehicles",
            description=f"{info.rows:,} rows, {info.vehicles} vehicles in {params.dataset} ({info.interval} buckets)",
        )
    if params.report:  # reads the whole table: once per sharded ingest (its parent), not per shard
        create_markdown_artifact(
            markdown=S.ingest_markdown(info, totals["new_rows"], skipped),
            key="ingest-report",
            description=f"{info.rows:,} rows, {info.vehicles} vehicles: tracks and rows per vehicle-hour",
        )
    result = IngestResult(
        dataset=info,
        **totals,
        skipped=skipped,
        since=window.since.isoformat(),
        until=window.until.isoformat(),
        interval=params.interval,
        seconds=round(time.perf_counter() - started, 3),
        shards=[s.row() for s in shard_runs],
    )
    # what a sharded parent reads back (workers share no disk; the Prefect server is what they share)
    create_table_artifact(table=[result.shard_summary()], key=shards.RESULT_ARTIFACT)
    if errors:
        raise errors[0]
    if failed := [s for s in shard_runs if not s.ok]:
        raise shards.ShardsFailed(failed)
    return result


def _ingest_batches(
    params: IngestParams,
    settings: DimoSettings,
    window: S.Window,
    signals: list[str] | None,
    vehicles: list[VehicleInfo],
    fleet: bool,
    track: bool = True,
) -> tuple[list[BatchReport], list[BaseException]]:
    """Ingest ``vehicles`` here, in batches of tasks; progress in the ``ingest-progress`` artifact (``track``)."""
    log = get_run_logger()
    batches = S.plan_batches(vehicles, params.batch_size)
    task_settings = S.batch_settings(settings, params)
    log.info("%d vehicles in %d batches, %s → %s", len(vehicles), len(batches), window.since, window.until)
    progress = _progress_artifact(f"ingest: share of {len(vehicles)} vehicles done") if track else None
    futures = {
        T.ingest_batch.submit(task_settings, str(params.dataset), window, b, signals, _label(b), fleet): b
        for b in batches
    }
    reports: list[BatchReport] = []
    errors: list[BaseException] = []
    done = 0
    for future in as_completed(list(futures)):
        outcome = future.result(raise_on_failure=False)
        if isinstance(outcome, BaseException):
            errors.append(outcome)
        else:
            reports.append(outcome)
        done += len(futures[future])
        if progress is not None:
            update_progress_artifact(progress, progress=100.0 * done / len(vehicles))
    if not batches and progress is not None:
        update_progress_artifact(progress, progress=100.0)
    return reports, errors


def _run_shards(
    params: IngestParams,
    settings: DimoSettings,
    window: S.Window,
    signals: list[str] | None,
    vehicles: list[VehicleInfo],
) -> tuple[list[shards.ShardRun], list[BatchReport]]:
    """Split ``vehicles`` into ``params.shards`` shards: the first non-empty one is ingested here, the others
    are child runs of ``params.shard_deployment``, waited for (crashed ones are rescheduled); progress in the
    ``ingest-progress`` artifact as shards finish. Returns every shard and this run's own batch reports.

    The parent ingests a shard itself because the license's rate would otherwise sit unused while the
    children's processes start (interpreter, imports, flow load: about 10 s for 4 at once on 2 cores,
    measured in ``bench/fanout.py``): it has the fleet-wide rate to itself until they join."""
    log = get_run_logger()
    parent = FlowRunContext.get()
    if parent is None or parent.flow_run is None:
        raise ConfigError("shards: a sharded ingest must run as a Prefect flow run (it starts child runs)")
    if TableLocation.of(params.dataset, storage_options={}).is_local:
        log.warning(
            "shards: the dataset %s is a local path; shards run by workers on other hosts write their own "
            "copies. Put it on object storage (s3://bucket/prefix) when the workers are on several machines",
            params.dataset,
        )
    parts = shards.split([v.token_id for v in vehicles], params.shards)
    own = next((i for i, ids in enumerate(parts) if ids), None)
    # every shard asks for the same buckets, also when it is run again later
    pinned = {"since": window.since.isoformat(), "until": window.until.isoformat()}

    def child_params(_: int, ids: list[int]) -> dict[str, Any]:
        return {
            "params": {
                **params.model_dump(mode="json"),
                **pinned,
                "vehicles": ids,
                "shards": 1,
                "rate_limit_scope": "fleet",
                "report": False,
            }
        }

    children = [[] if i == own else ids for i, ids in enumerate(parts)]  # an empty shard starts no run
    runs = shards.start_shards(params.shard_deployment, parent.flow_run.id, children, child_params)
    total = len(runs) + (own is not None)
    log.info(
        "%d vehicles in %d shards (%s): shard %s here, the others → %s",
        len(vehicles),
        total,
        ", ".join(str(len(ids)) for ids in parts if ids),
        own,
        params.shard_deployment,
    )
    progress = _progress_artifact(f"ingest: share of {total} shards done")
    finished: set[int] = set()

    def on_change(run: shards.ShardRun) -> None:
        log.info("shard %d (%s): %s %s", run.index, run.flow_run_name, run.state.title(), run.message)
        if run.state in shards.FINAL_STATES:
            finished.add(run.index)
            update_progress_artifact(progress, progress=100.0 * len(finished) / max(total, 1))

    reports: list[BatchReport] = []
    here: shards.ShardRun | None = None
    if own is not None:
        by_id = {v.token_id: v for v in vehicles}
        here = shards.ShardRun(own, parts[own], parent.flow_run.id, parent.flow_run.name, in_parent=True)
        started = time.perf_counter()
        reports, errors = _ingest_batches(
            params, settings, window, signals, [by_id[t] for t in parts[own]], fleet=True, track=False
        )
        here.state = shards.FINAL_OK if not errors else "FAILED"
        here.message = "; ".join(str(e)[:200] for e in errors[:3])
        here.result = {"new_rows": sum(r.rows for r in reports), "requests": sum(r.requests for r in reports),
                       "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip
        on_change(here)
    shards.wait_shards(runs, on_change=on_change)
    if here is None:  # no vehicles
        update_progress_artifact(progress, progress=100.0)
        return runs, reports
    return sorted([*runs, here], key=lambda r: r.index), reports


def _progress_artifact(description: str) -> UUID:
    # called from a sync flow: the UUID (Prefect types it as UUID | its async twin's coroutine)
    return cast(UUID, create_progress_artifact(progress=0.0, key="ingest-progress", description=description))


@flow(
    name="train-model",
    description="Train a model as a job through the runner chain; refuse it unless it beats its naive baseline.",
    **_RESULTS,
)
def train_model(params: TrainParams = TrainParams()) -> TrainResult:
    """Build and run the training job (logs stream into this run), record the held-out metrics as table
    and markdown artifacts, and fail with ``PermanentError`` when the model is worse than the baseline."""
    dataset = params.dataset or DEFAULT_DATASET
    result = T.train_job(params, str(dataset))
    create_table_artifact(
        table=S.metrics_rows(result),
        key=f"{result.family}-metrics",
        description=f"held-out metrics of {result.model_dir}",
    )
    create_markdown_artifact(
        markdown=S.metrics_markdown(result), key=f"{result.family}-model-report", description="model quality"
    )
    create_table_artifact(
        table=S.attempts_rows(result.attempts),
        key=f"{result.family}-runner-attempts",
        description="runner chain: every attempt (runner, node, reason, verification, cost, seconds)",
    )
    S.require_better(result)
    return result


@flow(
    name="publish-function",
    description="Bundle, sign and publish a model; move the alias only after a smoke call succeeds.",
    **_RESULTS,
)
def publish_function(params: PublishParams = PublishParams()) -> PublishFunctionResult:
    if params.model_dir is None:
        raise ConfigError("publish: model_dir is required (a model artifact directory from train-model)")
    name = S.function_name(params, params.model_dir)
    published = T.publish_version(params, str(params.model_dir), name)
    n, outputs = T.smoke_invoke(params, name, published["version"])
    aliases = T.move_alias(params, name, published["version"])
    result = S.publish_result(params, published, n, outputs, aliases)
    ref = f"{result.name}@{result.alias or result.version}"
    create_link_artifact(
        link=result.function_url, link_text=f"invoke {ref}", key="function-url", description="POST JSON rows"
    )
    create_link_artifact(
        link=result.manifest_url,
        link_text=f"manifest of {result.name}@{result.version}",
        key="function-manifest",
        description=f"sha256 {result.manifest_sha256}, signed by {result.publisher}",
    )
    return result


@flow(
    name="batch-score",
    description="Score a telemetry dataset with a model or published function.",
    **_RESULTS,
)
def batch_score(params: ScoreParams = ScoreParams()) -> ScoreResult:
    result = T.score_job(params)
    create_markdown_artifact(
        markdown=(
            f"# scores\n\n{result.rows} rows of `{result.family}` predictions → `{result.output}` "
            f"(sha256 `{result.sha256[:16]}…`) from model `{result.model}`"
        ),
        key="batch-scores",
    )
    return result


@flow(
    name="train-and-publish",
    description="Ingest DIMO telemetry, train, evaluate against the baseline, publish the function.",
    **_RESULTS,
)
def train_and_publish(params: TrainAndPublishParams = TrainAndPublishParams()) -> TrainAndPublishResult:
    """The end-to-end flow; returns the dataset, the model's metrics and baseline, the function URL."""
    stages: dict[str, float] = {}
    t = time.perf_counter()
    ingested: IngestResult | None = None
    if params.skip_ingest:
        dataset = params.train.dataset or params.ingest.dataset
    else:
        ingested = ingest_telemetry(params.ingest)
        dataset = params.train.dataset or ingested.dataset.path
    stages["ingest"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    trained = train_model(params.train.model_copy(update={"dataset": dataset}))
    stages["train"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    publish = params.publish
    if publish.model_dir is None:
        publish = publish.model_copy(update={"model_dir": Path(trained.model_dir)})
    published = publish_function(publish)
    stages["publish"] = round(time.perf_counter() - t, 3)

    info = ingested.dataset if ingested is not None else T.dataset_info(str(dataset))
    result = TrainAndPublishResult(
        dataset=str(dataset),
        dataset_sha256=trained.dataset_sha256,
        dataset_version=trained.dataset_version,
        rows=info.rows,
        vehicles=info.vehicles,
        new_rows=ingested.new_rows if ingested else 0,
        family=trained.family,
        model_dir=trained.model_dir,
        model_sha256=trained.model_sha256,
        metrics=trained.metrics,
        baseline=trained.baseline,
        function_name=published.name,
        function_version=published.version,
        function_alias=published.alias,
        function_url=published.function_url,
        manifest_url=published.manifest_url,
        stage_seconds=stages,
        ingest=ingested,
        train=trained,
        publish=published,
    )
    create_markdown_artifact(
        markdown=S.run_summary_markdown(result),
        key="train-and-publish-summary",
        description="this run, end to end",
    )
    return result


__all__ = ["batch_score", "ingest_telemetry", "publish_function", "train_and_publish", "train_model"]
