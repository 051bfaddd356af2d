"""A tiny model family for the job-machinery tests (import path ``tests.support.toy_family:ToyFamily``).

It trains a 4-16-1 MLP with dropout (so the global torch RNG matters on resume) on columns x0..x3 → y, drawing
batches from its own ``torch.Generator``, and checkpoints model + optimizer + generator + global RNGs + step.
The optimizer is a few lines of Adam (:class:`ToyAdam`) rather than ``torch.optim``: constructing any
``torch.optim`` optimizer imports ``torch._dynamo``, about 2 s of CPU in every worker process, which the many
toy jobs of the suite would pay again and again.

Knobs (hyperparameters): ``steps``, ``batch_size``, ``lr``, ``crash_at_step`` (raise there), ``sleep_s`` (sleep
after every step). Environment: ``TOY_PAUSE_AT_STEP=k`` sleeps for a long time after step k (after its
checkpoint and report), giving the tests a deterministic moment to SIGKILL the worker.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from gpu_jobs.artifacts import load_artifact
from gpu_jobs.checkpoint import capture_rng, restore_rng
from gpu_jobs.context import InferOutput, JobContext, TrainOutput

FEATURES = ["x0", "x1", "x2", "x3"]
IMPORT_PATH = "tests.support.toy_family:ToyFamily"


def write_toy_dataset(path: Path, rows: int = 256, seed: int = 0) -> Path:
    """A Parquet file with x0..x3 and y = a linear function of them plus noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 4))
    y = x @ np.array([1.0, -2.0, 0.5, 3.0]) + 0.1 * rng.normal(size=rows)
    cols = {name: x[:, i] for i, name in enumerate(FEATURES)} | {"y": y}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)
    return path


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))


def _load_xy(files: list[Path], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    table = pa.concat_tables([pq.read_table(f) for f in files])
    x = torch.from_numpy(np.column_stack([table[c].to_numpy() for c in FEATURES]).astype(np.float32))
    y = torch.from_numpy(table["y"].to_numpy().astype(np.float32)).unsqueeze(1)
    return x.to(device), y.to(device)


class ToyAdam:
    """Adam (Kingma & Ba, no weight decay) over ``params``, with a checkpointable ``state_dict``."""

    def __init__(self, params: list[nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999)):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, 1e-8
        self.t = 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        self.t += 1
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            assert p.grad is not None
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v / (1 - b2**self.t)).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / (1 - b1**self.t))

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "m": list(self.m), "v": list(self.v)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
        self.m = [x.to(p.device).clone() for x, p in zip(state["m"], self.params, strict=True)]
        self.v = [x.to(p.device).clone() for x, p in zip(state["v"], self.params, strict=True)]


class ToyFamily:
    name = "toy"

    def train(self, ctx: JobContext) -> TrainOutput:
        hp: dict[str, Any] = ctx.spec.model.hyperparameters
        steps, bs = int(hp.get("steps", 40)), int(hp.get("batch_size", 32))
        x, y = _load_xy(ctx.inputs, ctx.device)
        model = _model().to(ctx.device)
        opt = ToyAdam(list(model.parameters()), lr=float(hp.get("lr", 0.01)))
        gen = torch.Generator().manual_seed(ctx.spec.seed)
        step = 0
        state = ctx.checkpointer.restore()
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            restore_rng(state["rng"])
            step = state["step"]
            ctx.log(f"resumed from step {step}")
        pause_at = int(os.environ.get("TOY_PAUSE_AT_STEP", "0"))
        model.train()
        while step < steps:
            idx = torch.randint(0, x.shape[0], (bs,), generator=gen).to(ctx.device)
            with ctx.autocast():
                loss = nn.functional.mse_loss(model(x[idx]).float(), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if hp.get("crash_at_step") == step:
                raise ValueError(f"toy family crashed on purpose at step {step}")
            if ctx.checkpointer.due(step):
                ctx.checkpointer.save(
                    step,
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "generator": gen.get_state(),
                        "rng": capture_rng(),
                        "step": step,
                    },
                )
            ctx.report(step, steps, loss=loss.item())
            if step == pause_at:
                time.sleep(300)
            if hp.get("sleep_s"):
                time.sleep(float(hp["sleep_s"]))
        model.eval()
        with torch.no_grad():
            mse = nn.functional.mse_loss(model(x), y).item()
        return TrainOutput(
            state_dict=model.state_dict(),
            model_config={"family": "toy", "hyperparameters": hp, "features": FEATURES, "target": "y"},
            metrics={"mse": mse, "steps": steps},
        )

    def infer(self, ctx: JobContext, model_dir: Path) -> InferOutput:
        art = load_artifact(model_dir)
        model = _model()
        model.load_state_dict(art.state_dict)
        model.to(ctx.device).eval()
        x, _ = _load_xy(ctx.inputs, ctx.device)
        with torch.no_grad():
            pred = model(x).squeeze(1).cpu().numpy()
        out = Path(ctx.spec.outputs.dir) / "predictions.parquet"
        pq.write_table(pa.table({"prediction": pred}), out)
        return InferOutput(output=out, rows=len(pred))


EVAL_IMPORT_PATH = "tests.support.toy_family:EvalToy"
LIE_ENV = "DEPIN_TEST_LIE"


class EvalToy(ToyFamily):
    """The toy family plus ``evaluate`` (mse of the artifact's model on the inputs), so untrusted toy results
    get the hold-out check. With ``DEPIN_TEST_LIE=1`` in its environment it reports the honest metrics but ships
    perturbed weights — a node whose models lie."""

    def train(self, ctx: JobContext) -> TrainOutput:
        out = super().train(ctx)
        if os.environ.get(LIE_ENV) == "1":
            out.state_dict = {k: v + 0.5 for k, v in out.state_dict.items()}
        return out

    def evaluate(self, model_dir: Path, inputs: list[Path]) -> dict[str, Any]:
        art = load_artifact(model_dir)
        model = _model()
        model.load_state_dict(art.state_dict)
        model.eval()
        x, y = _load_xy(inputs, torch.device("cpu"))
        with torch.no_grad():
            return {"mse": nn.functional.mse_loss(model(x), y).item()}
