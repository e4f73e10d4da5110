"""The device a process computes on, and the floating-point type it computes fastest.

bfloat16 halves memory and, where the hardware has it, runs at least as fast as float32; where it has not (a CPU
without AVX512-BF16 or AMX, or an Arm CPU without BF16), PyTorch emulates it and the same work takes about twice
as long (a 50-record perplexity of Gemma-3-270M on 2 AVX2 cores: 65.7 s in float32, 139.6 s in bfloat16), for
results within 1%. So `model.dtype=auto` asks the device.
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)
# /proc/cpuinfo flags of a CPU that computes bfloat16 natively: x86's AVX512-BF16 and AMX, Arm's BF16.
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def default_device() -> torch.device:
    """The GPU of this process (under torchrun, the one of its local rank), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def fastest_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where `device` computes it natively; float16 on a GPU without it; float32 on other CPUs."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (Linux: its /proc/cpuinfo flags; Apple silicon: yes)."""
    if platform.system() == "Darwin":
        return platform.machine() == "arm64"
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = {flag for line in text.splitlines() if line.startswith(("flags", "Features")) for flag in line.split()}
    return bool(flags & NATIVE_BF16_FLAGS)
