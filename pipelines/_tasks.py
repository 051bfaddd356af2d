"""Prefect tasks: thin wrappers over ``pipelines._steps``. Only ``TransientError`` is retried; no task caches
or persists its result (results are small references held in memory). The ``dimo-api`` concurrency slot is
taken once per ingestion flow run (``pipelines.flows``), not per task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from connectors.dimo.client import VehicleInfo
from connectors.dimo.settings import DimoSettings
from depin_core.errors import TransientError
from pipelines import _steps as S
from pipelines import fleet_rate
from pipelines.params import PublishParams, ScoreParams, TrainParams
from pipelines.results import BatchReport, DatasetInfo, ScoreResult, TrainResult


def only_transient(task: Any, task_run: Any, state: Any) -> bool:
    """``retry_condition_fn``: retry only failures that may succeed on retry (``TransientError``)."""
    try:
        state.result()
    except TransientError:
        return True
    except BaseException:
        return False
    return False


_COMMON: dict[str, Any] = {"cache_policy": NO_CACHE, "retry_condition_fn": only_transient}


@task(name="discover-vehicles", retries=3, retry_delay_seconds=exponential_backoff(2), **_COMMON)
def discover_vehicles(
    settings: DimoSettings, wanted: list[int] | None, fleet: bool = False
) -> list[VehicleInfo]:
    return S.discover_vehicles(settings, wanted, admit=fleet_rate.admit if fleet else None)


@task(
    name="ingest-vehicles",
    task_run_name="ingest-{label}",
    retries=3,
    retry_delay_seconds=exponential_backoff(2),
    **_COMMON,
)
def ingest_batch(
    settings: DimoSettings,
    dataset: str,
    window: S.Window,
    vehicles: list[VehicleInfo],
    signals: list[str] | None,
    label: str,
    fleet: bool = False,
) -> BatchReport:
    log = get_run_logger()
    report = S.ingest_batch(
        settings,
        dataset,
        window,
        vehicles,
        signals,
        on_vehicle=lambda tid, rows: log.info("vehicle %d: %d rows", tid, rows),
        admit=fleet_rate.admit if fleet else None,
    )
    log.info(
        "%d rows from %d vehicles (%d up to date, %d skipped) in %d requests, %.1fs",
        report.rows,
        report.vehicles,
        report.up_to_date,
        len(report.skipped),
        report.requests,
        report.seconds,
    )
    return report


@task(name="dataset-info", **_COMMON)
def dataset_info(dataset: str, with_hash: bool = True) -> DatasetInfo:
    return S.dataset_info(dataset, with_hash=with_hash)


@task(name="train-job", retries=1, retry_delay_seconds=5, **_COMMON)
def train_job(params: TrainParams, dataset: str) -> TrainResult:
    """Run the training job through the runner chain; job log lines stream into the run log."""
    log = get_run_logger()
    return S.train_model_step(params, dataset, on_log=log.info)


@task(name="publish-version", retries=2, retry_delay_seconds=exponential_backoff(2), **_COMMON)
def publish_version(params: PublishParams, model_dir: str, name: str) -> dict[str, Any]:
    return S.publish_version(params, Path(model_dir), name)


@task(name="smoke-invoke", retries=2, retry_delay_seconds=exponential_backoff(2), **_COMMON)
def smoke_invoke(params: PublishParams, name: str, version: str) -> tuple[int, list[dict[str, Any]]]:
    n, outputs = S.smoke_invoke(params, name, version)
    get_run_logger().info("smoke call of %s@%s: %d example rows → %s", name, version, n, outputs[:2])
    return n, outputs


@task(name="move-alias", retries=2, retry_delay_seconds=exponential_backoff(2), **_COMMON)
def move_alias(params: PublishParams, name: str, version: str) -> dict[str, dict[str, float]]:
    return S.move_alias(params, name, version)


@task(name="score-job", retries=1, retry_delay_seconds=5, **_COMMON)
def score_job(params: ScoreParams) -> ScoreResult:
    return S.score_step(params, on_log=get_run_logger().info)
