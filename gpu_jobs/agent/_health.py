"""What the agent reports about its node: GPUs, driver/CUDA/torch versions, a matmul TFLOP/s probe, free disk."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

AGENT_VERSION = "1"
_PROBE_BUDGET_S = 0.4


def gpus() -> list[dict[str, Any]]:
    """``[{"index", "name", "memory_gb"}]`` for every CUDA device torch sees (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": props.name, "memory_gb": round(props.total_memory / 2**30, 2)})
    return out


def driver_version() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi`` (None when there is none or it does not answer)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [exe, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
        first = out.strip().splitlines()
        return first[0].strip() if first else None
    return None


def matmul_tflops(budget_s: float = _PROBE_BUDGET_S) -> float:
    """A short square-matmul probe: TFLOP/s of fp32 on CPU, bf16 (fp16 without bf16) on CUDA device 0.

    Runs for about ``budget_s`` seconds (at least one timed matmul), so the whole probe stays under 0.5 s."""
    import torch

    if torch.cuda.is_available():
        dev = torch.device("cuda", 0)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        n = 4096
        sync: Callable[[], None] = torch.cuda.synchronize
    else:
        dev, dtype, n = torch.device("cpu"), torch.float32, 256
        sync = _noop
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    start = time.perf_counter()
    a @ b  # warm-up (kernel selection, allocation)
    sync()
    warm = time.perf_counter() - start
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if reps % 4 == 0 or dev.type == "cpu":
            sync()
            elapsed = time.perf_counter() - t0
            if elapsed + warm >= budget_s or reps >= 200:
                break
    sync()
    elapsed = time.perf_counter() - t0
    return round(2 * n**3 * reps / elapsed / 1e12, 4)


def _noop() -> None:
    return None


class NodeInfo:
    """The static part of ``/v1/health``, measured once at startup; ``snapshot`` adds the live fields."""

    def __init__(self, data_dir: Path, agent_version: str = AGENT_VERSION) -> None:
        import torch

        self.data_dir = data_dir
        self.static: dict[str, Any] = {
            "agent_version": agent_version,
            "node": socket.gethostname(),
            "gpus": gpus(),
            "driver": driver_version(),
            "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            "torch": torch.__version__,
            "tflops": matmul_tflops(),
        }

    def snapshot(self, jobs_running: int) -> dict[str, Any]:
        """The health document: static fields + ``free_disk_gb`` and ``jobs_running``."""
        free = shutil.disk_usage(self.data_dir).free / 1e9
        return {**self.static, "free_disk_gb": round(free, 3), "jobs_running": jobs_running}
