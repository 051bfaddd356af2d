"""Prefect flows, the ``depin`` CLI and deployments: the only package that composes the others.

The Python flow API (imported lazily, so ``depin`` commands do not pay for ``import prefect``)::

    from pipelines import train_and_publish, TrainAndPublishParams
    run = train_and_publish(TrainAndPublishParams())
    print(run.function_url, run.metrics, run.baseline)

Flows: ``ingest_telemetry``, ``train_model``, ``publish_function``, ``batch_score``, ``train_and_publish``,
``plan_charging`` (:mod:`pipelines.charging`);
their parameter models (``pipelines.params``) and results (``pipelines.results``); ``DimoCredentials``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from depin_core.lazy import lazy_exports

_WHERE = {
    "ingest_telemetry": "pipelines.flows",
    "train_model": "pipelines.flows",
    "publish_function": "pipelines.flows",
    "batch_score": "pipelines.flows",
    "train_and_publish": "pipelines.flows",
    "plan_charging": "pipelines.charging",
    "PlanChargingFlowParams": "pipelines.charging",
    "IngestParams": "pipelines.params",
    "TrainParams": "pipelines.params",
    "PublishParams": "pipelines.params",
    "ScoreParams": "pipelines.params",
    "TrainAndPublishParams": "pipelines.params",
    "IngestResult": "pipelines.results",
    "TrainResult": "pipelines.results",
    "PublishFunctionResult": "pipelines.results",
    "ScoreResult": "pipelines.results",
    "TrainAndPublishResult": "pipelines.results",
    "DimoCredentials": "pipelines.blocks",
}

__all__ = [
    "DimoCredentials",
    "IngestParams",
    "IngestResult",
    "PlanChargingFlowParams",
    "PublishFunctionResult",
    "PublishParams",
    "ScoreParams",
    "ScoreResult",
    "TrainAndPublishParams",
    "TrainAndPublishResult",
    "TrainParams",
    "TrainResult",
    "batch_score",
    "ingest_telemetry",
    "plan_charging",
    "publish_function",
    "train_and_publish",
    "train_model",
]

if TYPE_CHECKING:
    from pipelines.blocks import DimoCredentials
    from pipelines.charging import PlanChargingFlowParams, plan_charging
    from pipelines.flows import (
        batch_score,
        ingest_telemetry,
        publish_function,
        train_and_publish,
        train_model,
    )
    from pipelines.params import IngestParams, PublishParams, ScoreParams, TrainAndPublishParams, TrainParams
    from pipelines.results import (
        IngestResult,
        PublishFunctionResult,
        ScoreResult,
        TrainAndPublishResult,
        TrainResult,
    )

__getattr__, __dir__ = lazy_exports(globals(), _WHERE)
