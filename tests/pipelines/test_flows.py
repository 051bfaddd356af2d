"""The flows under the session's Prefect test server: a few smoke tests per flow, asserting on results,
artifacts and side effects (the logic is tested directly in test_steps.py).

One chain of session fixtures keeps the suite fast: the fleet is ingested once by ``ingest_telemetry``, one
model is trained by ``train_model``, published by ``publish_function``, scored by ``batch_score``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from connectors.dimo.emulator.server import EmulatorProcess
from depin_core.errors import ConfigError, PermanentError, TransientError
from pipelines.params import IngestParams, PublishParams, ScoreParams, TrainParams
from pipelines.results import IngestResult, PublishFunctionResult, TrainResult
from tests.support.flow_fleet import RANGE_HP, SIGNALS, SINCE, UNTIL
from tests.support.prefect_harness import artifacts, table

pytestmark = pytest.mark.usefixtures("prefect_backend")


def ingest_params(emu: EmulatorProcess, dataset: Path, **kw: Any) -> IngestParams:
    base: dict[str, Any] = {
        "dataset": dataset,
        "credentials": emu.credentials_path,
        "since": SINCE,
        "until": UNTIL,
        "signals": SIGNALS,
        "batch_size": 4,
        "rate_limit_per_s": 0,
    }
    return IngestParams(**{**base, **kw})


@pytest.fixture(scope="session")
def ingested(
    prefect_backend: None, fleet_emulator: EmulatorProcess, tmp_path_factory: pytest.TempPathFactory
) -> IngestResult:
    from pipelines import ingest_telemetry

    dataset = tmp_path_factory.mktemp("flow-data") / "telemetry"
    return ingest_telemetry(ingest_params(fleet_emulator, dataset))


@pytest.fixture(scope="session")
def trained(ingested: IngestResult, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    from pipelines import train_model

    root = tmp_path_factory.mktemp("flow-models")
    return train_model(
        TrainParams(
            dataset=Path(ingested.dataset.path),
            hyperparameters=RANGE_HP,
            out=root / "models",
            jobs_dir=root / "jobs",
        )
    )


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("flow-registry") / "registry"


@pytest.fixture(scope="session")
def published(trained: TrainResult, registry: Path) -> PublishFunctionResult:
    from pipelines import publish_function

    return publish_function(
        PublishParams(model_dir=Path(trained.model_dir), registry=registry, gateway_url="http://127.0.0.1:9")
    )


# ------------------------------------------------------------------------------------------------- ingest


def test_ingest_flow_writes_the_dataset_with_progress_and_vehicle_table(ingested: IngestResult) -> None:
    assert ingested.dataset.vehicles == 10
    assert ingested.new_rows == ingested.dataset.rows > 10_000
    assert ingested.interval == "20s" and ingested.dataset.interval == "20s"
    assert ingested.dataset.sha256 and len(ingested.dataset.sha256) == 64
    assert not ingested.skipped
    assert artifacts("ingest-progress")[-1].data == 100.0
    rows = table(artifacts("ingest-vehicles")[-1])
    assert len(rows) == 10
    assert sum(r["new_rows"] for r in rows) == ingested.new_rows
    assert all(r["status"] == "ingested" and r["rows"] == r["new_rows"] for r in rows)
    json.dumps(ingested.to_json(), allow_nan=False)  # strict JSON


def test_ingest_flow_is_incremental(ingested: IngestResult, fleet_emulator: EmulatorProcess) -> None:
    from pipelines import ingest_telemetry

    again = ingest_telemetry(ingest_params(fleet_emulator, Path(ingested.dataset.path)))
    assert again.new_rows == 0 and again.up_to_date == 10
    assert again.dataset.rows == ingested.dataset.rows
    assert again.dataset.sha256 == ingested.dataset.sha256  # nothing rewritten
    assert all(r["status"] == "up to date" for r in table(artifacts("ingest-vehicles")[0]))


def test_ingest_flow_refuses_bad_parameters_before_any_work(
    fleet_emulator: EmulatorProcess, tmp_path: Path
) -> None:
    from pipelines import ingest_telemetry

    with pytest.raises(ConfigError, match="not shared"):
        ingest_telemetry(ingest_params(fleet_emulator, tmp_path / "d", vehicles=[1]))
    with pytest.raises(ConfigError, match="interval"):
        ingest_telemetry(ingest_params(fleet_emulator, tmp_path / "d", interval="1d"))
    assert not (tmp_path / "d").exists()


def test_only_transient_errors_are_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect import flow

    from pipelines import _steps as S
    from pipelines import _tasks as T

    calls: list[str] = []

    def flaky(kind: type[Exception]) -> Any:
        def discover(settings: Any, wanted: Any, admit: Any = None) -> list[int]:
            calls.append(kind.__name__)
            if len(calls) == 1:
                raise kind("first call fails")
            return [1, 2]

        return discover

    fast = T.discover_vehicles.with_options(retry_delay_seconds=0)

    @flow
    def probe() -> list[int]:
        return fast(None, None)  # type: ignore[arg-type]

    monkeypatch.setattr(S, "discover_vehicles", flaky(TransientError))
    assert probe() == [1, 2] and calls == ["TransientError", "TransientError"]
    calls.clear()
    monkeypatch.setattr(S, "discover_vehicles", flaky(PermanentError))
    with pytest.raises(PermanentError):
        probe()
    assert calls == ["PermanentError"]


# -------------------------------------------------------------------------------------------------- train


def test_train_flow_records_metrics_and_beats_the_baseline(
    trained: TrainResult, ingested: IngestResult
) -> None:
    assert trained.accepted and trained.family == "range"
    assert trained.metrics["mae"] < trained.baseline["baseline_mae"]
    assert trained.dataset_sha256 == ingested.dataset.sha256
    assert (Path(trained.model_dir) / "manifest.json").is_file() and len(trained.model_sha256) == 64
    assert trained.runner == "local" and trained.device in ("cpu", "cuda:0")
    metrics = {r["metric"]: r["value"] for r in table(artifacts("range-metrics")[0])}
    assert metrics["mae"] == pytest.approx(trained.metrics["mae"], rel=1e-5)
    assert "bar: baseline_mae" in metrics
    report = artifacts("range-model-report")[0]
    assert "accepted" in report.data and trained.model_dir in report.data


def test_train_flow_refuses_a_model_worse_than_the_baseline(
    trained: TrainResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines import _steps as S
    from pipelines import train_model

    worse = trained.model_copy(
        update={
            "metrics": {**trained.metrics, "mae": trained.baseline["baseline_mae"] * 1.1},
            "accepted": False,
        }
    )
    monkeypatch.setattr(S, "train_model_step", lambda *a, **k: worse)
    with pytest.raises(PermanentError, match=r"refused.*not below the fleet-mean baseline"):
        train_model(TrainParams(dataset=Path(trained.dataset)))
    assert "**refused**" in artifacts("range-model-report")[0].data


# ------------------------------------------------------------------------------------------------ publish


def test_publish_flow_smoke_calls_then_moves_the_alias(
    published: PublishFunctionResult, registry: Path
) -> None:
    from serving.registry import Registry

    assert published.name == "range" and published.alias == "prod" and published.created
    assert published.smoke_inputs >= 1 and len(published.smoke_outputs) == min(published.smoke_inputs, 5)
    assert {"kwh_per_100km", "range_km"} <= set(published.smoke_outputs[0])
    reg = Registry(registry, trusted=None)
    assert reg.aliases("range")["prod"] == {published.version: 1.0}
    assert published.function_url == "http://127.0.0.1:9/v1/functions/range@prod/invoke"
    assert published.manifest_url.endswith(f"/v1/functions/range/versions/{published.version}/manifest.json")
    assert f"({published.function_url})" in artifacts("function-url")[0].data
    assert f"({published.manifest_url})" in artifacts("function-manifest")[0].data


def test_publish_flow_keeps_the_alias_when_the_smoke_call_fails(
    published: PublishFunctionResult, trained: TrainResult, registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines import _steps as S
    from pipelines import publish_function
    from serving.registry import Registry

    def broken(*a: Any, **k: Any) -> Any:
        raise PermanentError("smoke call failed: model answers garbage")

    monkeypatch.setattr(S, "smoke_invoke", broken)
    with pytest.raises(PermanentError, match="smoke call failed"):
        publish_function(PublishParams(model_dir=Path(trained.model_dir), registry=registry, alias="canary"))
    assert "canary" not in Registry(registry, trusted=None).aliases("range")


# -------------------------------------------------------------------------------------------------- score


def test_batch_score_flow_scores_with_the_published_function(
    published: PublishFunctionResult, registry: Path, ingested: IngestResult, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    from pipelines import batch_score

    out = tmp_path / "scores.parquet"
    result = batch_score(
        ScoreParams(function="range@prod", registry=registry, dataset=Path(ingested.dataset.path), out=out)
    )
    assert result.family == "range" and result.output == str(out)
    assert result.rows == pq.read_metadata(out).num_rows > 0
    assert "predicted_kwh_per_100km" in pq.read_schema(out).names
    assert str(out) in artifacts("batch-scores")[0].data


# -------------------------------------------------------------------------------------------------- block


def test_credentials_block_is_used_and_its_key_stays_secret(fleet_emulator: EmulatorProcess) -> None:
    from connectors.dimo.settings import DimoSettings
    from pipelines.blocks import DimoCredentials, resolve_dimo_settings

    settings = DimoSettings.from_credentials_file(fleet_emulator.credentials_path)
    block = DimoCredentials.from_settings(settings)
    block.save("dimo-test", overwrite=True)
    key = settings.private_key.get_secret_value()  # type: ignore[union-attr]
    assert key not in repr(block) and key not in str(block.model_dump())
    found, source = resolve_dimo_settings(None, "dimo-test", default_credentials=Path("absent.json"))
    assert source == "block dimo-test"
    assert found.private_key.get_secret_value() == key  # type: ignore[union-attr]
    assert found.telemetry_url == settings.telemetry_url and found.client_id == settings.client_id
    with pytest.raises(ConfigError, match="DimoCredentials block"):
        resolve_dimo_settings(None, "no-such-block", default_credentials=Path("absent.json"))
