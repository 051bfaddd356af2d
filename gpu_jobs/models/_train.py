"""The training loop the model families share: seeded mini-batches, checkpoints, bit-exact resume on CPU.

The data order is a pure function of ``(seed, epoch)`` (a fresh ``torch.Generator`` per epoch), so the data
cursor is just ``(epoch, batch)``. A checkpoint holds the model and optimizer ``state_dict``, torch's global RNG
state (dropout and friends) and the cursor; restoring it continues exactly where the saved run was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from depin_core.errors import ConfigError

LossFn = Callable[[torch.Tensor], torch.Tensor]  # batch indices (CPU int64) → scalar loss


@dataclass(frozen=True)
class LoopConfig:
    """Optimisation settings (from the job's hyperparameters)."""

    epochs: int = 100
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4

    @classmethod
    def from_hparams(cls, hp: dict[str, Any], **defaults: Any) -> LoopConfig:
        """Read ``epochs``, ``batch_size``, ``lr``, ``weight_decay`` from ``hp`` over ``defaults``."""
        base = {**cls().__dict__, **defaults}
        vals = {k: type(base[k])(hp.get(k, base[k])) for k in base}
        if vals["epochs"] < 1 or vals["batch_size"] < 1 or vals["lr"] <= 0:
            raise ConfigError(f"hyperparameters: epochs, batch_size and lr must be positive, got {vals}")
        return cls(**vals)


def seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA) and numpy's legacy global generator."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of ``epoch``: a permutation of ``range(n)`` that depends only on (seed, epoch)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(n, generator=g)


def train_loop(
    ctx: Any,
    model: torch.nn.Module,
    n_samples: int,
    loss_fn: LossFn,
    cfg: LoopConfig,
    *,
    seed: int,
    tag: str,
    val_fn: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place over ``n_samples`` with ``loss_fn``; returns ``{"loss", "steps", "history"}``
    (``history``: per epoch, ``epoch``, the mean training loss ``train`` and ``validation`` = ``val_fn()``
    after the epoch, in eval mode without gradients, or None without ``val_fn``).

    ``ctx`` is the :class:`gpu_jobs.context.JobContext`: ``ctx.checkpointer`` saves every N steps and
    ``restore()`` resumes (a checkpoint whose ``tag`` differs, e.g. another family, is ignored);
    ``ctx.report(step, total, epoch=…, loss=…)`` gets progress once per epoch; ``ctx.autocast()`` wraps the
    forward pass. The history is part of the checkpoint, so a resumed run reports every epoch.
    """
    if n_samples < 1:
        raise ConfigError(f"{tag}: no training samples; the dataset has no usable windows for this model")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = -(-n_samples // cfg.batch_size)
    total = per_epoch * cfg.epochs
    epoch, batch, step = 0, 0, 0
    history: dict[str, list[Any]] = {"epoch": [], "train": [], "validation": []}
    running, count = 0.0, 0  # the current epoch's loss sum and batches (a resumed epoch keeps its own)
    state = ctx.checkpointer.restore()
    if state is not None and state.get("tag") == tag:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_torch"])
        epoch, batch, step = (int(state["cursor"][k]) for k in ("epoch", "batch", "step"))
        saved = state.get("history")
        if isinstance(saved, dict) and set(saved) == set(history):
            history = {k: list(v) for k, v in saved.items()}
        running, count = float(state.get("running", 0.0)), int(state.get("count", 0))
        ctx.log(f"{tag}: resumed from step {step} (epoch {epoch}, batch {batch})")
    device = next(model.parameters()).device
    last = float("nan")
    while epoch < cfg.epochs:
        order = epoch_order(n_samples, seed, epoch)
        while batch < per_epoch:
            idx = order[batch * cfg.batch_size : (batch + 1) * cfg.batch_size]
            model.train()
            with ctx.autocast():
                loss = loss_fn(idx.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            batch += 1
            step += 1
            last = float(loss.detach())
            running, count = running + last, count + 1
            if ctx.checkpointer.due(step):
                ctx.checkpointer.save(
                    step,
                    {
                        "tag": tag,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "rng_torch": torch.get_rng_state(),
                        "cursor": {"epoch": epoch, "batch": batch, "step": step},
                        "history": history,
                        "running": running,
                        "count": count,
                    },
                )
        train_loss = running / max(count, 1)
        val = _validation(model, val_fn)
        history["epoch"].append(epoch + 1)
        history["train"].append(train_loss)
        history["validation"].append(val)
        extra = {} if val is None else {"val_loss": val}
        ctx.report(step, total, epoch=epoch + 1, loss=train_loss, **extra)
        running, count = 0.0, 0
        epoch, batch = epoch + 1, 0
    model.eval()
    return {"loss": last, "steps": float(step), "history": history}


def _validation(model: torch.nn.Module, val_fn: Callable[[], float] | None) -> float | None:
    """``val_fn()`` in eval mode without gradients (no RNG is drawn, so resuming stays bit-exact)."""
    if val_fn is None:
        return None
    model.eval()
    with torch.no_grad():
        return float(val_fn())
