"""``train_and_publish`` end to end with real processes on loopback: a DIMO emulator process → ingest through
the real client → a training job in a worker subprocess → a signed bundle in a local registry (alias moved
after the smoke call) → a gateway process serving that registry answers the function URL.

The run uses the defaults ``depin up`` relies on: the emulator credentials at their default path, the
registry and models under ``.depin/`` of the working directory, no parameters besides the test window.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from connectors.dimo.emulator.server import EmulatorProcess
from connectors.dimo.emulator.state import EmulatorConfig
from depin_core.plots import quantity
from pipelines.params import DEFAULT_EMULATOR_CREDENTIALS, IngestParams, TrainAndPublishParams, TrainParams
from tests.support.flow_fleet import FLEET, FLEET_END, RANGE_HP, SIGNALS, SINCE, UNTIL
from tests.support.prefect_harness import prefect_session
from tests.support.s3 import S3Server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def prefect_backend() -> Iterator[None]:
    """The session's one Prefect test server (started here if the flow tests have not started it)."""
    with prefect_session():
        yield


@pytest.fixture(scope="module")
def fleet_emulator() -> Iterator[EmulatorProcess]:
    with EmulatorProcess(EmulatorConfig(**FLEET, end=FLEET_END)) as emu:  # type: ignore[arg-type]
        yield emu


@pytest.mark.parametrize("where", ["local", "s3"])
def test_train_and_publish_against_the_emulator_then_invoke_through_the_gateway(
    prefect_backend: None,
    fleet_emulator: EmulatorProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    where: str,
) -> None:
    """``local``: the defaults, dataset under .depin/. ``s3``: the dataset is a table on a local S3-compatible
    server (moto), configured through DEPIN_DATASET_S3_*; the job reads the version's files from it."""
    from prefect.serializers import JSONSerializer

    from pipelines import TrainAndPublishResult, train_and_publish
    from serving.bundle import load_publisher_account
    from serving.client import GatewayClient
    from serving.server import GatewayProcess
    from serving.settings import GatewaySettings

    monkeypatch.chdir(tmp_path)
    for var in list(os.environ):
        if var.startswith(("DEPIN_GATEWAY_", "DEPIN_PUBLISHER_", "DEPIN_DIMO_")):
            monkeypatch.delenv(var)
    DEFAULT_EMULATOR_CREDENTIALS.parent.mkdir(parents=True)
    shutil.copy(fleet_emulator.credentials_path, DEFAULT_EMULATOR_CREDENTIALS)  # as `depin up` leaves it

    ingest = IngestParams(since=SINCE, until=UNTIL, signals=SIGNALS, rate_limit_per_s=0)
    if where == "s3":
        s3: S3Server = request.getfixturevalue("s3_server")
        for var, value in s3.env.items():
            monkeypatch.setenv(var, value)
        bucket = s3.new_bucket()
        ingest = ingest.model_copy(update={"dataset": f"s3://{bucket}/fleet/telemetry"})
    params = TrainAndPublishParams(ingest=ingest, train=TrainParams(hyperparameters=RANGE_HP))
    result = train_and_publish(params)

    assert isinstance(result, TrainAndPublishResult)
    assert result.vehicles == 10 and result.rows == result.new_rows > 10_000
    assert result.family == "range" and result.metrics["mae"] < result.baseline["baseline_mae"]
    assert Path(result.model_dir).is_dir() and result.dataset_version is not None
    if where == "local":
        assert Path(result.dataset) == Path(".depin/datasets/telemetry").resolve()
    else:
        assert result.dataset == f"s3://{bucket}/fleet/telemetry"
        assert not Path(".depin/datasets/telemetry").exists()  # nothing written locally but the job's cache
        keys = s3.keys(bucket, "fleet/telemetry/")
        assert any(k.startswith("fleet/telemetry/_delta_log/") for k in keys)
        assert any(k.startswith("fleet/telemetry/date=") and k.endswith(".parquet") for k in keys)
    lineage = json.loads((Path(result.model_dir) / "manifest.json").read_text())["datasets"][0]
    assert (lineage["table"], lineage["version"]) == (str(Path(result.dataset).resolve()) if where == "local"
                                                      else result.dataset, result.dataset_version)  # fmt: skip
    assert result.function_name == "range" and result.function_alias == "prod"
    assert result.function_url == "http://127.0.0.1:8787/v1/functions/range@prod/invoke"
    assert set(result.stage_seconds) == {"ingest", "train", "publish"}
    assert result.ingest is not None and result.train.dataset_sha256 == result.dataset_sha256
    assert result.ingest.dataset.version == result.dataset_version  # trained on the version just ingested
    if where == "local":  # a table on object storage is not hashed by the ingest (that would download it)
        assert result.ingest.dataset.sha256 == result.dataset_sha256
    summary = result.summary()
    assert {"rows", "vehicles", "metrics", "baseline", "function_url", "stage_seconds"} <= set(summary)
    from tests.support.prefect_harness import artifacts

    report = artifacts("train-and-publish-summary")[0].data
    assert result.function_version in report and result.function_url in report
    # the family's headline metric, for people (3 significant digits, its unit)
    assert f"held-out mae {quantity(result.metrics['mae'], 'kWh/100 km')}" in report
    assert "data:image/png;base64," in report  # the model's plots, inline
    json_ = JSONSerializer()
    assert json_.loads(json_.dumps(result)) == result  # the persisted result is JSON, and round-trips

    account = load_publisher_account(create=False)  # the key the flow signed with (.depin/keys)
    settings = GatewaySettings(
        registry_dir=tmp_path / ".depin/registry", trusted_publishers=[account.address]
    )
    with GatewayProcess(settings) as gw:
        url = result.function_url.replace("http://127.0.0.1:8787", gw.base_url)
        with GatewayClient(gw.base_url) as client:
            example = client.function("range")["manifest"]["example"]
        r = httpx.post(url, json={"inputs": example}, timeout=30)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["version"] == result.function_version
        assert len(doc["outputs"]) == len(example) and "kwh_per_100km" in doc["outputs"][0]
        manifest = httpx.get(result.manifest_url.replace("http://127.0.0.1:8787", gw.base_url), timeout=10)
        assert manifest.status_code == 200 and manifest.json()["version"] == result.function_version
