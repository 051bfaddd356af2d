"""Training checkpoints without pickle: tensors → one safetensors file, structure and scalars → one JSON file.

A checkpoint at step N is the pair ``ckpt-00000000N.safetensors`` + ``ckpt-00000000N.json`` in the job's
checkpoint directory. The safetensors file is written first, the JSON (which carries the safetensors sha256)
last, each atomically; the JSON is the commit marker, so a crash mid-save leaves the previous checkpoint intact.

Structure encoding (one JSON node per value): tensor ``{"t": name}``, numpy array ``{"n": name}``, dict
``{"d": [[key, node], …]}`` (keys str or int, e.g. optimizer param ids), list ``{"l": […]}``, tuple
``{"u": […]}``, scalar (int, float incl. nan/inf, str, bool, None) ``{"v": value}``.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from depin_core.errors import ConfigError
from depin_core.fs import atomic_write_bytes

_NAME = re.compile(r"^ckpt-(\d{9})\.json$")
FORMAT = "depin-checkpoint/1"


def flatten_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split nested ``state`` into a JSON-able structure and a flat ``{name: CPU tensor}`` dict."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(v: Any, where: str) -> Any:
        if isinstance(v, torch.Tensor):
            name = f"t{len(tensors)}"
            # clone: safetensors refuses tensors that share storage (tied weights, views)
            tensors[name] = v.detach().to("cpu").contiguous().clone()
            return {"t": name}
        if isinstance(v, np.ndarray):
            name = f"t{len(tensors)}"
            tensors[name] = torch.from_numpy(np.ascontiguousarray(v).copy())
            return {"n": name}
        if isinstance(v, Mapping):
            items = []
            for k, x in v.items():
                if not isinstance(k, str | int) or isinstance(k, bool):
                    raise ConfigError(f"checkpoint state {where}: key {k!r} must be str or int")
                items.append([k, enc(x, f"{where}.{k}")])
            return {"d": items}
        if isinstance(v, list):
            return {"l": [enc(x, f"{where}[{i}]") for i, x in enumerate(v)]}
        if isinstance(v, tuple):
            return {"u": [enc(x, f"{where}[{i}]") for i, x in enumerate(v)]}
        if isinstance(v, np.generic):
            return {"v": v.item()}
        if v is None or isinstance(v, bool | int | float | str):
            return {"v": v}
        raise ConfigError(
            f"checkpoint state {where}: {type(v).__name__} is not checkpointable; use tensors, numpy arrays, "
            "dicts, lists, tuples and scalars (e.g. store generator.get_state() rather than the generator)"
        )

    return enc(state, "state"), tensors


def unflatten_state(structure: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    ((tag, val),) = structure.items()
    if tag == "t":
        return tensors[val]
    if tag == "n":
        return tensors[val].numpy()
    if tag == "d":
        return {k: unflatten_state(x, tensors) for k, x in val}
    if tag == "l":
        return [unflatten_state(x, tensors) for x in val]
    if tag == "u":
        return tuple(unflatten_state(x, tensors) for x in val)
    if tag == "v":
        return val
    raise ConfigError(
        f"checkpoint structure has an unknown node {tag!r}; the file is corrupt or from elsewhere"
    )


class FileCheckpointer:
    """The worker's ``Checkpointer``: saves every ``every_steps`` steps, keeps the last ``keep_last``."""

    def __init__(
        self,
        directory: Path | str,
        every_steps: int,
        keep_last: int = 2,
        on_save: Callable[[int], None] | None = None,
    ) -> None:
        self.dir = Path(directory)
        self.on_save = on_save
        self.every_steps = every_steps
        self.keep_last = max(1, keep_last)
        self.last_step: int | None = None

    def due(self, step: int) -> bool:
        return self.every_steps > 0 and step > 0 and step % self.every_steps == 0

    def save(self, step: int, state: Mapping[str, Any]) -> None:
        structure, tensors = flatten_state(state)
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = self.dir / f"ckpt-{step:09d}"
        data = st_save(tensors)
        atomic_write_bytes(stem.with_suffix(".safetensors"), data)
        meta = {"format": FORMAT, "step": step, "tensors_sha256": _sha256(data), "state": structure}
        atomic_write_bytes(stem.with_suffix(".json"), json.dumps(meta, separators=(",", ":")).encode())
        self.last_step = step
        for old in self._steps()[: -self.keep_last]:
            self._remove(old)
        if self.on_save is not None:
            self.on_save(step)

    def restore(self) -> dict[str, Any] | None:
        """The newest intact checkpoint's state (tensors on CPU); older ones are tried if the newest is damaged."""
        for step in reversed(self._steps()):
            stem = self.dir / f"ckpt-{step:09d}"
            try:
                meta = json.loads(stem.with_suffix(".json").read_bytes())
                data = stem.with_suffix(".safetensors").read_bytes()
            except (OSError, ValueError):
                continue
            if meta.get("format") != FORMAT or _sha256(data) != meta.get("tensors_sha256"):
                continue
            self.last_step = step
            return unflatten_state(meta["state"], st_load(data))
        return None

    def _steps(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _NAME.match(p.name)))

    def _remove(self, step: int) -> None:
        stem = self.dir / f"ckpt-{step:09d}"
        # marker first: a half-deleted pair is never "valid"
        stem.with_suffix(".json").unlink(missing_ok=True)
        stem.with_suffix(".safetensors").unlink(missing_ok=True)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def capture_rng() -> dict[str, Any]:
    """The global RNG states (torch CPU, every initialised CUDA device, numpy legacy, python ``random``)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": np_kind,
            "keys": np.asarray(np_keys).astype(
                np.int64
            ),  # uint32 → int64: safetensors/torch handle it everywhere
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": _py_state_to_json(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Set the global RNGs back to a :func:`capture_rng` state."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], np.asarray(n["keys"]).astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    random.setstate(_py_state_from_json(state["python"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(cuda))


def _py_state_to_json(s: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = s
    return [version, list(internal), gauss]


def _py_state_from_json(s: list[Any] | tuple[Any, ...]) -> tuple[Any, ...]:
    version, internal, gauss = s
    return (version, tuple(internal), gauss)
