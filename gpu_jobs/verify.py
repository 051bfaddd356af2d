"""Verification of results from untrusted runners (every chain entry except ``local``), cheapest checks first.

1. **Integrity**: every output file's sha256 matches the result (the ``AgentRunner`` already checked them against
   the agent's manifest); a model artifact must load (``gpu_jobs.artifacts.load_artifact``: every file against
   its ``manifest.json``), carry this spec's ``spec_hash``, family and hyperparameters, and its ``metrics.json``
   must be the metrics the result reports.
2. **Training — local hold-out evaluation**: the family's ``evaluate(model_dir, inputs, seed=…)`` recomputes the
   held-out metrics from the delivered weights and *our* copy of the training data (verified against the spec's
   sha256s), with the spec's seeded split; every recomputed metric must match the reported one within
   ``rtol`` (1e-3) + ``atol``. A node that ships different weights, a different split, or invented numbers fails.
   A family without ``evaluate`` gets the integrity checks only (``require_evaluation=True`` refuses it).
3. **Inference — spot re-execution**: a random sample of vehicles (unpredictable to the node) is re-scored here
   with the same family code on our copy of the inputs; their output rows must match the node's row for row
   (floats within tolerance, everything else exactly), and the node's output may name no vehicle the inputs
   lack. Per-vehicle scoring makes a vehicle's rows independent of the other vehicles.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from depin_core.errors import PermanentError
from gpu_jobs.artifacts import MANIFEST, load_artifact
from gpu_jobs.context import JobContext
from gpu_jobs.errors import VerifyError
from gpu_jobs.registry import load_family
from gpu_jobs.spec import JobKind, JobResult, JobSpec, Outputs, sha256_file

RTOL = 1e-3
ATOL = 1e-6


@dataclass
class Verification:
    """What :func:`verify_result` (or another ``Verifier``) found: ``ok`` and a one-line ``detail``."""

    ok: bool
    detail: str


Verifier = Callable[[JobSpec, JobResult], Verification]


def verify_result(
    spec: JobSpec,
    result: JobResult,
    *,
    rtol: float = RTOL,
    atol: float = ATOL,
    sample_fraction: float = 0.05,
    min_vehicles: int = 2,
    max_vehicles: int = 16,
    rng: random.Random | None = None,
    require_evaluation: bool = False,
) -> Verification:
    """Check an untrusted ``result`` of ``spec`` (outputs under ``spec.outputs.dir``; inputs at the spec's
    local paths). Returns ``Verification(ok, detail)``; never raises for a bad result."""
    try:
        check_hashes(result)
        if spec.kind == JobKind.TRAIN:
            return verify_train(spec, result, rtol=rtol, atol=atol, require_evaluation=require_evaluation)
        return verify_infer(
            spec,
            result,
            rtol=rtol,
            atol=atol,
            sample_fraction=sample_fraction,
            min_vehicles=min_vehicles,
            max_vehicles=max_vehicles,
            rng=rng,
        )
    except PermanentError as e:  # VerifyError, ArtifactIntegrityError, JobError: the result does not hold up
        return Verification(False, str(e))


def check_hashes(result: JobResult) -> None:
    """Every file in ``result.artifacts`` exists and has the listed sha256."""
    if not result.artifacts:
        raise VerifyError("the result lists no output files")
    for path, want in result.artifacts.items():
        p = Path(path)
        if not p.is_file():
            raise VerifyError(f"output {p.name} is missing")
        if sha256_file(p) != want:
            raise VerifyError(f"output {p.name}: sha256 differs from the result's")


# -------------------------------------------------------------------------------------------------- train


def verify_train(
    spec: JobSpec,
    result: JobResult,
    *,
    rtol: float = RTOL,
    atol: float = ATOL,
    require_evaluation: bool = False,
) -> Verification:
    """Integrity of the model artifact + local hold-out evaluation (see the module doc)."""
    model_dir = Path(spec.outputs.dir)
    manifest = [p for p in result.artifacts if Path(p).name == MANIFEST]
    if len(manifest) != 1:
        raise VerifyError(f"the result lists {len(manifest)} {MANIFEST} files, not one")
    art = load_artifact(model_dir, expected_manifest_sha256=result.artifacts[manifest[0]])
    if art.manifest.get("spec_hash") != spec.spec_hash:
        raise VerifyError(
            f"the artifact was made for spec {str(art.manifest.get('spec_hash'))[:16]}…, not this job"
        )
    family = load_family(spec.model.family)
    named = art.model_config.get("family")
    if named not in (family.name, spec.model.family):
        raise VerifyError(f"the artifact is a {named!r} model, the job trains {spec.model.family!r}")
    hp = art.model_config.get("hyperparameters")
    if isinstance(hp, dict):
        for k, v in spec.model.hyperparameters.items():
            if hp.get(k) != v:
                raise VerifyError(f"the artifact's hyperparameter {k}={hp.get(k)!r}, the job asked for {v!r}")
    if bad := compare_metrics(result.metrics, art.metrics, keys=set(art.metrics) | set(result.metrics)):
        raise VerifyError("the reported metrics are not the artifact's metrics.json: " + "; ".join(bad[:5]))
    evaluate = getattr(family, "evaluate", None)
    if not callable(evaluate):
        if require_evaluation:
            raise VerifyError(f"family {spec.model.family!r} has no evaluate(); cannot check the model")
        return Verification(True, f"artifact hashes only (family {spec.model.family!r} has no evaluate)")
    inputs = [f for ref in spec.inputs if ref.role != "model" for f in ref.verify()]
    kwargs = {"seed": spec.seed} if "seed" in inspect.signature(evaluate).parameters else {}
    recomputed = evaluate(model_dir, inputs, **kwargs)
    if bad := compare_metrics(result.metrics, recomputed, keys=set(recomputed), rtol=rtol, atol=atol):
        raise VerifyError("local hold-out evaluation disagrees: " + "; ".join(bad[:5]))
    shown = ", ".join(f"{k}={v:.4g}" for k, v in recomputed.items() if isinstance(v, float))[:200]
    return Verification(True, f"hold-out evaluation: {len(recomputed)} metrics match ({shown})")


def compare_metrics(
    reported: dict[str, Any],
    recomputed: dict[str, Any],
    *,
    keys: Iterable[str],
    rtol: float = 0.0,
    atol: float = 0.0,
) -> list[str]:
    """Mismatches between ``reported`` and ``recomputed`` over ``keys`` (numbers within tolerance, NaN = NaN,
    nested dicts recursively, anything else equal)."""
    out: list[str] = []
    for k in sorted(keys):
        if k not in reported:
            out.append(f"{k} not reported")
        elif k not in recomputed:
            out.append(f"{k} reported but not in the artifact")
        elif not _same(reported[k], recomputed[k], rtol, atol):
            out.append(f"{k}: reported {_fmt(reported[k])}, recomputed {_fmt(recomputed[k])}")
    return out


def _same(a: Any, b: Any, rtol: float, atol: float) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(_same(a[k], b[k], rtol, atol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y, rtol, atol) for x, y in zip(a, b, strict=True))
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) and not isinstance(b, bool):
        fa, fb = float(a), float(b)
        if math.isnan(fa) or math.isnan(fb):
            return math.isnan(fa) and math.isnan(fb)
        return math.isclose(fa, fb, rel_tol=rtol, abs_tol=atol)
    return bool(a == b)


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else repr(v)[:80]


# -------------------------------------------------------------------------------------------------- infer


class _NoCheckpoints:
    def due(self, step: int) -> bool:
        return False

    def save(self, step: int, state: Any) -> None:
        return None

    def restore(self) -> None:
        return None


def verify_infer(
    spec: JobSpec,
    result: JobResult,
    *,
    rtol: float = RTOL,
    atol: float = ATOL,
    sample_fraction: float = 0.05,
    min_vehicles: int = 2,
    max_vehicles: int = 16,
    rng: random.Random | None = None,
) -> Verification:
    """Re-score a random sample of vehicles locally and compare their rows with the node's output."""
    import polars as pl
    import pyarrow.parquet as pq

    outputs = sorted(p for p in result.artifacts if p.endswith(".parquet"))
    if len(outputs) != 1:
        raise VerifyError(f"the result lists {len(outputs)} Parquet outputs, not one")
    remote_path = Path(outputs[0])
    remote_ids = set(pq.read_table(remote_path, columns=["token_id"])["token_id"].to_pylist())
    telemetry = [(ref, ref.verify()) for ref in spec.inputs if ref.role == "telemetry"]
    local_ids: set[int] = set()
    for _, files in telemetry:
        for f in files:
            local_ids |= set(pq.ParquetFile(f).read(columns=["token_id"])["token_id"].to_pylist())
    if invented := sorted(remote_ids - local_ids):
        raise VerifyError(f"the output scores vehicles the inputs do not hold: {invented[:5]}")
    rows = result.metrics.get("rows")
    if rows is not None and rows != pq.read_metadata(remote_path).num_rows:
        raise VerifyError(
            f"the result reports {rows} rows, the output holds {pq.read_metadata(remote_path).num_rows}"
        )
    pool = sorted(local_ids)
    k = min(len(pool), max(min_vehicles, min(max_vehicles, math.ceil(sample_fraction * len(pool)))))
    sample = sorted((rng or random.SystemRandom()).sample(pool, k))
    if not sample:
        raise VerifyError("the inputs hold no vehicles to re-score")
    with tempfile.TemporaryDirectory(prefix="depin-verify-") as tmp:
        local_out = _rescore(spec, Path(tmp), set(sample))
        local = pl.read_parquet(local_out) if local_out is not None else None
    remote = pl.read_parquet(remote_path).filter(pl.col("token_id").is_in(sample))
    if local is None:
        if remote.height:
            raise VerifyError(
                f"vehicles {sample}: the node scored {remote.height} rows, re-scoring gives none"
            )
        return Verification(True, f"re-scored {k} vehicles: no rows on either side")
    if bad := compare_frames(remote, local, rtol=rtol, atol=atol):
        raise VerifyError(f"re-scoring vehicles {sample} locally disagrees: " + "; ".join(bad[:5]))
    return Verification(True, f"re-scored {k} of {len(pool)} vehicles locally: {local.height} rows match")


def _rescore(spec: JobSpec, tmp: Path, sample: set[int]) -> Path | None:
    """Run the family's ``infer`` here, on CPU, over the sampled vehicles' rows; the output file or None."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    inputs: list[Path] = []
    for i, ref in enumerate(spec.inputs):
        if ref.role == "model":
            continue
        files = ref.verify()
        if ref.role != "telemetry":
            inputs += files
            continue
        base = Path(ref.path) if ref.files else Path(ref.path).parent
        for f in files:
            table = pq.ParquetFile(f).read()  # not pq.read_table: no hive columns from the path
            table = table.filter(pc.is_in(table["token_id"], value_set=_array(sorted(sample), table)))
            if table.num_rows == 0:
                continue
            dest = tmp / "inputs" / str(i) / f.relative_to(base)
            dest.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, dest)
            inputs.append(dest)
    if not any(p.is_relative_to(tmp) for p in inputs):
        return None
    model = spec.inputs_with_role("model")
    if len(model) != 1:
        raise VerifyError("an infer job needs exactly one model input")
    model_dir = Path(model[0].path)
    model[0].verify()
    (tmp / "out").mkdir()
    (tmp / "work").mkdir()
    local_spec = spec.model_copy(update={"outputs": Outputs(dir=str(tmp / "out"))})
    ctx = JobContext(
        spec=local_spec,
        workdir=tmp / "work",
        device=torch.device("cpu"),
        checkpointer=_NoCheckpoints(),
        log=lambda message: None,
        report=lambda *a, **k: None,
        autocast=contextlib.nullcontext,
        inputs=inputs,
    )
    out = load_family(spec.model.family).infer(ctx, model_dir)
    return Path(out.output)


def _array(values: list[int], table: Any) -> Any:
    import pyarrow as pa

    return pa.array(values, type=table.schema.field("token_id").type)


def compare_frames(remote: Any, local: Any, *, rtol: float = RTOL, atol: float = ATOL) -> list[str]:
    """Mismatches between two polars frames of output rows: same columns and rows (sorted by ``token_id`` and
    the time columns), floats within tolerance, everything else equal."""
    import polars as pl

    if set(remote.columns) != set(local.columns):
        diff = sorted(set(remote.columns) ^ set(local.columns))
        return [f"columns differ: {diff[:8]}"]
    if remote.height != local.height:
        return [f"{remote.height} rows from the node, {local.height} re-scored"]
    keys = [c for c in local.columns if c == "token_id" or local.schema[c].is_temporal()]
    a, b = remote.select(local.columns).sort(keys), local.sort(keys)
    out: list[str] = []
    for c in local.columns:
        x, y = a[c], b[c]
        if x.dtype.is_float() and y.dtype.is_float():
            xv, yv = x.to_numpy().astype(np.float64), y.to_numpy().astype(np.float64)
            bad = ~np.isclose(xv, yv, rtol=rtol, atol=atol, equal_nan=True)
            if bad.any():
                worst = (
                    float(np.nanmax(np.abs(xv - yv)[bad]))
                    if np.isfinite(xv[bad] - yv[bad]).any()
                    else math.nan
                )
                out.append(f"column {c}: {int(bad.sum())} of {len(xv)} rows differ (max |diff| {worst:.4g})")
        else:
            try:
                same = x.cast(y.dtype).eq_missing(y)
            except pl.exceptions.PolarsError:
                out.append(f"column {c}: type {x.dtype} vs {y.dtype}")
                continue
            if n := int((~same).sum()):
                out.append(f"column {c}: {n} of {len(same)} rows differ")
    return out
