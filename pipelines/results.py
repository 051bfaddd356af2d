"""What the flows return: small, JSON-able pydantic models holding references (paths + sha256), never data.

``TrainAndPublishResult.summary()`` is the flat JSON object the demo and scripts print.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def clean_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics without NaN/inf (→ None), so every result is strict JSON."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        out[k] = None if isinstance(v, float) and not math.isfinite(v) else v
    return out


class DatasetInfo(_Result):
    """A telemetry dataset on disk: where, its content hash, its size and extent."""

    path: str
    sha256: str | None  # DatasetRef digest over the version's Parquet files; None while empty or remote
    version: int | None = None  # the Delta table version described
    rows: int
    vehicles: int
    interval: str | None
    first: str | None
    last: str | None
    columns: list[str] = Field(default_factory=list)


class BatchReport(_Result):
    """One ingestion task: a batch of vehicles."""

    token_ids: list[int]
    rows: int
    vehicles: int
    requests: int
    retries: int
    up_to_date: int
    skipped: list[dict[str, Any]] = Field(default_factory=list)
    per_vehicle: dict[int, int] = Field(default_factory=dict)  # rows added this run
    seconds: float


class IngestResult(_Result):
    dataset: DatasetInfo
    new_rows: int
    vehicles_ingested: int
    up_to_date: int
    skipped: list[dict[str, Any]]
    requests: int
    retries: int
    since: str
    until: str
    interval: str
    seconds: float
    shards: list[dict[str, Any]] = Field(
        default_factory=list, description="sharded ingest: one entry per shard (its child run and numbers)"
    )

    def shard_summary(self) -> dict[str, Any]:
        """The flat numbers a sharded parent adds up (the ``ingest-result`` artifact's one row)."""
        return {
            "new_rows": self.new_rows,
            "vehicles_ingested": self.vehicles_ingested,
            "up_to_date": self.up_to_date,
            "skipped": len(self.skipped),
            "requests": self.requests,
            "retries": self.retries,
            "seconds": self.seconds,
            "dataset_version": self.dataset.version,
        }


class QualityVerdict(_Result):
    """Whether a trained model beats its naive baseline (and by what numbers)."""

    accepted: bool
    baseline: dict[str, Any]
    reasons: list[str] = Field(default_factory=list)


class TrainResult(_Result):
    family: str
    model_dir: str
    model_sha256: str  # sha256 of the artifact's manifest.json (which holds every file's sha256)
    dataset: str
    dataset_sha256: str
    metrics: dict[str, Any]
    baseline: dict[str, Any]
    accepted: bool
    dataset_version: int | None = None  # the table version trained on (lineage; time travel reads it back)
    runner: str
    device: str | None
    job_id: str
    spec_hash: str
    seconds: float
    attempts: list[dict[str, Any]] = Field(default_factory=list)  # the runner chain's (gpu_jobs.chain)


class PublishFunctionResult(_Result):
    name: str
    version: str
    alias: str | None
    target: str
    function_url: str
    manifest_url: str
    manifest_sha256: str
    publisher: str
    created: bool
    smoke_inputs: int
    smoke_outputs: list[dict[str, Any]]
    aliases: dict[str, dict[str, float]]


class ScoreResult(_Result):
    output: str
    sha256: str
    rows: int | None
    family: str
    model: str
    metrics: dict[str, Any]
    seconds: float
    attempts: list[dict[str, Any]] = Field(default_factory=list)  # the runner chain's (gpu_jobs.chain)


class TrainAndPublishResult(_Result):
    """The end-to-end result: the dataset, the model and its quality, the published function."""

    dataset: str
    dataset_sha256: str
    dataset_version: int | None = None  # the table version the model was trained on
    rows: int
    vehicles: int
    new_rows: int
    family: str
    model_dir: str
    model_sha256: str
    metrics: dict[str, Any]
    baseline: dict[str, Any]
    function_name: str
    function_version: str
    function_alias: str | None
    function_url: str
    manifest_url: str
    stage_seconds: dict[str, float]
    ingest: IngestResult | None = None
    train: TrainResult
    publish: PublishFunctionResult

    def summary(self) -> dict[str, Any]:
        """The flat JSON summary (no nested stage results)."""
        return self.model_dump(mode="json", exclude={"ingest", "train", "publish"})


__all__ = [
    "BatchReport",
    "DatasetInfo",
    "IngestResult",
    "PublishFunctionResult",
    "QualityVerdict",
    "ScoreResult",
    "TrainAndPublishResult",
    "TrainResult",
    "clean_metrics",
]
