"""Verification of untrusted results: the families' local hold-out evaluation reproduces the training job's
metrics; tampered artifacts, lying metrics, a wrong split and altered predictions are caught."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import torch

from gpu_jobs.artifacts import load_artifact, write_artifact
from gpu_jobs.errors import VerifyError
from gpu_jobs.models.anomaly import AnomalyFamily
from gpu_jobs.models.range import RangeFamily
from gpu_jobs.spec import DatasetRef, JobKind, JobResult, JobSpec, JobState, ModelSpec, Outputs, sha256_file
from gpu_jobs.verify import compare_frames, compare_metrics, verify_result
from tests.support.fleet_data import FleetData
from tests.support.serving import ANOMALY_HP, RANGE_HP, train_artifact

RANGE_SEED = 1  # tests.support.serving trains range_artifact with seed 1


def _files(d: Path) -> dict[str, str]:
    return {str(p.resolve()): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}


def _train_case(
    artifact: Path, tmp: Path, fleet: FleetData, *, seed: int = RANGE_SEED, hp: dict[str, Any] | None = None
) -> tuple[JobSpec, JobResult]:
    """An untrusted train result as the chain sees it: the artifact staged in ``tmp/stage``."""
    stage = tmp / "stage"
    shutil.copytree(artifact, stage)
    spec = JobSpec(
        kind=JobKind.TRAIN,
        model=ModelSpec(family="range", hyperparameters=RANGE_HP if hp is None else hp),
        inputs=[DatasetRef.from_path(fleet.telemetry)],
        seed=seed,
        outputs=Outputs(dir=str(stage)),
    )
    art = load_artifact(stage)
    assert art.manifest["spec_hash"] == spec.spec_hash  # the fixture trained exactly this spec
    result = JobResult(
        job_id="0" * 12 + "-" + "0" * 8,
        spec_hash=spec.spec_hash,
        state=JobState.SUCCEEDED,
        artifacts=_files(stage),
        metrics=art.metrics,
    )
    return spec, result


def _rewrite(stage: Path, spec: JobSpec, art: Any, **changes: Any) -> dict[str, str]:
    """Re-export the artifact ``art`` into ``stage`` with ``changes``: internally consistent hashes."""
    fields = {
        "state_dict": art.state_dict,
        "model_config": art.model_config,
        "metrics": art.metrics,
        **changes,
    }
    write_artifact(stage, spec=spec, **fields)
    return _files(stage)


# ------------------------------------------------------------------------------------- family.evaluate


def test_range_evaluate_reproduces_the_training_metrics(
    range_artifact: Path, serving_fleet: FleetData
) -> None:
    reported = load_artifact(range_artifact).metrics
    recomputed = RangeFamily().evaluate(range_artifact, [serving_fleet.telemetry], seed=RANGE_SEED)
    assert {"mae", "baseline_mae", "fleet_model_mae", "history_baseline_mae", "n_train_windows"} <= set(
        recomputed
    )
    assert "train_loss" not in recomputed  # needs the training run
    assert compare_metrics(reported, recomputed, keys=set(recomputed), rtol=1e-6, atol=1e-9) == []
    with pytest.raises(VerifyError, match="not the seeded split"):
        RangeFamily().evaluate(range_artifact, [serving_fleet.telemetry], seed=RANGE_SEED + 1)


def test_anomaly_evaluate_reproduces_recall_and_fpr(tmp_path: Path, serving_fleet: FleetData) -> None:
    inputs = [serving_fleet.telemetry, serving_fleet.truth]
    model = train_artifact(
        tmp_path / "anomaly", "anomaly", inputs, ANOMALY_HP, seed=2
    )  # both faults held out
    reported = load_artifact(model).metrics
    recomputed = AnomalyFamily().evaluate(model, inputs, seed=2)
    assert {"recall", "false_positive_rate", "by_fault", "heldout_flagged_share"} <= set(recomputed)
    assert compare_metrics(reported, recomputed, keys=set(recomputed), rtol=1e-6, atol=1e-9) == []
    with pytest.raises(Exception, match="not 'range'"):
        RangeFamily().evaluate(model, inputs)


def test_compare_metrics_tolerance_nan_and_nesting() -> None:
    a = {"mae": 1.0, "n": 3, "nan": float("nan"), "d": {"x": 2.0}, "unit": "kWh"}
    assert compare_metrics(a, {**a, "mae": 1.0005}, keys=a, rtol=1e-3) == []
    assert compare_metrics(a, {**a, "mae": 1.01}, keys=a, rtol=1e-3) == ["mae: reported 1, recomputed 1.01"]
    assert compare_metrics(a, {**a, "d": {"x": 2.5}}, keys=a, rtol=1e-3)[0].startswith("d:")
    assert compare_metrics(a, {**a, "nan": 0.0}, keys=a)[0].startswith("nan:")
    assert compare_metrics({}, a, keys=["mae"]) == ["mae not reported"]


# ------------------------------------------------------------------------------------------ verify train


def test_an_honest_range_model_passes_local_holdout_verification(
    range_artifact: Path, serving_fleet: FleetData, tmp_path: Path
) -> None:
    spec, result = _train_case(range_artifact, tmp_path, serving_fleet)
    check = verify_result(spec, result)
    assert check.ok, check.detail
    assert check.detail.startswith("hold-out evaluation:") and "mae=" in check.detail


def test_lying_results_fail_verification(
    range_artifact: Path, serving_fleet: FleetData, tmp_path: Path
) -> None:
    spec, result = _train_case(range_artifact, tmp_path, serving_fleet)
    stage = Path(spec.outputs.dir)

    # 1. reported metrics that are not the artifact's
    lie = result.model_copy(update={"metrics": {**result.metrics, "mae": result.metrics["mae"] * 0.5}})
    check = verify_result(spec, lie)
    assert not check.ok and "not the artifact's metrics.json" in check.detail

    # 2. different weights shipped with the honest numbers (consistent hashes: only hold-out evaluation sees it)
    art = load_artifact(stage)
    torch.manual_seed(0)
    noisy = {k: v + 0.3 * torch.randn_like(v) for k, v in art.state_dict.items()}
    files = _rewrite(stage, spec, art, state_dict=noisy)
    check = verify_result(spec, result.model_copy(update={"artifacts": files}))
    assert not check.ok and "local hold-out evaluation disagrees" in check.detail and "mae" in check.detail

    # 3. invented, better numbers written into a consistent artifact
    better = {**art.metrics, "mae": art.metrics["mae"] * 0.5}
    files = _rewrite(stage, spec, art, metrics=better)
    check = verify_result(spec, result.model_copy(update={"artifacts": files, "metrics": better}))
    assert not check.ok and "mae: reported" in check.detail

    # 4. a file changed after the manifest was written
    files = _rewrite(stage, spec, art)
    (stage / "model.json").write_text(json.dumps({**art.model_config, "heldout_vehicles": []}))
    check = verify_result(spec, result.model_copy(update={"artifacts": files}))
    assert not check.ok and "sha256" in check.detail

    # 5. the honest artifact again, but claimed for another spec (another seed → another split)
    files = _rewrite(stage, spec, art)
    other = spec.model_copy(update={"seed": RANGE_SEED + 1})
    check = verify_result(other, result.model_copy(update={"artifacts": files}))
    assert not check.ok and "made for spec" in check.detail
    assert verify_result(spec, result.model_copy(update={"artifacts": files})).ok


# ------------------------------------------------------------------------------------------ verify infer


def _infer_case(family: str, artifact: Path, fleet: FleetData, tmp: Path) -> tuple[JobSpec, JobResult, Path]:
    """An untrusted infer result: the family's own scoring output, staged as the node would deliver it."""
    from gpu_jobs.models import anomaly, range

    stage = tmp / "stage"
    spec = JobSpec(
        kind=JobKind.INFER,
        model=ModelSpec(family=family),
        inputs=[DatasetRef.from_path(fleet.telemetry), DatasetRef.from_path(artifact, role="model")],
        outputs=Outputs(dir=str(stage)),
    )
    art = load_artifact(artifact)
    files = [str(f) for f in sorted(fleet.telemetry.rglob("*.parquet"))]
    out = stage / "predictions.parquet"
    module = range if family == "range" else anomaly
    scored = module.score_dataset(art.state_dict, art.model_config, files, out)
    result = JobResult(
        job_id="1" * 12 + "-" + "1" * 8,
        spec_hash=spec.spec_hash,
        state=JobState.SUCCEEDED,
        artifacts=_files(stage),
        metrics={**scored.metrics, "rows": scored.rows},
    )
    return spec, result, out


@pytest.mark.parametrize("family", ["range", "anomaly"])
def test_honest_predictions_pass_and_altered_rows_fail(
    family: str, request: pytest.FixtureRequest, serving_fleet: FleetData, tmp_path: Path
) -> None:
    artifact = request.getfixturevalue(f"{family}_artifact")
    spec, result, out = _infer_case(family, artifact, serving_fleet, tmp_path)
    every = {"sample_fraction": 1.0, "max_vehicles": 1000}
    check = verify_result(spec, result, rng=random.Random(1), **every)
    assert check.ok, check.detail
    assert check.detail.startswith("re-scored")
    assert verify_result(spec, result, rng=random.Random(2)).ok  # the default small sample

    preds = pl.read_parquet(out)
    victim = int(preds["token_id"][0])
    col = "range_km" if family == "range" else "score"
    tampered = preds.with_columns(
        pl.when(pl.col("token_id") == victim).then(pl.col(col) * 1.1).otherwise(pl.col(col)).alias(col)
    )
    tampered.write_parquet(out)
    check = verify_result(spec, result.model_copy(update={"artifacts": _files(out.parent)}), **every)
    assert not check.ok and f"column {col}" in check.detail

    invented = pl.concat(
        [preds, preds.head(1).with_columns(pl.lit(999_999, preds["token_id"].dtype).alias("token_id"))]
    )
    invented.write_parquet(out)
    files = _files(out.parent)
    check = verify_result(
        spec, result.model_copy(update={"artifacts": files, "metrics": {"rows": invented.height}})
    )
    assert not check.ok and "vehicles the inputs do not hold" in check.detail

    preds.filter(pl.col("token_id") != victim).write_parquet(out)  # a vehicle left out
    files = _files(out.parent)
    check = verify_result(spec, result.model_copy(update={"artifacts": files, "metrics": {}}), **every)
    assert not check.ok and "rows" in check.detail


def test_hashes_are_checked_first(tmp_path: Path) -> None:
    f = tmp_path / "predictions.parquet"
    pl.DataFrame({"token_id": [1]}).write_parquet(f)
    spec = JobSpec(kind=JobKind.TRAIN, model=ModelSpec(family="range"), outputs=Outputs(dir=str(tmp_path)))
    base = JobResult(job_id="j", spec_hash=spec.spec_hash, state=JobState.SUCCEEDED)
    assert "lists no output files" in verify_result(spec, base).detail
    bad = base.model_copy(update={"artifacts": {str(f): "0" * 64}})
    assert "sha256 differs" in verify_result(spec, bad).detail
    gone = base.model_copy(update={"artifacts": {str(tmp_path / "nope"): "0" * 64}})
    assert "missing" in verify_result(spec, gone).detail


def test_compare_frames_sorts_by_keys_and_names_the_column() -> None:
    a = pl.DataFrame({"token_id": [2, 1], "x": [1.0, 2.0], "flag": [True, False]})
    b = pl.DataFrame({"token_id": [1, 2], "x": [2.0, 1.0000001], "flag": [False, True]})
    assert compare_frames(a, b) == []
    assert compare_frames(a, b.with_columns(pl.col("flag").not_()))[0].startswith("column flag: 2 of 2")
    assert "rows" in compare_frames(a, b.head(1))[0]
    assert "columns differ" in compare_frames(a, b.drop("x"))[0]
