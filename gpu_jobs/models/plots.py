"""What the families' report plots share: the report files a training job writes (``report/…`` in the
artifact), reading them back, and the per-epoch loss curve.

A training job cannot draw: it may run on an untrusted node that sees only pseudonyms. It writes the small
data the plots need (:data:`HELDOUT_FILE`, :data:`LOSSES_FILE`); ``gpu_jobs.plots.render`` draws the PNGs here,
after verification and after the pseudonyms were mapped back to the real vehicle ids.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from depin_core import plots as P
from gpu_jobs.models.base import Plot

if TYPE_CHECKING:
    from matplotlib.figure import Figure

HELDOUT_FILE = "report/heldout.parquet"  # per held-out window/trip: the model's predictions (token_id)
LOSSES_FILE = "report/losses.json"  # per epoch: training and validation loss
FAULTS_FILE = "report/faults.parquet"  # the held-out vehicles' ground-truth faults (when given)


def parquet_bytes(df: pl.DataFrame) -> bytes:
    """``df`` as Parquet bytes (zstd): a report file."""
    buf = io.BytesIO()
    df.write_parquet(buf, compression="zstd")
    return buf.getvalue()


def _finite_or_none(v: Any) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


def losses_bytes(history: dict[str, list[Any]], *, loss: str) -> bytes:
    """The per-epoch history of ``_train.train_loop`` as :data:`LOSSES_FILE` (NaN → null); ``loss`` names
    the loss for people."""
    body = {
        "loss": loss,
        "epoch": [int(e) for e in history.get("epoch", [])],
        "train": [_finite_or_none(v) for v in history.get("train", [])],
        "validation": [_finite_or_none(v) for v in history.get("validation", [])],
    }
    return json.dumps(body, indent=1).encode() + b"\n"


def check_report(model_dir: Path, name: str, expected: pl.DataFrame, *, rtol: float = 1e-3) -> None:
    """Verification: the artifact's report file ``name`` holds ``expected`` (recomputed here from the
    weights and our copy of the data): same columns and rows, numbers within ``rtol``, the rest equal.
    ``VerifyError`` naming the column otherwise; nothing when the artifact has no such file (older jobs)."""
    from gpu_jobs.errors import VerifyError

    path = model_dir / name
    if not path.is_file():
        return
    try:
        got = pl.read_parquet(path)
    except Exception as e:
        raise VerifyError(f"{name} is not a Parquet file ({e})") from e
    if got.columns != expected.columns or got.height != expected.height:
        raise VerifyError(
            f"{name} has columns {got.columns} × {got.height} rows, the recomputed held-out data "
            f"{expected.columns} × {expected.height}"
        )
    for col in expected.columns:
        a, b = got[col], expected[col]
        if a.dtype.is_float() and b.dtype.is_float():
            x, y = a.to_numpy(), b.to_numpy()
            same = bool(np.all((np.isnan(x) & np.isnan(y)) | np.isclose(x, y, rtol=rtol, atol=1e-6)))
        else:
            same = a.cast(b.dtype, strict=False).equals(b, check_names=False)
        if not same:
            raise VerifyError(f"{name}: column {col} differs from the held-out data recomputed here")


def read_report(model_dir: Path, name: str) -> pl.DataFrame:
    """A Parquet report file of the artifact; ``FileNotFoundError`` naming what wrote it when absent."""
    path = model_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} is not in the artifact (the training job predates plots; re-train)")
    return pl.read_parquet(path)


def loss_data(model_dir: Path) -> dict[str, Any]:
    """The loss curve's data: per epoch, training and validation loss (:data:`LOSSES_FILE`)."""
    path = model_dir / LOSSES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{LOSSES_FILE} is not in the artifact (the training job predates plots)")
    body = json.loads(path.read_bytes())
    return {k: body[k] for k in ("loss", "epoch", "train", "validation")}


def draw_loss(data: dict[str, Any]) -> Figure:
    """Training and validation loss per epoch (log scale when positive)."""
    fig = P.figure(7.0, 3.6)
    ax = fig.add_subplot()
    epochs = data["epoch"]
    ax.plot(epochs, [_nan(v) for v in data["train"]], label="training", color="tab:blue")
    if any(v is not None for v in data["validation"]):
        ax.plot(epochs, [_nan(v) for v in data["validation"]], label="validation (held-out vehicles)",
                color="tab:orange")  # fmt: skip
    values = [v for v in (*data["train"], *data["validation"]) if v is not None]
    if values and min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"loss ({data['loss']})" if len(data["loss"]) < 40 else "loss")
    ax.set_title("Loss per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _nan(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def loss_plot(model_dir: Path) -> Plot:
    """The loss curve of the artifact at ``model_dir``."""
    return Plot("loss", "Training and validation loss per epoch", lambda: loss_data(model_dir), draw_loss)
