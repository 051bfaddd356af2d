"""GPU-jobs benchmark: the project's training loop vs a bare torch loop, feature building, batch scoring.

One run, one process (device: CUDA when available, else CPU with the project's thread setting):
1. a real telemetry dataset: emulator → DimoClient → Parquet store (30 vehicles × 7 days × 1 min);
2. ``feature_rows_per_s``: telemetry rows/s through the anomaly windows + range trips feature builders;
3. ``ratio_vs_bare``: samples/s of ``gpu_jobs.models._train.train_loop`` over samples/s of a bare torch loop
   (same pre-built tensors, same model and initial weights, same AdamW and batch size), best of ``--repeat``;
4. ``score_rows_per_s``: telemetry rows/s through streaming batch scoring (anomaly, the heavier family) with a
   model trained by ``LocalRunner`` (the real subprocess path).
Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_jobs.artifacts import load_artifact
from gpu_jobs.checkpoint import FileCheckpointer
from gpu_jobs.context import JobContext
from gpu_jobs.device import select_device
from gpu_jobs.local import LocalRunner
from gpu_jobs.models import anomaly
from gpu_jobs.models import features as F
from gpu_jobs.models._train import LoopConfig, train_loop
from gpu_jobs.models.anomaly.features import anomaly_windows
from gpu_jobs.models.range import RangeNet
from gpu_jobs.models.range.features import trip_windows
from gpu_jobs.spec import DatasetRef, JobKind, JobSpec, JobState, ModelSpec, Outputs, Resources
from tests.support.fleet_data import build_fleet_data


def _sync() -> None:
    """Wait for queued CUDA work, so a clock stops when the GPU is done, not when the launches are."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def best_of(repeat: int, fn) -> float:  # type: ignore[no-untyped-def]
    return min(_timed(fn) for _ in range(repeat))


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    _sync()  # nothing queued earlier is billed to ``fn``
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


def bare_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: LoopConfig, seed: int) -> None:
    """What a hand-written loop does: permute, slice, forward, MSE, backward, step."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = x.shape[0]
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).to(x.device)
        for lo in range(0, n, cfg.batch_size):
            idx = order[lo : lo + cfg.batch_size]
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vehicles", type=int, default=30)
    ap.add_argument("--days", type=float, default=7.0)
    ap.add_argument("--samples", type=int, default=65_536, help="training samples for the loop comparison")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    choice = select_device(Resources())
    device = choice.device
    work = Path(tempfile.mkdtemp(prefix="depin-bench-train-"))
    t = time.perf_counter()
    data = build_fleet_data(work / "fleet", vehicles=args.vehicles, days=args.days, seed=7)
    print(f"dataset ready in {time.perf_counter() - t:.1f}s", file=sys.stderr)

    files = F.dataset_files(data.telemetry)
    df = F.read_telemetry(data.telemetry)
    rows = df.height
    feature_s = best_of(args.repeat, lambda: (trip_windows(df), anomaly_windows(df)))
    windows = anomaly_windows(df)

    # the same pre-built tensors and model for both loops: real window features, tiled to --samples
    cols = [c for c in windows.columns if windows.schema[c].is_numeric() and c != "token_id"]
    base = torch.nan_to_num(torch.tensor(windows.select(cols).to_numpy(), dtype=torch.float32))
    reps = -(-args.samples // base.shape[0])
    x = base.repeat(reps, 1)[: args.samples].to(device)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = x[:, 0].clone()
    cfg = LoopConfig(epochs=args.epochs, batch_size=256, lr=1e-3)
    torch.manual_seed(0)
    model0 = RangeNet(x.shape[1], 64).to(device)
    ckpt = FileCheckpointer(work / "ckpt", every_steps=0)
    ctx = JobContext(
        spec=None,
        workdir=work,
        device=device,
        checkpointer=ckpt,
        log=lambda _m: None,
        report=lambda *a, **k: None,
        autocast=choice.autocast,
    )

    def project() -> None:
        model = copy.deepcopy(model0)
        train_loop(
            ctx,
            model,
            x.shape[0],
            lambda idx: torch.nn.functional.mse_loss(model(x[idx]), y[idx]),
            cfg,
            seed=0,
            tag="bench",
        )

    def bare() -> None:
        with choice.autocast():
            bare_loop(copy.deepcopy(model0), x, y, cfg, seed=0)

    samples = args.samples * args.epochs
    project(), bare()  # untimed warm-up: the first autograd/optimizer calls of a process are slow
    project_s, bare_s = float("inf"), float("inf")
    for _ in range(args.repeat):  # interleaved, so drift hits both alike
        project_s = min(project_s, _timed(project))
        bare_s = min(bare_s, _timed(bare))

    # batch scoring with a model trained through the real LocalRunner path
    spec = JobSpec(
        kind=JobKind.TRAIN,
        model=ModelSpec(family="anomaly"),
        seed=0,
        inputs=[DatasetRef.from_path(data.telemetry)],
        outputs=Outputs(dir=str(work / "model")),
    )
    with LocalRunner(work / "jobs") as runner:
        result = runner.result(runner.submit(spec))
    if result.state != JobState.SUCCEEDED:
        raise SystemExit(f"training job failed: {result.error}")
    art = load_artifact(work / "model")
    score_s = best_of(
        args.repeat,
        lambda: anomaly.score_dataset(art.state_dict, art.model_config, files, work / "scores.parquet"),
    )
    out = {
        "device": choice.info.label,
        "telemetry_rows": rows,
        "feature_rows_per_s": round(rows / feature_s),
        "train_samples": samples,
        "project_samples_per_s": round(samples / project_s),
        "bare_samples_per_s": round(samples / bare_s),
        "ratio_vs_bare": round(bare_s / project_s, 3),
        "score_rows_per_s": round(rows / score_s),
        "train_job_seconds": round(result.timings["total_s"], 2),
        "threads": torch.get_num_threads(),
    }
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
