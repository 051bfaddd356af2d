"""A complete model family outside the package, as a plugin: ``linear``, least squares of ``y`` on ``x0, x1``.

One folder and one registration (``DEPIN_FAMILIES="linear=tests.gpu_jobs.plugin_family:LinearFamily"``) make
it trainable through ``gpu_jobs.api.train``, publishable and servable by a gateway: everything a family gives
(:class:`gpu_jobs.models.base.ModelFamily`) is here, nothing of it anywhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gpu_jobs.artifacts import load_artifact
from gpu_jobs.context import InferOutput, JobContext, TrainOutput
from gpu_jobs.models import online as OL
from gpu_jobs.models.base import Quality
from gpu_jobs.models.features import dataset_files
from gpu_jobs.models.score import predictions_path

NAME = "linear"
FEATURES = ("x0", "x1")
REGISTRATION = f"{NAME}=tests.gpu_jobs.plugin_family:LinearFamily"


def write_dataset(path: Path, rows: int = 64, seed: int = 0) -> Path:
    """A Parquet file with x0, x1 and y = 2·x0 − 3·x1 + 1 plus a little noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 2))
    y = x @ np.array([2.0, -3.0]) + 1.0 + 0.01 * rng.normal(size=rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"x0": x[:, 0], "x1": x[:, 1], "y": y}), path)
    return path


def _read(inputs: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    table = pa.concat_tables([pq.read_table(f) for p in inputs for f in dataset_files(p)])
    x = np.column_stack([table[c].to_numpy() for c in FEATURES])
    return x, table["y"].to_numpy()


def _predict(state: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    w, b = state["weight"].double().numpy(), float(state["bias"])
    return np.asarray(x @ w + b, dtype=np.float64)


class LinearOnline:
    """The online model: rows ``{x0, x1}`` → ``{y}``."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state
        fields = [OL.NumberField(n, "1", f"feature {n}", minimum=-1e6, maximum=1e6) for n in FEATURES]
        self.matrix = OL.Matrix(fields)
        self.names = frozenset(FEATURES)
        self.input_schema = OL.row_schema(fields, "linear input row")
        self.output_schema = OL.output_schema(
            "linear output row", {"y": {"type": "number", "description": "w·x + b", "x-unit": "1"}}
        )
        self.example = [{"x0": 1.0, "x1": 2.0}, {"x0": -0.5, "x1": 0.25}]

    def columns(self, rows: Any) -> OL.Columns:
        rows = OL.check_rows(rows)
        index = range(len(rows))
        OL.check_keys(rows, index, self.names, self.names)
        arr = self.matrix.parse(rows, index)
        return dict(zip(self.matrix.names, np.ascontiguousarray(arr.T), strict=True))

    def predict(self, cols: OL.Columns) -> OL.Columns:
        return {"y": _predict(self.state, np.stack([cols[n] for n in FEATURES], axis=1))}


class LinearFamily:
    """``"linear"``: least squares on the first 3/4 of the rows, held-out MAE on the rest."""

    name = NAME
    description = "least squares of y on x0, x1 (a plugin family for tests)"
    columns = (*FEATURES, "y")
    uses_ground_truth = False
    headline = "mae"

    def train(self, ctx: JobContext) -> TrainOutput:
        x, y = _read(ctx.inputs)
        cut = len(y) * 3 // 4
        design = np.column_stack([x[:cut], np.ones(cut)])
        coef = np.linalg.lstsq(design, y[:cut], rcond=None)[0]
        state = {"weight": torch.tensor(coef[:2]), "bias": torch.tensor(coef[2])}
        config = {"family": NAME, "features": list(FEATURES)}
        return TrainOutput(state_dict=state, model_config=config, metrics=self._metrics(state, x, y, cut))

    @staticmethod
    def _metrics(state: dict[str, torch.Tensor], x: np.ndarray, y: np.ndarray, cut: int) -> dict[str, Any]:
        held = y[cut:]
        return {
            "mae": float(np.mean(np.abs(_predict(state, x[cut:]) - held))),
            "baseline_mae": float(np.mean(np.abs(y[:cut].mean() - held))),
        }

    def infer(self, ctx: JobContext, model_dir: Path) -> InferOutput:
        art = load_artifact(model_dir)
        x, _ = _read(ctx.inputs[:1])
        out = predictions_path(ctx)
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"y": _predict(art.state_dict, x)}), out)
        return InferOutput(output=out, rows=len(x))

    def evaluate(self, model_dir: Path, inputs: list[Path], *, seed: int | None = None) -> dict[str, Any]:
        x, y = _read(inputs)
        return self._metrics(load_artifact(model_dir).state_dict, x, y, len(y) * 3 // 4)

    def predictor(
        self, config: dict[str, Any], state: dict[str, torch.Tensor], device: torch.device
    ) -> LinearOnline:
        return LinearOnline(state)

    def quality(self, metrics: dict[str, Any]) -> Quality:
        ok = metrics["mae"] < metrics["baseline_mae"]
        return Quality(ok, {"baseline_mae": metrics["baseline_mae"]}, [] if ok else ["not below the mean"])

    def summary(self, metrics: dict[str, Any]) -> str:
        return f"Held-out MAE {metrics['mae']:.4f} vs the mean's {metrics['baseline_mae']:.4f}."
