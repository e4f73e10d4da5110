"""bitsandbytes' NF4 layers: training (and decoding) over a dequantised copy of a small base, and the workarounds
they need.

bitsandbytes multiplies by an NF4 weight by dequantising it to the compute dtype and calling a plain matmul, and
does so again for the input gradient of the backward pass: two dequantisations and two autograd hops of Python
per layer and pass. For a small model that CPU work, not the GPU, sets the pace of a step (docs/BENCHMARKS.md).
While training, the frozen base never changes, so when its dequantised copy is small next to the memory budget
the layers multiply by that copy instead: the same dequantised values and the same matmul as bitsandbytes uses for
a pass of more than a few hundred tokens (smaller ones go through its fused 4-bit kernel on a GPU, which rounds
differently), so the same adapter. The NF4 weights stay where they are; the copy lives only for the training run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from adl_llm.memory import GIB

log = logging.getLogger(__name__)
BUDGET_SHARE = 0.25  # of the training memory budget the copy may take, so the micro-batches keep most of it
# bitsandbytes warns on every CPU run that an optional kernel package is absent; it changes nothing here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def nf4_quantization(compute_dtype: torch.dtype):
    """QLoRA's quantisation: 4-bit NormalFloat weights, double-quantised scales, `compute_dtype` matmuls."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def nf4_layers(model) -> list:
    from bitsandbytes.nn import Linear4bit

    return [module for module in model.modules() if isinstance(module, Linear4bit)]


def dequantized_bytes(model, dtype: torch.dtype) -> int:
    """The size of the base's 4-bit weights dequantised to `dtype`."""
    return sum(layer.weight.quant_state.shape.numel() for layer in nf4_layers(model)) * dtype.itemsize


@contextlib.contextmanager
def dequantized_base(model, *, enabled: bool | None, memory_limit: float) -> Iterator[bool]:
    """Inside, every NF4 layer of `model` multiplies by its dequantised weight; yields whether it does.

    `enabled=None` decides from memory: on when the copy takes at most BUDGET_SHARE of `memory_limit` bytes.
    A base not loaded as adl_llm.modeling loads it (no single compute dtype, or forwards that hooks replaced, as
    accelerate's offloading does) is left as it is.
    """
    layers = nf4_layers(model)
    dtype = layers[0].compute_dtype if layers else None
    plain = all(
        layer.compute_dtype == dtype and "forward" not in vars(layer) and not is_dequantized(layer) for layer in layers
    )
    if dtype is None or enabled is False or not plain:
        yield False
        return
    size = dequantized_bytes(model, dtype)
    if enabled is None and size > BUDGET_SHARE * memory_limit:
        log.info("NF4 base used as is: its dequantised copy (%.1f GiB) would crowd the passes", size / GIB)
        yield False
        return
    try:
        for layer in layers:
            _dequantize(layer)
        log.info("NF4 base dequantised once for this run (%.2f GiB of %s)", size / GIB, dtype)
        yield True
    finally:  # also after an error, or a copy that ran out of memory half-way
        for layer in layers:
            _restore(layer)


DEQUANTIZED = "dequantized_weight"  # the buffer that holds a layer's dequantised weight while it lasts
_subclasses: dict[tuple[type, Callable], type] = {}  # (layer class, forward) -> the subclass that runs it


def use_forward(layer, forward: Callable, prefix: str) -> None:
    """`layer` runs `forward`, its class swapped for a subclass made once per class and forward for the whole
    process: a compiled graph guards on the class, so it is reused from one job to the next (an object per job,
    as an instance's own forward was, failed torch.compile's guards: every job of a sweep compiled again)."""
    base = type(layer)
    if (base, forward) not in _subclasses:
        _subclasses[base, forward] = type(f"{prefix}{base.__name__}", (base,), {"forward": forward})
    layer.__class__ = _subclasses[base, forward]


def runs_forward(layer, forward: Callable) -> bool:
    return any(cls is type(layer) for (_, own), cls in _subclasses.items() if own is forward)


def own_forward(layer) -> None:
    """`layer`'s own class, and forward, again (after use_forward)."""
    if type(layer) in _subclasses.values():
        layer.__class__ = type(layer).__bases__[0]


def _dequantized_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Linear4bit.forward with the weight dequantised once: cast to the compute dtype, multiply, cast back."""
    bias = self.bias  # read each call: a bias may train (lora.bias=all)
    bias = None if bias is None else bias.to(self.compute_dtype)
    return F.linear(x.to(self.compute_dtype), getattr(self, DEQUANTIZED), bias).to(x.dtype)


def _dequantize(layer) -> None:
    """`layer` multiplies by its dequantised weight: a buffer (a graph input, not a guarded object, so a compiled
    step made for one job's copy serves the next: 10 to 30 s of compiling a job on an H200 otherwise)."""
    from bitsandbytes.functional import dequantize_4bit

    weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(layer.compute_dtype)
    layer.register_buffer(DEQUANTIZED, weight, persistent=False)
    use_forward(layer, _dequantized_forward, "Dequantized")


def is_dequantized(layer) -> bool:
    return runs_forward(layer, _dequantized_forward)


def _restore(layer) -> None:
    """bitsandbytes' own layer again, without the copy."""
    if is_dequantized(layer):
        own_forward(layer)
    layer._buffers.pop(DEQUANTIZED, None)


def no_cpu_repacking(model) -> None:
    """Keep bitsandbytes' CPU inference kernel out: on a CPU with AVX512-BF16 it takes a layer called in eval mode
    without grad, computes in bfloat16 only (a float32 input is cast down), and first repacks the weight in place,
    its scales rounded to bfloat16; undoing that to train (restore_cpu_nf4_training_path) quantises the scales
    again, so a run that scored or checked packing before training trained another base (seen: losses 5.5e-5 apart,
    packed against padded). Off, such a CPU dequantises and multiplies in the compute dtype as every other does."""
    fused = [layer for layer in nf4_layers(model) if getattr(layer, "support_avx512bf16_for_cpu", False)]
    for layer in fused:
        layer.support_avx512bf16_for_cpu = False
    if fused:
        log.info("NF4 on this CPU: bitsandbytes' bfloat16-only inference kernel off (it would repack the weights)")


def restore_cpu_nf4_training_path(model) -> None:
    """Undo bitsandbytes' CPU inference packing of NF4 weights, under which LoRA gets no gradients (and from which
    no dequantised copy is made: decode_path.py calls this first too).

    On a CPU with AVX512-BF16, a 4-bit layer run in eval mode without grad repacks its weight for a fast
    inference kernel; a model evaluated before training (in the same process) then trains nothing, silently.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    for layer in nf4_layers(model):
        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            weight = layer.weight
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
