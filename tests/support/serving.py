"""Shared serving fixtures, registered for the whole suite by tests/conftest.py: real model artifacts (trained
on a tiny real fleet, written by ``gpu_jobs.artifacts.write_artifact`` with a real ``JobSpec``), publisher
accounts and signed bundles.

Session-scoped where building is costly (fleet ~3 s, both models ~2 s); ``range_bundle`` is per test (cheap),
so a test may tamper with it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from eth_account import Account
from eth_account.signers.local import LocalAccount

from gpu_jobs.artifacts import write_artifact
from gpu_jobs.spec import DatasetRef, DeviceInfo, JobKind, JobSpec, ModelSpec, Outputs
from tests.support.fleet_data import FleetData, build_fleet_data
from tests.support.model_ctx import make_ctx

if TYPE_CHECKING:
    from serving.bundle import Bundle

# ~3 s to build; 4 EVs with ~20 measurable trips, 4 combustion cars, ~700 anomaly windows
SERVING_FLEET = {"vehicles": 10, "days": 2.0, "seed": 3}
RANGE_HP = {"epochs": 30}
ANOMALY_HP = {"epochs": 5}

MakeBundle = Callable[..., "Bundle"]


@pytest.fixture(scope="session")
def serving_fleet(tmp_path_factory: pytest.TempPathFactory) -> FleetData:
    return build_fleet_data(tmp_path_factory.mktemp("serving_fleet"), **SERVING_FLEET)  # type: ignore[arg-type]


def train_artifact(out: Path, family: str, inputs: list[Path], hp: dict[str, Any], *, seed: int = 0) -> Path:
    """Train ``family`` on ``inputs`` in-process (CPU, one thread) and write a real model artifact to ``out``."""
    from gpu_jobs.registry import load_family

    spec = JobSpec(
        kind=JobKind.TRAIN,
        model=ModelSpec(family=family, hyperparameters=hp),
        inputs=[
            DatasetRef.from_path(p, "ground_truth" if p.name == "truth" else "telemetry") for p in inputs
        ],
        seed=seed,
        outputs=Outputs(dir=str(out)),
    )
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trained = load_family(family).train(
            make_ctx(out.parent / f"{out.name}-work", inputs, family, hp, seed=seed)
        )
    finally:
        torch.set_num_threads(n)
    device = DeviceInfo(type="cpu", name="cpu", torch_version=torch.__version__, threads=1)
    write_artifact(
        out,
        state_dict=trained.state_dict,
        model_config=trained.model_config,
        metrics=trained.metrics,
        spec=spec,
        device=device,
        timings={"running_s": 0.0},
    )
    return out


@pytest.fixture(scope="session")
def range_artifact(serving_fleet: FleetData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ``range`` model artifact directory (do not modify it: copy it first)."""
    root = tmp_path_factory.mktemp("range_artifact")
    return train_artifact(root / "model", "range", [serving_fleet.telemetry], RANGE_HP, seed=1)


@pytest.fixture(scope="session")
def anomaly_artifact(serving_fleet: FleetData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ``anomaly`` model artifact directory (do not modify it: copy it first)."""
    root = tmp_path_factory.mktemp("anomaly_artifact")
    return train_artifact(root / "model", "anomaly", [serving_fleet.telemetry], ANOMALY_HP, seed=0)


def dev_account(label: str) -> LocalAccount:
    """A deterministic test account (the key is sha256 of ``label``; never use it for anything real)."""
    return Account.from_key(hashlib.sha256(f"depin-test-{label}".encode()).digest())


@pytest.fixture(scope="session")
def publisher() -> LocalAccount:
    return dev_account("publisher")


@pytest.fixture(scope="session")
def other_publisher() -> LocalAccount:
    return dev_account("other-publisher")


@pytest.fixture(scope="session")
def make_bundle(tmp_path_factory: pytest.TempPathFactory, publisher: LocalAccount) -> MakeBundle:
    """Factory: ``make_bundle(model_dir, name, account=publisher, **build_bundle kwargs) -> Bundle``, each
    built into a fresh temp directory."""
    from serving.bundle import build_bundle

    def make(model_dir: Path, name: str, account: LocalAccount | None = None, **kw: Any) -> Bundle:
        out = tmp_path_factory.mktemp(f"bundle-{name}") / "bundle"
        return build_bundle(model_dir, out, name=name, account=account or publisher, **kw)

    return make


@pytest.fixture
def range_bundle(make_bundle: MakeBundle, range_artifact: Path) -> Bundle:
    """A fresh signed bundle ``range-fn`` of the range model (per test: tampering with it is fine)."""
    return make_bundle(range_artifact, "range-fn")


@pytest.fixture
def anomaly_bundle(make_bundle: MakeBundle, anomaly_artifact: Path) -> Bundle:
    """A fresh signed bundle ``anomaly-fn`` of the anomaly model."""
    return make_bundle(anomaly_artifact, "anomaly-fn")
