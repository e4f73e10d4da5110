"""NF4 layers a compiled decoder layer can hold: the weight dequantised in torch operations inside the graph.

bitsandbytes multiplies by an NF4 weight through its own operator, called from Python: on an H200 each call costs
about 250 us of host time (bitsandbytes::gemm_4bit in docs/bench/profile-llama7b-step-compiled.txt), about 110 ms
of a 7B step's 340, while the GPU waits. Under `train.compile` the NF4 layers the memory plan keeps quantised
dequantise in plain torch operations instead, which inductor fuses into one kernel per weight and launches from
its generated code: the nibble unpacking, the NF4 code book, the (double-quantised) block scales, the cast. The
values are bitsandbytes' own (tests/test_nf4_graph.py compares them bit for bit on a CPU). Eagerly, the backward
pass dequantises again, as bitsandbytes does, and keeps nothing but the quantised layer; compiled, inductor's
partitioner keeps the dequantised weight for the backward instead (its consumer, a matrix product, is not fusible,
so recomputing it is never free in the partitioner's terms): one decoder layer's weights at a time under gradient
checkpointing (the recompute runs just before that layer's backward), all of them without it, 12.1 GiB on the 7B
shape. `recompute_weights(True)` makes the backward dequantise again: the dequantisation is then a checkpointed
region, whose operations the partitioner must recompute, and only the quantised weight is kept. A pass without
checkpointing then needs the memory of its activations alone, at one more dequantisation a weight: the memory plan
takes it where it saves passes a step (micro_batches.py), e.g. a data-parallel rank's share of a 7B step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from adl_llm.nf4 import is_dequantized, nf4_layers, own_forward, runs_forward, use_forward

_STATE = ("nf4_absmax", "nf4_code", "nf4_absmax2", "nf4_code2", "nf4_offset")  # buffers while in the graph
_recomputed = False  # recompute_weights(); read as the graph is traced, so a change compiles new variants
_refused = False  # refuse_recompute(): the variant failed to compile in this run


def recompute_weights(on: bool) -> None:
    """Whether the compiled backward pass dequantises each NF4 weight again (True) or keeps it from the forward."""
    global _recomputed
    _recomputed = on


def recomputes_weights() -> bool:
    return _recomputed


def refuse_recompute() -> None:
    """Keep the weights from here to the end of the run (restore): the recomputing variant failed to compile."""
    global _refused
    _refused = True
    recompute_weights(False)


def recompute_refused() -> bool:
    return _refused


def nf4_weight(packed, absmax, code, absmax2, code2, offset, blocksize: int, blocksize2: int, shape, dtype):
    """The weight bitsandbytes' dequantize_4bit gives for an NF4 `packed` weight: two 4-bit codes a byte (high
    nibble first), each code's value times its block's scale; nested scales are themselves 8-bit codes scaled per
    `blocksize2` block, plus `offset` (absmax2 None: plain fp32 scales)."""
    if absmax2 is not None:
        index = torch.arange(absmax.numel(), device=absmax.device) // blocksize2
        absmax = code2[absmax.long()] * absmax2[index] + offset
    packed = packed.reshape(-1)
    codes = torch.stack((packed >> 4, packed & 15), dim=-1).reshape(-1).long()
    values = code[codes].reshape(-1, blocksize) * absmax.reshape(-1, 1)
    return values.to(dtype).reshape(shape)


class _NF4Linear(torch.autograd.Function):
    """x @ W.T for the NF4 weight W, which is dequantised in the forward and again in the backward (the input's
    gradient), never kept."""

    @staticmethod
    def forward(ctx, x, packed, absmax, code, absmax2, code2, offset, meta):
        ctx.save_for_backward(packed, absmax, code, absmax2, code2, offset)
        ctx.meta = meta
        return F.linear(x, nf4_weight(packed, absmax, code, absmax2, code2, offset, *meta, x.dtype))

    @staticmethod
    def backward(ctx, grad):
        weight = nf4_weight(*ctx.saved_tensors, *ctx.meta, grad.dtype)
        return grad @ weight, None, None, None, None, None, None, None


def _eager_kernel(x: torch.Tensor) -> bool:
    """Whether a call takes bitsandbytes' own kernel: an eager call on a GPU (a decoding job's prompt pass, which
    stays uncompiled), where the unfused torch operations would launch several kernels and hold int64 codes the size
    of the weight. Not on a CPU: there bitsandbytes repacks an NF4 weight for its inference kernel on such a call (on
    CPUs with AVX512-BF16), which the state this layer holds in the graph would no longer describe."""
    return x.is_cuda and not torch.compiler.is_compiling()


def _graph_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Linear4bit.forward (compute dtype in, the input's dtype out) with the weight dequantised in torch operations
    (bitsandbytes' kernel for an eager call on a GPU: _eager_kernel)."""
    if _eager_kernel(x):
        return type(self).__bases__[0].forward(self, x)
    dtype = self.compute_dtype
    state = [getattr(self, name) for name in _STATE]
    meta = (self.nf4_blocksize, self.nf4_blocksize2, tuple(self.weight.quant_state.shape))
    # Compiled only: the checkpointed region's operations are recomputed in the backward pass, not kept (eagerly,
    # the region's output would not require grad, and the product below would keep the dequantised weight)
    if _recomputed and torch.compiler.is_compiling():
        weight = checkpoint(nf4_weight, self.weight, *state, *meta, dtype, use_reentrant=False)
        out = F.linear(x.to(dtype), weight)
    else:
        out = _NF4Linear.apply(x.to(dtype), self.weight, *state, meta)
    if self.bias is not None:
        out = out + self.bias.to(dtype)
    return out.to(x.dtype)


def supported(layer) -> bool:
    """An NF4 layer in bitsandbytes' standard packing (bytes, whole blocks) with one compute dtype, not dequantised
    for the run and not otherwise changed."""
    state = getattr(layer.weight, "quant_state", None)
    return (
        state is not None
        and state.quant_type == "nf4"
        and layer.compute_dtype is not None
        and len(state.shape) == 2
        and state.shape.numel() % state.blocksize == 0
        and layer.weight.dtype == torch.uint8
        and not getattr(state, "packing_format_for_cpu", False)
        and not is_dequantized(layer)
        and "forward" not in vars(layer)
    )


def to_graph(modules: list[torch.nn.Module]) -> list:
    """Every supported NF4 layer within `modules` (the compiled decoder layers) dequantises in torch operations (as
    buffers: the quantisation state of each layer is a graph input, so the decoder layers share one compiled
    graph); the layers changed."""
    changed = []
    for layer in (found for module in modules for found in nf4_layers(module)):
        if not supported(layer):
            continue
        state = layer.weight.quant_state
        nested = state.nested
        buffers = (
            state.absmax,
            state.code,
            state.state2.absmax if nested else None,
            state.state2.code if nested else None,
            torch.as_tensor(state.offset if nested else 0.0, dtype=torch.float32, device=state.absmax.device),
        )
        for name, tensor in zip(_STATE, buffers, strict=True):
            layer.register_buffer(name, tensor, persistent=False)
        layer.nf4_blocksize = state.blocksize
        layer.nf4_blocksize2 = state.state2.blocksize if nested else 0
        use_forward(layer, _graph_forward, "Graph")
        changed.append(layer)
    return changed


def restore(layers: list) -> None:
    """bitsandbytes' own layers again, and the weights kept for the backward pass again."""
    global _refused
    _refused = False
    recompute_weights(False)
    for layer in layers:
        if runs_forward(layer, _graph_forward):
            own_forward(layer)
        for name in _STATE:
            layer._buffers.pop(name, None)
        for name in ("nf4_blocksize", "nf4_blocksize2"):
            vars(layer).pop(name, None)


def in_graph(model) -> bool:
    """Whether any NF4 layer of `model` dequantises in the graph (to_graph), so recompute_weights applies."""
    return any(runs_forward(layer, _graph_forward) for layer in nf4_layers(model))
