"""Training over a dequantised copy of a small NF4 base: the same numbers, without re-dequantising every pass.

bitsandbytes multiplies by an NF4 weight by dequantising it to the compute dtype and calling a plain matmul, and
does so again for the input gradient of the backward pass: two dequantisations and two autograd hops of Python
per layer and pass. For a small model that CPU work, not the GPU, sets the pace of a step (docs/BENCHMARKS.md).
While training, the frozen base never changes, so when its dequantised copy is small next to the memory budget
the layers multiply by that copy instead: the same dequantised values, the same matmul, the same adapter.
The NF4 weights stay where they are; the copy lives only for the training run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
BUDGET_SHARE = 0.25  # of the training memory budget the copy may take, so the passes keep most of it
_GIB = 1024**3


def nf4_layers(model) -> list:
    from bitsandbytes.nn import Linear4bit

    return [module for module in model.modules() if isinstance(module, Linear4bit)]


def dequantized_bytes(model, dtype: torch.dtype) -> int:
    """The size of the base's 4-bit weights dequantised to `dtype`."""
    return sum(layer.weight.quant_state.shape.numel() for layer in nf4_layers(model)) * dtype.itemsize


@contextlib.contextmanager
def dequantized_base(model, *, enabled: bool | None, memory_budget_gb: float) -> Iterator[bool]:
    """Inside, every NF4 layer of `model` multiplies by its dequantised weight; yields whether it does.

    `enabled=None` decides from memory: on when the copy takes at most BUDGET_SHARE of `memory_budget_gb`.
    """
    layers = nf4_layers(model)
    if not layers or enabled is False:
        yield False
        return
    dtype = layers[0].compute_dtype or torch.float32
    size = dequantized_bytes(model, dtype)
    if enabled is None and size > BUDGET_SHARE * memory_budget_gb * _GIB:
        log.info("NF4 base used as is: its dequantised copy (%.1f GiB) would crowd the passes", size / _GIB)
        yield False
        return
    for layer in layers:
        layer.forward = _DequantizedForward(layer)
    log.info("NF4 base dequantised once for training (%.2f GiB of %s)", size / _GIB, dtype)
    try:
        yield True
    finally:
        for layer in layers:
            del layer.forward  # the class's own forward again


class _DequantizedForward:
    """Linear4bit.forward with the weight dequantised once: cast to the compute dtype, multiply, cast back."""

    def __init__(self, layer) -> None:
        from bitsandbytes.functional import dequantize_4bit

        self.layer = layer
        self.dtype = layer.compute_dtype or torch.float32
        self.weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(self.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.layer.bias  # read each call: a bias may train (lora.bias=all)
        bias = None if bias is None else bias.to(self.dtype)
        return F.linear(x.to(self.dtype), self.weight, bias).to(x.dtype)
