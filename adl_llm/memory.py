"""Memory: the limit a job may fill, its peak (GPU memory through torch's allocator, or the process's peak RSS
on a CPU), and out-of-memory errors that name the setting to lower.

Hydra's multirun runs its jobs in one process, so each job resets the peaks when it starts. On Linux, writing
5 to /proc/self/clear_refs resets the kernel's peak-RSS mark (VmHWM) the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from adl_llm.errors import ResourceError

GIB = 1024**3


def memory_limit(budget_gb: float, device: torch.device) -> float:
    """Bytes a job may fill: `budget_gb`, and on a GPU at most 90% of its memory."""
    if device.type != "cuda":
        return budget_gb * GIB
    return min(budget_gb * GIB, 0.9 * torch.cuda.get_device_properties(device).total_memory)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Not Linux, or not allowed: the peak then covers the whole process.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory(device: torch.device) -> dict[str, float]:
    """`run/peak_gpu_alloc_gib` and `run/peak_gpu_reserved_gib` on a GPU, `run/peak_rss_gib` on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return {
            "run/peak_gpu_alloc_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "run/peak_gpu_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
        }
    return {"run/peak_rss_gib": _peak_rss_bytes() / GIB}


def _peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def out_of_memory_advice(work: str, settings: str) -> Iterator[None]:
    """Turn a CUDA out-of-memory error during `work` into one line naming the `settings` to lower."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise ResourceError(f"out of GPU memory during {work}; lower {settings}") from None
