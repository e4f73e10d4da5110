"""Timing and GPU-memory helpers shared by the baseline and the framework side, so both are measured alike."""

from __future__ import annotations

import gc
import time

import torch

from adl_llm.memory import GIB


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync() -> None:
    """Wait for queued GPU work, so a clock read after it covers the work and nothing of the next step."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def now() -> float:
    sync()
    return time.perf_counter()


def free() -> None:
    """Drop what the last part left (models, optimisers, cached blocks) and start a fresh peak-memory count.

    Call it after the last reference to a model is gone (`del model`): collected objects return their
    memory to PyTorch's cache, and `empty_cache` returns the cache to the driver.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak() -> dict[str, float | None]:
    """Peak GPU memory since the last reset: allocated by tensors, and reserved by PyTorch's allocator."""
    if not torch.cuda.is_available():
        return {"peak_alloc_gib": None, "peak_reserved_gib": None}
    return {
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
    }


def warm_up() -> None:
    """Create the CUDA context and the cuBLAS handles once, so the first part measured does not pay for them."""
    if torch.cuda.is_available():
        a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
        (a @ a).float().sum().item()
        del a
        free()


def rates(step_tokens: list[int], step_seconds: list[float], warmup: int) -> dict:
    """Tokens/s over every step, and over the steps after the first `warmup` (the steady state)."""
    steady_tokens, steady_seconds = sum(step_tokens[warmup:]), sum(step_seconds[warmup:])
    return {
        "steps": len(step_seconds),
        "tokens": sum(step_tokens),
        "seconds": sum(step_seconds),
        "tokens_per_s": sum(step_tokens) / sum(step_seconds),
        "seconds_per_step": sum(step_seconds) / len(step_seconds),
        "steady_tokens_per_s": steady_tokens / steady_seconds if steady_seconds else None,
        "step_seconds": step_seconds,
        "step_tokens": step_tokens,
    }


def card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def gpu_busy_seconds(prof) -> float:
    """Seconds in which the GPU ran at least one kernel, over a torch.profiler run: the union of the kernels'
    intervals. A plain sum of kernel times counts overlapping streams twice (an all-reduce's kernel, which also
    spins while it waits for the other rank, beside the compute), and can exceed the wall time."""
    from torch.autograd import DeviceType

    spans = sorted(
        (event.time_range.start, event.time_range.end)
        for event in prof.events()
        if event.device_type == DeviceType.CUDA
    )
    busy, covered = 0.0, float("-inf")
    for start, end in spans:
        busy += max(0.0, end - max(start, covered))
        covered = max(covered, end)
    return busy / 1e6
