"""Shared test configuration. Prefect settings must be set before prefect is imported anywhere."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

# The GPU-job fixtures (a toy dataset, one shared worker agent process) are used by tests/gpu_jobs and tests/e2e.
from tests.gpu_jobs.support import toy_dataset, worker_agent

# The serving fixtures (real trained model artifacts, publisher keys, bundles) are used by tests/serving and
# tests/e2e alike; registered here once, their session-scoped fixtures are built once per run.
from tests.serving.fixtures import (
    anomaly_artifact,
    anomaly_bundle,
    make_bundle,
    other_publisher,
    publisher,
    range_artifact,
    range_bundle,
    serving_fleet,
)

__all__ = [
    "anomaly_artifact",
    "anomaly_bundle",
    "make_bundle",
    "other_publisher",
    "publisher",
    "range_artifact",
    "range_bundle",
    "serving_fleet",
    "toy_dataset",
    "worker_agent",
]
