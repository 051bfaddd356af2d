"""A model family added as a plugin — one folder (``tests/gpu_jobs/plugin_family``) and one registration line —
is trained through ``gpu_jobs.api.train`` (a real worker process), published to a local registry, served by a
real gateway process and invoked over HTTP; the flows' parameters and quality bar know it too."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from eth_account.signers.local import LocalAccount

from gpu_jobs import api
from gpu_jobs.artifacts import load_artifact
from gpu_jobs.registry import PLUGINS_ENV, family_names, load_family
from serving.server import GatewayProcess
from serving.settings import GatewaySettings
from serving.targets import LocalTarget, publish_function
from tests.gpu_jobs.plugin_family import FEATURES, NAME, REGISTRATION, write_dataset

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch) -> str:
    """The one registration line, in the environment so that the worker and the gateway inherit it (and the
    repository on PYTHONPATH, so that they can import the plugin's folder)."""
    monkeypatch.setenv(PLUGINS_ENV, REGISTRATION)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return NAME


def test_a_plugin_family_is_trained_published_and_served(
    plugin: str, publisher: LocalAccount, tmp_path: Path
) -> None:
    assert plugin in family_names() and load_family(plugin).name == plugin
    dataset = write_dataset(tmp_path / "data" / "rows.parquet").parent
    model = tmp_path / "model"

    doc = api.train(dataset=dataset, model=plugin, out=model, runners=["local"], jobs_dir=tmp_path / "jobs")
    assert doc["state"] == "SUCCEEDED" and doc["metrics"]["mae"] < 0.1 < doc["metrics"]["baseline_mae"]
    assert api.model_family(model) == plugin  # model.json names the family by its registered name
    state = load_artifact(model).state_dict
    assert np.allclose(state["weight"].numpy(), [2.0, -3.0], atol=0.05)

    with LocalTarget(tmp_path / "registry", publisher) as target:
        published = publish_function(target, model, plugin, "prod")  # publish → smoke call → alias
        version = published.result.version
        example = list(target.manifest(plugin, version).example)
    assert published.result.aliases["prod"] == {version: 1.0} and len(published.smoke_outputs) == len(example)

    settings = GatewaySettings(registry_dir=tmp_path / "registry", trusted_publishers=[publisher.address])
    with GatewayProcess(settings) as gw:
        resp = httpx.post(
            f"{gw.base_url}/v1/functions/{plugin}@prod/invoke", json={"inputs": example}, timeout=60
        )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    x = np.array([[row[f] for f in FEATURES] for row in example])
    want = x @ state["weight"].double().numpy() + float(state["bias"])
    assert body["version"] == version
    assert [o["y"] for o in body["outputs"]] == pytest.approx(want.tolist(), rel=1e-9)


def test_the_flows_know_a_plugin_family(plugin: str) -> None:
    from pipelines import _steps as S
    from pipelines.params import TrainParams

    assert TrainParams(family=plugin).family == plugin
    verdict = S.check_quality(plugin, {"mae": 0.5, "baseline_mae": 1.0})
    assert verdict.accepted and verdict.baseline == {"baseline_mae": 1.0}
    assert not S.check_quality(plugin, {"mae": 2.0, "baseline_mae": 1.0}).accepted


def test_without_the_registration_the_family_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from depin_core.errors import ConfigError
    from pipelines.params import TrainParams

    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    assert NAME not in family_names()
    with pytest.raises(ValidationError, match="unknown model family 'linear'"):
        TrainParams(family=NAME)
    monkeypatch.setenv(PLUGINS_ENV, "linear")
    with pytest.raises(ConfigError, match=r"DEPIN_FAMILIES: 'linear' is not name=package\.module:attr"):
        family_names()
    monkeypatch.setenv(PLUGINS_ENV, "range=tests.gpu_jobs.plugin_family:LinearFamily")
    with pytest.raises(ConfigError, match=r"'range' is already gpu_jobs\.models\.range:RangeFamily"):
        family_names()
