"""Reports for people: ``depin report`` writes one self-contained HTML page whose images are the artifact's
PNGs and the dataset's fleet plots; the Prefect markdown (model report, ingest report, run summary) embeds
the same PNGs as data URIs and shows numbers to 3 significant digits with units, never raw floats or dicts."""

from __future__ import annotations

import base64
import json
import re
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from connectors.dimo import plots as FP
from depin_core import plots as P
from gpu_jobs.artifacts import write_artifact
from gpu_jobs.models.range import RangeFamily
from gpu_jobs.plots import render
from pipelines import _steps as S
from pipelines import report as REP
from pipelines.cli import app
from pipelines.results import PublishFunctionResult, TrainAndPublishResult, TrainResult
from tests.support.fleet_data import SIGNALS, FleetData, build_fleet_data
from tests.support.model_ctx import make_ctx


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> FleetData:
    return build_fleet_data(
        tmp_path_factory.mktemp("fleet"), vehicles=8, days=1.5, seed=5, interval=timedelta(minutes=1),
        signals=[*SIGNALS, "currentLocationCoordinates"],
    )  # fmt: skip


@pytest.fixture(scope="module")
def model(fleet: FleetData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("model")
    trained = RangeFamily().train(make_ctx(tmp, [fleet.telemetry], "range", {"epochs": 3}, seed=1))
    out = tmp / "m"
    write_artifact(out, state_dict=trained.state_dict, model_config=trained.model_config,
                   metrics=trained.metrics, files=trained.files)  # fmt: skip
    render(out)
    return out


def images(text: str) -> list[bytes]:
    """The PNGs embedded in markdown or HTML as data URIs."""
    return [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)]


def artifact_pngs(model_dir: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((model_dir / "plots").glob("*.png"))]


def test_depin_report_writes_one_page_with_every_plot_inline(
    model: Path, fleet: FleetData, tmp_path: Path
) -> None:
    out = tmp_path / "report.html"
    res = CliRunner().invoke(app, ["report", str(model), "--dataset", str(fleet.telemetry), "--out", str(out),
                                   "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["report"] == str(out.resolve()) and doc["missing"] == {}
    assert set(doc["plots"]) == {"loss", "predicted_vs_actual", "residuals"}
    assert all(Path(f).is_file() for f in doc["plots"].values())
    page = out.read_text()
    assert "<script" not in page and 'src="http' not in page  # self-contained: nothing to fetch
    shown = images(page)
    assert sorted(shown[:3]) == sorted(artifact_pngs(model))  # the model's PNGs, byte for byte
    digests = {P.png_text(png)[P.DATA_KEY] for png in shown[3:]}
    assert digests == {
        P.data_digest(FP.coverage_data(fleet.telemetry)),
        P.data_digest(FP.tracks_data(fleet.telemetry)),
    }
    metrics = json.loads((model / "metrics.json").read_bytes())
    assert P.quantity(metrics["mae"], "kWh/100 km") in page  # for people
    assert repr(metrics["mae"]) in page  # full precision in the cell's title


def test_report_of_a_model_with_a_missing_plot_says_why(model: Path, tmp_path: Path) -> None:
    import shutil

    from gpu_jobs.artifacts import update_artifact
    from gpu_jobs.models.plots import HELDOUT_FILE

    broken = tmp_path / "m"
    shutil.copytree(model, broken)
    update_artifact(broken, {HELDOUT_FILE: b"garbage"})
    render(broken)
    written = REP.write_report(broken, tmp_path / "r.html")
    assert set(written["missing"]) == {"predicted_vs_actual", "residuals"}
    page = (tmp_path / "r.html").read_text()
    assert page.count('class="missing"') == 2 and len(images(page)) == 1


def test_model_report_and_run_summary_embed_the_plots_and_format_numbers(model: Path) -> None:
    metrics = json.loads((model / "metrics.json").read_bytes())
    baseline = {
        "baseline_mae": metrics["baseline_mae"],
        "history_baseline_mae": metrics["history_baseline_mae"],
    }
    trained = TrainResult(family="range", model_dir=str(model), model_sha256="0" * 64, dataset="/d",
                          dataset_sha256="1" * 64, metrics=metrics, baseline=baseline, accepted=True,
                          runner="local", device="cpu", job_id="j", spec_hash="s", seconds=12.3456)  # fmt: skip
    md = S.metrics_markdown(trained)
    assert sorted(images(md)) == sorted(artifact_pngs(model))
    assert f"| mae | {P.quantity(metrics['mae'], 'kWh/100 km')} |" in md
    run = TrainAndPublishResult(
        dataset="/d", dataset_sha256="1" * 64, rows=331398, vehicles=30, new_rows=331398, family="range",
        model_dir=str(model), model_sha256="0" * 64, metrics=metrics, baseline=baseline, function_name="range",
        function_version="v", function_alias="prod", function_url="http://x/f", manifest_url="http://x/m",
        stage_seconds={"ingest": 5.29123, "train": 11.2}, train=trained,
        publish=PublishFunctionResult(name="range", version="v", alias="prod", target="local",
                                      function_url="http://x/f", manifest_url="http://x/m", manifest_sha256="2" * 64,
                                      publisher="0x0", created=True, smoke_inputs=1, smoke_outputs=[], aliases={}),
    )  # fmt: skip
    summary = S.run_summary_markdown(run)
    assert sorted(images(summary)) == sorted(artifact_pngs(model))
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", summary)
    assert f"held-out mae {P.quantity(metrics['mae'], 'kWh/100 km')}" in text
    assert f"baseline mae: {P.quantity(metrics['baseline_mae'], 'kWh/100 km')}" in text
    assert "{" not in text and repr(metrics["baseline_mae"]) not in text  # no dict, no raw float
    assert "ingest 5.29 s" in text and "331,398 rows" in text


def test_ingest_report_embeds_the_fleet_plots(fleet: FleetData) -> None:
    info = S.dataset_info(fleet.telemetry, with_hash=False)
    md = S.ingest_markdown(info, 123, [{"token_id": 7, "reason": "not shared"}])
    shown = images(md)
    assert len(shown) == 2 and all(len(png) <= P.MAX_PNG_BYTES for png in shown)
    digests = {P.png_text(png)[P.DATA_KEY] for png in shown}
    assert digests == {
        P.data_digest(FP.coverage_data(fleet.telemetry)),
        P.data_digest(FP.tracks_data(fleet.telemetry)),
    }
    assert f"{info.rows:,} rows (123 new)" in md and "7: not shared" in md


def test_human_numbers() -> None:
    assert REP.human("mae", 0.6997098846497036) == "0.700 kWh/100 km"
    assert REP.human("false_positive_rate", 0.0123) == "1.23 %"
    assert REP.human("", {"baseline_mae": 2.887809595415702}) == "baseline mae: 2.89 kWh/100 km"
    assert REP.human("n_windows", 103) == "103"


def test_report_of_an_artifact_from_before_plots_draws_them(model: Path, tmp_path: Path) -> None:
    import shutil

    from gpu_jobs.artifacts import load_artifact, update_artifact

    old = tmp_path / "m"
    shutil.copytree(model, old)
    update_artifact(old, dict.fromkeys(f"plots/{p.name}" for p in (old / "plots").glob("*.png")))
    manifest = json.loads((old / "manifest.json").read_bytes())
    del manifest["plots"]  # as a job before this change wrote it
    (old / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    assert not (old / "plots").exists()
    written = REP.write_report(old, tmp_path / "r.html")
    assert set(written["plots"]) == {"loss", "predicted_vs_actual", "residuals"} and not written["missing"]
    assert len(images((tmp_path / "r.html").read_text())) == 3
    assert set(load_artifact(old).manifest["plots"]) == set(written["plots"])
