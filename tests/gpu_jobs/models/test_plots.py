"""The model report's plots: their data are the model's held-out predictions and scores (recomputed here from
the artifact and the dataset), the PNGs carry the digest of that data, stay under the size cap and are listed
in the manifest; a plot that fails is recorded as missing and never fails training; pseudonymised report
files come back naming the real vehicles, and none of them leaves with a model sent for scoring."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from matplotlib.collections import PathCollection

from depin_core import plots as P
from gpu_jobs import api
from gpu_jobs import plots as GP
from gpu_jobs.artifacts import is_report_file, load_artifact, update_artifact, write_artifact
from gpu_jobs.errors import VerifyError
from gpu_jobs.minimise import Prepared, Pseudonyms, prepare, restore_outputs
from gpu_jobs.models import anomaly as A
from gpu_jobs.models import features as F
from gpu_jobs.models import range as R
from gpu_jobs.models.anomaly import AnomalyFamily
from gpu_jobs.models.anomaly import features as AF
from gpu_jobs.models.anomaly import plots as AP
from gpu_jobs.models.plots import FAULTS_FILE, HELDOUT_FILE, draw_loss, loss_data, parquet_bytes
from gpu_jobs.models.range import RangeFamily
from gpu_jobs.models.range import features as RF
from gpu_jobs.models.range import plots as RP
from gpu_jobs.spec import DatasetRef, JobKind, JobSpec, ModelSpec, Outputs
from tests.support.fleet_data import FleetData, build_fleet_data
from tests.support.model_ctx import make_ctx
from tests.support.toy_family import IMPORT_PATH

SMALL = {"vehicles": 10, "days": 2.0, "seed": 5}  # quality is not the point here: a few held-out vehicles
RANGE_HP = {"epochs": 12}
ANOMALY_HP = {"epochs": 4}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> FleetData:
    return build_fleet_data(tmp_path_factory.mktemp("small"), **SMALL)  # type: ignore[arg-type]


def train_artifact(family: Any, inputs: list[Path], hp: dict[str, Any], out: Path) -> tuple[Path, list[dict]]:  # type: ignore[type-arg]
    """Train in-process into an artifact at ``out`` (as the worker writes it); the per-epoch reports."""
    reports: list[dict] = []  # type: ignore[type-arg]
    ctx = make_ctx(out.parent / f"{out.name}-work", inputs, family.name, hp, seed=1,
                   report=lambda step, total, **m: reports.append(m))  # fmt: skip
    trained = family.train(ctx)
    write_artifact(out, state_dict=trained.state_dict, model_config=trained.model_config,
                   metrics=trained.metrics, files=trained.files)  # fmt: skip
    return out, reports


@pytest.fixture(scope="module")
def range_art(small: FleetData, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:  # type: ignore[type-arg]
    out, reports = train_artifact(
        RangeFamily(), [small.telemetry], RANGE_HP, tmp_path_factory.mktemp("r") / "m"
    )
    GP.render(out)
    return out, reports


@pytest.fixture(scope="module")
def anomaly_art(small: FleetData, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:  # type: ignore[type-arg]
    out, reports = train_artifact(
        AnomalyFamily(), [small.telemetry, small.truth], ANOMALY_HP, tmp_path_factory.mktemp("a") / "m"
    )
    GP.render(out)
    return out, reports


def range_heldout(model_dir: Path, small: FleetData) -> pl.DataFrame:
    """The held-out trips' predictions recomputed from the artifact's weights and the dataset."""
    art = load_artifact(model_dir)
    config = art.model_config
    trips = RF.trip_windows(
        F.read_telemetry(small.telemetry), min_km=float(config["hyperparameters"]["min_km"])
    )
    trips = trips.filter(pl.col(R.TARGET).is_finite() & (pl.col(R.TARGET) > 0))
    _, te = F.artifact_split(trips, config, seed=None)
    net = R.net_from_config(config, art.state_dict)
    return R.predict_trips(net, config, te.sort("token_id", "start"), R.calibration(config))


def anomaly_heldout(model_dir: Path, small: FleetData) -> pl.DataFrame:
    """The held-out windows' scores recomputed from the artifact's weights and the dataset."""
    art = load_artifact(model_dir)
    config = art.model_config
    windows = AF.anomaly_windows(
        F.read_telemetry(small.telemetry), window_minutes=int(config["hyperparameters"]["window_minutes"])
    )
    windows = windows.filter(pl.col("powertrain").is_in(list(A.TYPES)))
    _, te = F.artifact_split(windows, config, seed=None)
    return A.score_windows(A.build_net(config, art.state_dict), config, te)


def check_png(model_dir: Path, name: str, data: dict[str, Any]) -> bytes:
    """The plot's PNG: listed in the manifest with its sha256, under the cap, carrying ``data``'s digest."""
    art = load_artifact(model_dir)  # every file, plots included, against the manifest
    entry = art.manifest["plots"][name]
    assert "missing" not in entry, entry
    png = (model_dir / entry["file"]).read_bytes()
    assert entry["file"] in art.manifest["files"]
    assert len(png) == entry["bytes"] <= P.MAX_PNG_BYTES
    assert P.png_text(png)[P.DATA_KEY] == P.data_digest(data) == entry["data_sha256"]
    return png


# ---------------------------------------------------------------------------------------------------- range


def test_range_predicted_vs_actual_are_the_models_heldout_predictions(range_art, small: FleetData) -> None:  # type: ignore[no-untyped-def]
    model_dir, _ = range_art
    data = RP.predicted_vs_actual_data(model_dir)
    want = range_heldout(model_dir, small)
    assert data["n_trips"] == want.height > 0
    np.testing.assert_allclose(data["actual"], want[R.TARGET].to_numpy())
    np.testing.assert_allclose(data["predicted"], want["predicted_kwh_per_100km"].to_numpy(), rtol=1e-6)
    config = json.loads((model_dir / "model.json").read_bytes())
    assert sorted(set(data["token_id"])) == sorted(config["heldout_vehicles"])
    metrics = json.loads((model_dir / "metrics.json").read_bytes())
    assert data["mae"] == pytest.approx(metrics["mae"]) and data["baseline_mae"] == pytest.approx(
        metrics["baseline_mae"]
    )
    assert data["baseline"] == pytest.approx(config["fleet_mean_kwh_per_100km"])

    fig = RP.draw_predicted_vs_actual(data)
    ax = fig.axes[0]
    drawn = np.concatenate([c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)])
    assert sorted(map(tuple, drawn.tolist())) == sorted(zip(data["actual"], data["predicted"], strict=True))
    ys = [line.get_ydata() for line in ax.get_lines()]
    assert any(np.allclose(y, data["baseline"]) for y in ys)  # the baseline's prediction is drawn
    assert any("MAE" in t.get_text() for t in ax.get_legend().get_texts())
    check_png(model_dir, "predicted_vs_actual", data)


def test_range_scatter_thins_points_but_not_the_errors(range_art) -> None:  # type: ignore[no-untyped-def]
    model_dir, _ = range_art
    full, thin = RP.predicted_vs_actual_data(model_dir), RP.predicted_vs_actual_data(model_dir, max_points=5)
    assert len(thin["actual"]) == 5 < len(full["actual"])
    assert set(thin["actual"]) <= set(full["actual"])
    assert thin["mae"] == full["mae"] and thin["n_trips"] == full["n_trips"]  # over every trip


def test_range_residuals_per_vehicle_are_the_heldout_residuals(range_art, small: FleetData) -> None:  # type: ignore[no-untyped-def]
    model_dir, _ = range_art
    data = RP.residuals_data(model_dir)
    want = range_heldout(model_dir, small).with_columns(
        (pl.col("predicted_kwh_per_100km") - pl.col(R.TARGET)).alias("r")
    )
    assert [b["token_id"] for b in data["vehicles"]] == sorted(want["token_id"].unique().to_list())
    for box in data["vehicles"]:
        r = want.filter(pl.col("token_id") == box["token_id"])["r"].to_numpy()
        assert box["n"] == len(r)
        assert box["median"] == pytest.approx(float(np.median(r)), rel=1e-6)
        assert box["mean"] == pytest.approx(float(r.mean()), rel=1e-6)
    fig = RP.draw_residuals(data)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == [str(b["token_id"]) for b in data["vehicles"]]  # the real ids
    check_png(model_dir, "residuals", data)


def test_loss_curve_is_the_training_history(range_art) -> None:  # type: ignore[no-untyped-def]
    model_dir, reports = range_art
    data = loss_data(model_dir)
    assert data["epoch"] == list(range(1, RANGE_HP["epochs"] + 1))
    assert data["train"] == pytest.approx([r["loss"] for r in reports])
    assert data["validation"] == pytest.approx([r["val_loss"] for r in reports])
    assert all(v is not None and v > 0 for v in data["validation"])
    fig = draw_loss(data)
    lines = fig.axes[0].get_lines()
    assert [list(line.get_ydata()) for line in lines] == [
        pytest.approx(data["train"]),
        pytest.approx(data["validation"]),
    ]
    check_png(model_dir, "loss", data)


def test_render_lists_every_plot_and_rerenders_in_place(range_art) -> None:  # type: ignore[no-untyped-def]
    model_dir, _ = range_art
    before = load_artifact(model_dir).manifest
    assert set(before["plots"]) == {"loss", "predicted_vs_actual", "residuals"}
    again = GP.render(model_dir)
    after = load_artifact(model_dir).manifest
    assert again == after["plots"]
    assert {n for n in after["files"] if n.startswith("plots/")} == {f"plots/{n}.png" for n in again}
    assert sorted(p.name for p in (model_dir / "plots").iterdir()) == sorted(f"{n}.png" for n in again)


# -------------------------------------------------------------------------------------------------- anomaly


def test_anomaly_timeline_flags_exactly_the_windows_above_threshold(anomaly_art, small: FleetData) -> None:  # type: ignore[no-untyped-def]
    model_dir, _ = anomaly_art
    data = AP.timeline_data(model_dir, max_vehicles=100)
    scored = anomaly_heldout(model_dir, small)
    config = json.loads((model_dir / "model.json").read_bytes())
    assert sorted(v["token_id"] for v in data["vehicles"]) == sorted(config["heldout_vehicles"])
    faults = pl.read_parquet(small.truth / "faults.parquet")
    for v in data["vehicles"]:
        w = scored.filter(pl.col("token_id") == v["token_id"])
        assert v["threshold"] == pytest.approx(config["thresholds"][v["powertrain"]])
        above = w.filter(pl.col("score") > v["threshold"])
        assert v["n_flagged"] == above.height and v["n_windows"] == w.height
        # the flagged bands cover exactly the windows scored above the threshold
        starts = above["window_start"].dt.epoch("ms").to_numpy()
        inside = [
            any(a <= s < b for a, b in v["flagged"]) for s in w["window_start"].dt.epoch("ms").to_list()
        ]
        assert (
            np.flatnonzero(inside).tolist()
            == np.flatnonzero(np.isin(w["window_start"].dt.epoch("ms").to_numpy(), starts)).tolist()
        )
        assert sum(b - a for a, b in v["flagged"]) == above.height * 30 * 60_000
        # the drawn scores are the model's scores (peaks kept when thinned)
        by_t = dict(zip(w["window_start"].dt.epoch("ms").to_list(), w["score"].to_list(), strict=True))
        assert all(by_t[t] == pytest.approx(s, rel=1e-6) for t, s in zip(v["t_ms"], v["score"], strict=True))
        assert max(v["score"]) == pytest.approx(float(w["score"].max()), rel=1e-6)
        mine = faults.filter(pl.col("token_id") == v["token_id"]).sort("start")
        assert [f[:2] for f in v["faults"]] == [[int(a), int(b)] for a, b in zip(
            mine["start"].dt.epoch("ms"), mine["end"].dt.epoch("ms"), strict=True)]  # fmt: skip
    assert any(v["faults"] for v in data["vehicles"])  # the small fleet's held-out vehicles have faults

    shown = AP.timeline_data(model_dir)
    fig = AP.draw_timeline(shown)
    assert len(fig.axes) == len(shown["vehicles"])
    for ax, v in zip(fig.axes, shown["vehicles"], strict=True):
        assert str(v["token_id"]) in ax.get_title(loc="left")
        np.testing.assert_allclose(
            ax.get_lines()[0].get_ydata(), np.maximum(v["score"], v["threshold"] * 1e-3)
        )
        assert len(ax.patches) == len(v["faults"]) + len(v["flagged"])
    check_png(model_dir, "timeline", shown)


def test_anomaly_precision_recall_at_the_models_threshold_match_its_metrics(anomaly_art) -> None:  # type: ignore[no-untyped-def]
    model_dir, _ = anomaly_art
    data = AP.precision_recall_data(model_dir)
    metrics = json.loads((model_dir / "metrics.json").read_bytes())
    at = data["factor"].index(1.0)
    assert data["false_positive_rate"][at] == pytest.approx(metrics["false_positive_rate"])
    assert data["n_clean_windows"] == metrics["n_clean_windows"]
    h = pl.read_parquet(model_dir / HELDOUT_FILE)
    fault = h.filter(pl.col("label") == "fault")
    assert data["recall"][at] == pytest.approx(float(fault["flagged"].mean()))
    assert all(
        a >= b for a, b in zip(data["recall"], data["recall"][1:], strict=False)
    )  # higher bar, less recall
    fig = AP.draw_precision_recall(data)
    ys = [list(line.get_ydata()) for line in fig.axes[0].get_lines()[:3]]
    assert ys[1] == pytest.approx(data["recall"]) and ys[2] == pytest.approx(data["false_positive_rate"])
    check_png(model_dir, "precision_recall", data)


def test_anomaly_without_ground_truth_says_why_a_plot_is_missing(small: FleetData, tmp_path: Path) -> None:
    out, _ = train_artifact(AnomalyFamily(), [small.telemetry], {"epochs": 1}, tmp_path / "m")
    assert not (out / FAULTS_FILE).exists()
    plots = GP.render(out)
    assert "no ground truth" in plots["precision_recall"]["missing"]
    assert "file" in plots["timeline"] and "file" in plots["loss"]
    assert load_artifact(out).manifest["plots"] == plots


# ------------------------------------------------------------------------------------------------ failures


def test_a_failing_plot_is_recorded_missing_and_the_rest_are_drawn(range_art, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model_dir = tmp_path / "m"
    shutil.copytree(range_art[0], model_dir)
    update_artifact(model_dir, {HELDOUT_FILE: b"not parquet"})  # a valid artifact with a broken report file
    plots = GP.render(model_dir)
    assert set(plots) == {"loss", "predicted_vs_actual", "residuals"}
    assert "missing" in plots["predicted_vs_actual"] and "missing" in plots["residuals"]
    assert "file" in plots["loss"]
    art = load_artifact(model_dir)
    assert art.manifest["plots"] == plots
    assert not (model_dir / "plots" / "residuals.png").exists()  # the stale PNG went with its entry
    assert "plots/residuals.png" not in art.manifest["files"]


def test_a_plot_failure_never_fails_a_training_run(
    small: FleetData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(data: dict[str, Any]) -> Any:
        raise RuntimeError("the plotting library broke")

    monkeypatch.setattr(RP, "draw_residuals", broken)
    lines: list[str] = []
    out = api.train(dataset=small.telemetry, model="range", out=tmp_path / "m", params={"epochs": 2},
                    jobs_dir=tmp_path / "jobs", on_log=lines.append)  # fmt: skip
    assert out["state"] == "SUCCEEDED"
    assert out["plots"]["residuals"] == {"title": "Residuals per held-out vehicle",
                                         "missing": "RuntimeError: the plotting library broke"}  # fmt: skip
    assert any("residuals" in line and "missing" in line for line in lines)
    assert load_artifact(tmp_path / "m").manifest["plots"] == out["plots"]
    assert (tmp_path / "m" / "plots" / "predicted_vs_actual.png").is_file()


def test_a_family_without_plots_renders_none(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    write_artifact(model_dir, state_dict={}, model_config={"family": IMPORT_PATH}, metrics={})
    assert GP.render(model_dir) == {}
    assert load_artifact(model_dir).manifest["plots"] == {}


# ------------------------------------------------------------------------------------------------ pseudonyms


def test_report_files_trained_on_pseudonyms_come_back_with_the_real_ids(tmp_path: Path) -> None:
    real = [101, 202, 303]
    pseudo = Pseudonyms(b"k" * 32).mapping(real)
    held = pl.DataFrame({"token_id": [pseudo[202], pseudo[303]], "score": [1.0, 2.0]})
    faults = pl.DataFrame({"token_id": [pseudo[303]], "fault": ["tire_leak"]})
    model_dir = tmp_path / "m"

    def pq_bytes(df: pl.DataFrame) -> bytes:
        path = tmp_path / "x.parquet"
        df.write_parquet(path)
        return path.read_bytes()

    arts = write_artifact(model_dir, state_dict={}, metrics={},
                          model_config={"family": "anomaly", "train_vehicles": [pseudo[101]],
                                        "heldout_vehicles": [pseudo[202], pseudo[303]]},
                          files={HELDOUT_FILE: pq_bytes(held), FAULTS_FILE: pq_bytes(faults)})  # fmt: skip
    prep = Prepared(spec=None, root=tmp_path, original=None, forward=pseudo,  # type: ignore[arg-type]
                    reverse={p: t for t, p in pseudo.items()})  # fmt: skip
    restored = restore_outputs(arts, prep)
    art = load_artifact(
        model_dir, expected_manifest_sha256=restored[str(model_dir.resolve() / "manifest.json")]
    )
    assert pl.read_parquet(model_dir / HELDOUT_FILE)["token_id"].to_list() == [202, 303]
    assert pl.read_parquet(model_dir / FAULTS_FILE)["token_id"].to_list() == [303]
    assert art.model_config["heldout_vehicles"] == [202, 303]
    assert set(restored) == set(arts)


def test_a_model_sent_for_scoring_carries_no_report_files(
    range_art, small: FleetData, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    model_dir, _ = range_art
    assert any(is_report_file(n) for n in load_artifact(model_dir).manifest["files"])
    spec = JobSpec(kind=JobKind.INFER, model=ModelSpec(family="range"),
                   inputs=[DatasetRef.from_path(small.telemetry), DatasetRef.from_path(model_dir, role="model")],
                   outputs=Outputs(dir=str(tmp_path / "out")))  # fmt: skip
    prep = prepare(spec, tmp_path / "prep", Pseudonyms(b"k" * 32))
    sent = Path(prep.spec.inputs_with_role("model")[0].path)
    art = load_artifact(sent)
    assert not [n for n in art.manifest["files"] if is_report_file(n)]
    assert not (sent / "report").exists() and not (sent / "plots").exists()
    assert art.manifest["plots"] == {}
    real = set(json.loads((model_dir / "model.json").read_bytes())["heldout_vehicles"])
    assert not real & set(art.model_config["heldout_vehicles"])


def test_the_png_cap_is_enforced() -> None:
    fig = P.figure()
    fig.add_subplot().scatter(
        np.random.default_rng(0).random(20_000), np.random.default_rng(1).random(20_000)
    )
    with pytest.raises(P.PlotTooLarge):
        P.encode_png(fig, max_bytes=10_000)
    assert len(P.encode_png(fig)) <= P.MAX_PNG_BYTES


def test_verification_refuses_report_files_that_are_not_the_models(
    range_art, anomaly_art, small: FleetData, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A node that ships made-up held-out data (the plots' source) fails the local hold-out evaluation."""
    assert RangeFamily().evaluate(range_art[0], [small.telemetry], seed=1)["mae"] > 0  # honest: passes
    assert "recall" in AnomalyFamily().evaluate(anomaly_art[0], [small.telemetry, small.truth], seed=1)
    forged = tmp_path / "m"
    shutil.copytree(range_art[0], forged)
    held = pl.read_parquet(forged / HELDOUT_FILE)
    fake = held.with_columns(pl.col(R.TARGET).alias("predicted_kwh_per_100km"))  # a perfect-looking model
    update_artifact(forged, {HELDOUT_FILE: parquet_bytes(fake)})
    with pytest.raises(VerifyError, match="predicted_kwh_per_100km differs"):
        RangeFamily().evaluate(forged, [small.telemetry], seed=1)
    update_artifact(forged, {HELDOUT_FILE: parquet_bytes(held.head(1))})
    with pytest.raises(VerifyError, match="rows"):
        RangeFamily().evaluate(forged, [small.telemetry], seed=1)
