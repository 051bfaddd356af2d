"""Deployments of the flows, for ``prefect.serve(*deployments())`` (what ``depin up`` runs).

Scheduled: ``ingest-telemetry/nightly`` (cron ``0 2 * * *``: incremental — each vehicle resumes from its
watermark) and ``train-and-publish/weekly`` (cron ``0 3 * * 1``), in ``DEPIN_SCHEDULE_TZ`` (default UTC).
On demand (no schedule, run from the UI or ``prefect deployment run``): ``<flow>/on-demand`` for every flow.
Schedules fire only on a real Prefect server (``depin up``), never on the ephemeral one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from depin_core.errors import ConfigError

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

TAGS = ["depin"]


class ScheduleSettings(BaseSettings):
    """Schedules of the deployments (env prefix ``DEPIN_SCHEDULE_``)."""

    model_config = SettingsConfigDict(env_prefix="DEPIN_SCHEDULE_", extra="ignore")

    tz: str = Field("UTC", description="IANA time zone of the cron schedules, e.g. Europe/Berlin")
    ingest_cron: str = Field("0 2 * * *", description="nightly incremental ingest")
    train_cron: str = Field("0 3 * * 1", description="weekly train-and-publish")
    ingest_since: str = Field("2d", description="window of the nightly ingest (watermarks skip stored data)")
    active: bool = Field(True, description="create the schedules active (false: paused)")

    @field_validator("tz")
    @classmethod
    def _check_tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                f"DEPIN_SCHEDULE_TZ {v!r} is not an IANA time zone; use e.g. UTC or Europe/Berlin"
            ) from None
        return v


def _params(model: Any) -> dict[str, Any]:
    return {"params": model.model_dump(mode="json")}


def deployments(settings: ScheduleSettings | None = None) -> list[RunnerDeployment]:
    """The scheduled and on-demand deployments of every flow (``RunnerDeployment`` objects to serve)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from pipelines import charging, flows
    from pipelines.params import IngestParams, TrainAndPublishParams

    s = settings or ScheduleSettings()
    common: dict[str, Any] = {"tags": TAGS, "entrypoint_type": EntrypointType.MODULE_PATH}
    nightly = flows.ingest_telemetry.to_deployment(
        name="nightly",
        schedules=[Cron(s.ingest_cron, timezone=s.tz, active=s.active)],
        parameters=_params(IngestParams(since=s.ingest_since)),
        description=f"Nightly incremental DIMO ingest ({s.ingest_cron}, {s.tz}).",
        **common,
    )
    weekly = flows.train_and_publish.to_deployment(
        name="weekly",
        schedules=[Cron(s.train_cron, timezone=s.tz, active=s.active)],
        parameters=_params(TrainAndPublishParams()),
        description=f"Weekly ingest → train → evaluate → publish ({s.train_cron}, {s.tz}).",
        **common,
    )
    on_demand = [
        f.to_deployment(name="on-demand", description=f"{f.name}, run from the UI or the API.", **common)
        for f in (
            flows.train_and_publish,
            flows.ingest_telemetry,
            flows.train_model,
            flows.publish_function,
            flows.batch_score,
            charging.plan_charging,
        )
    ]
    # called from sync code, to_deployment returns the deployment (Prefect types it as that | a coroutine)
    return cast("list[RunnerDeployment]", [nightly, weekly, *on_demand])


__all__ = ["ScheduleSettings", "deployments"]
