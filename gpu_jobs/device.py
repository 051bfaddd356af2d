"""Device choice for a job: CUDA when present and allowed, else CPU with a sensible thread count.

CPU threads: on the 2-core dev VM, training the families' small models (MLP 32-64-64-1 and an autoencoder
48-32-8-32-48 at batch 256, GRU(8→64, seq 60) at batch 64) runs 10-25 % faster on 1 thread than on 2
(measured: MLP 456k vs 413k samples/s, AE 418k vs 317k, GRU 4.2k vs 3.3k seq/s; only MLP at batch 4096 gains
from 2 threads). So the default is 1 thread; ``DEPIN_TORCH_THREADS`` overrides it.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from gpu_jobs.errors import FailureKind, JobError
from gpu_jobs.settings import THREADS_ENV, GpuJobsSettings
from gpu_jobs.spec import DeviceInfo, Resources

DEFAULT_CPU_THREADS = 1


@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device
    info: DeviceInfo

    def autocast(self) -> AbstractContextManager[Any]:
        """bf16 autocast on capable CUDA devices, else a no-op context."""
        if self.info.bf16_autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def cpu_threads() -> int:
    """Threads for CPU work: ``DEPIN_TORCH_THREADS`` if set, else ``DEFAULT_CPU_THREADS``."""
    raw = GpuJobsSettings().torch_threads
    if raw is None:
        return DEFAULT_CPU_THREADS
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise JobError(
            f"{THREADS_ENV}={raw!r} is not a positive integer; unset it or set e.g. 1", FailureKind.USER
        )
    return n


def select_device(resources: Resources) -> DeviceChoice:
    """CUDA device 0 when available and big enough, else CPU if the spec allows it (else ``JobError(infra)``).

    Also sets torch's CPU thread count (intra- and inter-op) for the process.
    """
    threads = cpu_threads()
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel op
        torch.set_num_interop_threads(threads)
    reason = "no CUDA device is available"
    if torch.cuda.is_available() and resources.gpu_count <= torch.cuda.device_count():
        props = torch.cuda.get_device_properties(0)
        vram_gb = props.total_memory / 2**30
        if vram_gb >= resources.min_vram_gb:
            info = DeviceInfo(
                type="cuda",
                name=props.name,
                index=0,
                torch_version=torch.__version__,
                cuda_version=torch.version.cuda,
                threads=threads,
                bf16_autocast=bool(torch.cuda.is_bf16_supported()),
            )
            return DeviceChoice(torch.device("cuda", 0), info)
        reason = f"the GPU has {vram_gb:.1f} GB, the spec asks for {resources.min_vram_gb} GB"
    elif torch.cuda.is_available():
        reason = f"{torch.cuda.device_count()} GPU(s) present, the spec asks for {resources.gpu_count}"
    if resources.gpu_count > 0 and not resources.cpu_fallback:
        raise JobError(
            f"no GPU: {reason} and resources.cpu_fallback is false; run on a GPU node or allow CPU fallback",
            FailureKind.INFRA,
        )
    info = DeviceInfo(type="cpu", name="cpu", torch_version=torch.__version__, threads=threads)
    return DeviceChoice(torch.device("cpu"), info)
