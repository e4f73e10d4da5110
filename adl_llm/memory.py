"""Peak memory of one job: GPU memory through torch's allocator, or the process's peak RSS on a CPU.

Hydra's multirun runs its jobs in one process, so each job resets the peaks when it starts. On Linux, writing
5 to /proc/self/clear_refs resets the kernel's peak-RSS mark (VmHWM) the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from adl_llm.errors import ResourceError

_GIB = 1024**3


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Not Linux, or not allowed: the peak then covers the whole process.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory(device: torch.device) -> dict[str, float]:
    """`peak_gpu_alloc_gb` and `peak_gpu_reserved_gb` on a GPU, `peak_rss_gb` on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return {
            "peak_gpu_alloc_gb": torch.cuda.max_memory_allocated(device) / _GIB,
            "peak_gpu_reserved_gb": torch.cuda.max_memory_reserved(device) / _GIB,
        }
    return {"peak_rss_gb": _peak_rss_bytes() / _GIB}


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
