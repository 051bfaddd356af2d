"""Where depin-pipeline keeps its files by default: one ``.depin`` directory, relative to the working
directory (like ``.git``), and each default under it. Every module takes its default from here."""

from __future__ import annotations

from pathlib import Path

HOME = Path(".depin")

KEYS_DIR = HOME / "keys"
PSEUDONYM_KEY_FILE = KEYS_DIR / "pseudonym.key"  # keyed pseudonyms of vehicle ids (gpu_jobs.minimise)
PUBLISHER_KEY_FILE = KEYS_DIR / "publisher.key"  # signs function bundles (serving.bundle)

NODES_FILE = HOME / "workers.json"  # registered worker nodes (gpu_jobs.providers.manual)
JOBS_DIR = HOME / "jobs"  # job working directories (gpu_jobs)
AGENT_DATA_DIR = HOME / "agent"  # a worker agent's blobs, jobs and outputs (depin worker serve)

DATASET_DIR = HOME / "datasets" / "telemetry"  # the ingested telemetry (a Delta table)
DATASET_CACHE_DIR = HOME / "cache" / "datasets"  # local copies of job inputs read from object storage
MODELS_DIR = HOME / "models"  # trained model artifacts
SCORES_DIR = HOME / "scores"  # batch-scoring outputs
PLANS_DIR = HOME / "plans"  # charging plans (depin plan, the plan-charging flow)

REGISTRY_DIR = HOME / "registry"  # the local function registry (serving)
FLUENCE_STATE_DIR = HOME / "fluence"  # what `depin publish --target fluence` created (serving.fluence)

EMULATOR_DIR = HOME / "emulator"
EMULATOR_CREDENTIALS = EMULATOR_DIR / "credentials.json"  # written by `depin up`, read by the flows
GROUND_TRUTH_DIR = EMULATOR_DIR / "ground_truth"

UP_DIR = HOME / "up"  # `depin up`: state file, logs
UP_LOG = UP_DIR / "up.log"  # the log of a `depin up --background` supervisor
PREFECT_HOME = HOME / "prefect"  # the local Prefect server's home
DEMO_DIR = HOME / "demo"  # `depin demo`'s dataset, model and summary

__all__ = [
    "AGENT_DATA_DIR",
    "DATASET_CACHE_DIR",
    "DATASET_DIR",
    "DEMO_DIR",
    "EMULATOR_CREDENTIALS",
    "EMULATOR_DIR",
    "FLUENCE_STATE_DIR",
    "GROUND_TRUTH_DIR",
    "HOME",
    "JOBS_DIR",
    "KEYS_DIR",
    "MODELS_DIR",
    "NODES_FILE",
    "PLANS_DIR",
    "PREFECT_HOME",
    "PSEUDONYM_KEY_FILE",
    "PUBLISHER_KEY_FILE",
    "REGISTRY_DIR",
    "SCORES_DIR",
    "UP_DIR",
    "UP_LOG",
]
