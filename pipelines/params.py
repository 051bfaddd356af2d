"""Parameters of the flows: pydantic models, validated on every run and shown as forms in the Prefect UI.

Every field has a default, so a run with no parameters works against what ``depin up`` starts on this machine:
the DIMO emulator (credentials in :data:`DEFAULT_EMULATOR_CREDENTIALS`), the local registry and gateway.
Paths are relative to the working directory of the process that runs the flow (``depin up``: the project).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from depin_core import paths
from depin_core.names import FUNCTION_NAME_RULE, function_name_error, is_function_name
from gpu_jobs.registry import FAMILIES, PLUGINS_ENV, family_names

DEFAULT_DATASET = paths.DATASET_DIR
DEFAULT_MODELS = paths.MODELS_DIR
DEFAULT_SCORES = paths.SCORES_DIR
DEFAULT_JOBS = paths.JOBS_DIR
# ``depin up`` starts the emulator with ``credentials_out`` here (and its ground truth beside it)
DEFAULT_EMULATOR_CREDENTIALS = paths.EMULATOR_CREDENTIALS
DEFAULT_GROUND_TRUTH = paths.GROUND_TRUTH_DIR
DIMO_CREDENTIALS_BLOCK = "dimo"
# Global concurrency limit held by each ingestion run (one slot): its limit is how many ingestion runs may call
# DIMO at once (``depin up`` creates it with 1: runs queue, each within DIMO's rate).
DIMO_CONCURRENCY_LIMIT = "dimo-api"
DIMO_API_SLOTS = 1  # ingest runs calling DIMO at once (a run holds one slot for its whole DIMO phase)
INGEST_WORKERS = 4  # ingestion tasks of one flow run at once; they split the run's DIMO request rate
SHARD_DEPLOYMENT = (
    "ingest-telemetry/on-demand"  # what a sharded ingest runs once per shard (workers pick it up)
)


def _known_family(name: str) -> str:
    if name not in (names := family_names()):
        raise ValueError(f"unknown model family {name!r}; use one of {', '.join(names)}")
    return name


# a family registered in gpu_jobs.registry (plugins: DEPIN_FAMILIES); a plain string in the JSON schema
Family = Annotated[str, AfterValidator(_known_family)]


def _location_text(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


# a dataset location: a directory (a Path is accepted) or an object-store URI such as s3://bucket/prefix
DatasetLocation = Annotated[str, BeforeValidator(_location_text)]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IngestParams(_Params):
    """What to ingest from DIMO into the Parquet dataset (incremental: per-vehicle watermarks)."""

    dataset: DatasetLocation = Field(
        str(DEFAULT_DATASET), description="dataset: a directory or s3://bucket/prefix (a Delta table)"
    )
    since: str = Field("7d", description="start: ISO-8601 time or a duration before now (7d, 36h)")
    until: str = Field("now", description="end (exclusive): ISO-8601 time, duration before now, or 'now'")
    interval: str = Field(
        "20s", description="bucket width (Go duration); the range model needs short buckets (20s)"
    )
    signals: list[str] | None = Field(None, description="DIMO signal names; default: all the vehicle reports")
    vehicles: list[int] | None = Field(None, description="token ids; default: every vehicle shared with you")
    credentials: Path | None = Field(
        None,
        description="emulator credentials JSON; default: the DimoCredentials block 'dimo', else the "
        f"DEPIN_DIMO_* environment, else {DEFAULT_EMULATOR_CREDENTIALS} (written by depin up)",
    )
    credentials_block: str = Field(DIMO_CREDENTIALS_BLOCK, description="name of a DimoCredentials block")
    batch_size: int = Field(5, ge=1, le=10_000, description="vehicles per ingestion task")
    rate_limit_per_s: float | None = Field(
        None, ge=0, description="DIMO requests/s per service, shared by all tasks (default: the settings')"
    )
    shards: int = Field(
        1,
        ge=1,
        le=256,
        description="split the fleet (stable hash of token_id) into this many child runs of shard_deployment, "
        "run by whichever workers are free; 1 = ingest in this run",
    )
    shard_deployment: str = Field(
        SHARD_DEPLOYMENT, description="flow/deployment each shard runs (registered by depin deploy --pool)"
    )
    report: bool = Field(
        True,
        description="write the dataset report (per-vehicle table, tracks, coverage; reads the whole table) and "
        "hash the version; the shards of a sharded ingest leave it to their parent",
    )
    rate_limit_scope: Literal["run", "fleet"] = Field(
        "run",
        description="run: this run paces its own DIMO requests; fleet: every request also takes a slot of "
        "the Prefect rate limits dimo-rate-<service>, shared by all workers (shards use it)",
    )


class TrainParams(_Params):
    """Which model to train on which dataset, where, and where the artifact goes."""

    dataset: DatasetLocation | None = Field(
        None,
        description=f"telemetry dataset (directory or s3://…); default: the ingested one, else {DEFAULT_DATASET}",
    )
    family: Family = Field(
        "range", description=f"model family: one of {', '.join(sorted(FAMILIES))} or a plugin ({PLUGINS_ENV})"
    )
    hyperparameters: dict[str, Any] = Field(default_factory=dict, description="family hyperparameters")
    runners: list[str] = Field(
        default_factory=lambda: ["local"],
        min_length=1,
        description="runner chain, tried in order on infrastructure failures (local = CUDA, else CPU)",
    )
    out: Path = Field(DEFAULT_MODELS, description="models directory; each run writes <out>/<family>-<time>")
    ground_truth: Path | None = Field(None, description="emulator ground truth (anomaly recall/FPR)")
    seed: int = 0
    max_wall_s: float = Field(3600.0, gt=0, description="wall-time limit of one training attempt")
    jobs_dir: Path = Field(DEFAULT_JOBS, description="job working directories")


class PublishParams(_Params):
    """Publish a model artifact as a signed, versioned function; the alias moves after a smoke call."""

    model_dir: Path | None = Field(None, description="model artifact directory; default: the trained one")
    name: str | None = Field(
        None, description=f"function name: {FUNCTION_NAME_RULE}; default: the model family"
    )
    alias: str | None = Field("prod", description="alias moved to the version after the smoke call")
    target: str = Field(
        "local",
        description="'local' (the registry directory), 'fluence' (a gateway VM on Fluence, created on first "
        "publish; DEPIN_FLUENCE_* settings) or a gateway URL",
    )
    fluence_target: str | None = Field(
        None,
        description="target fluence: deployment name, VM depin-gw-<name> (default: DEPIN_FLUENCE_TARGET)",
    )
    max_usd_per_day: float | None = Field(
        None,
        ge=0,
        description="target fluence: price cap of a new VM (default DEPIN_FLUENCE_MAX_USD_PER_DAY, 5)",
    )
    fluence_replicas: int | None = Field(
        None,
        ge=1,
        le=10,
        description="target fluence: gateway VMs, each in another datacenter (default DEPIN_FLUENCE_REPLICAS, "
        "else as many as the target has, 1 for a new one)",
    )
    registry: Path | None = Field(
        None, description=f"registry for target local; default {paths.REGISTRY_DIR}"
    )
    gateway_url: str | None = Field(
        None,
        description="gateway serving the local registry, for the function URL (default: DEPIN_GATEWAY_URL, "
        "else http://127.0.0.1:8787)",
    )
    admin_key_file: Path | None = Field(None, description="admin key of a gateway target")
    tls_cert: Path | None = Field(
        None,
        description="certificate (PEM) of a gateway target to pin; a recorded Fluence gateway's is pinned "
        "by itself",
    )
    max_batch_size: int = Field(1024, ge=1, le=1_000_000)

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str | None) -> str | None:
        if v is not None and not is_function_name(v):
            raise ValueError(function_name_error(v))
        return v

    @field_validator("target")
    @classmethod
    def _check_target(cls, v: str) -> str:
        if v not in ("local", "fluence") and not v.startswith(("http://", "https://")):
            raise ValueError(f"target {v!r}: use 'local', 'fluence' or a gateway URL http(s)://…")
        return v.rstrip("/")


class ScoreParams(_Params):
    """Score a dataset with a model artifact or a function published in the local registry."""

    model_dir: Path | None = Field(None, description="model artifact directory (or use function)")
    function: str | None = Field(None, description="name, name@alias or name@version in the local registry")
    registry: Path | None = Field(None, description=f"registry of function; default {paths.REGISTRY_DIR}")
    dataset: Path = Field(DEFAULT_DATASET, description="telemetry dataset to score")
    out: Path | None = Field(None, description=f"Parquet output; default {DEFAULT_SCORES}/<model>.parquet")
    ground_truth: Path | None = Field(None, description="emulator ground truth, for metrics")
    runners: list[str] = Field(default_factory=lambda: ["local"], min_length=1)
    max_wall_s: float = Field(3600.0, gt=0)
    jobs_dir: Path = Field(DEFAULT_JOBS)


class TrainAndPublishParams(_Params):
    """Ingest → train → evaluate → publish. ``train.dataset`` and ``publish.model_dir`` default to the
    outputs of the previous stage."""

    ingest: IngestParams = Field(default_factory=IngestParams)
    train: TrainParams = Field(default_factory=TrainParams)
    publish: PublishParams = Field(default_factory=PublishParams)
    skip_ingest: bool = Field(False, description="train on train.dataset (or ingest.dataset) as it is")


__all__ = [
    "DEFAULT_DATASET",
    "DEFAULT_EMULATOR_CREDENTIALS",
    "DEFAULT_GROUND_TRUTH",
    "DEFAULT_MODELS",
    "DIMO_API_SLOTS",
    "DIMO_CONCURRENCY_LIMIT",
    "DIMO_CREDENTIALS_BLOCK",
    "INGEST_WORKERS",
    "Family",
    "IngestParams",
    "PublishParams",
    "ScoreParams",
    "TrainAndPublishParams",
    "TrainParams",
]
