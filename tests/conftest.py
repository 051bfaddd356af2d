"""Shared test configuration. Prefect settings must be set before prefect is imported anywhere."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

# Fixtures every test directory may use, defined once in tests/support: the GPU-job fixtures (a toy dataset,
# one shared worker agent process) and the serving fixtures (real trained model artifacts, publisher keys,
# bundles; session-scoped, so built once per run).
pytest_plugins = ["tests.support.gpu_jobs", "tests.support.serving", "tests.support.s3"]
