"""`train.autocast`: the training forward under torch.autocast in the model's compute dtype.

peft keeps a LoRA adapter in fp32 (its weights, gradients and optimiser state), so its products run in fp32: on
an H200, 24 ms of a 7B step's 243 ms of GPU time went to cuBLAS's fp32 and SIMT kernels for them
(docs/bench/profile-llama7b-step-compiled.txt). Under autocast they run in bf16 on the tensor cores, as TRL's
`bf16=True` runs them, while the weights and the optimiser stay fp32. The frozen base computes in bf16 either way.
Opt-in until measured on a GPU; where the model computes in fp32 (a CPU without native bf16) there is nothing to do.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)
HALF = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def autocast_forward(model, enabled: bool, dtype: torch.dtype, device: torch.device) -> Iterator[bool]:
    """Within: `model`'s forward, and its decoder's (which the training loss calls: loss.answer_nll projects the
    answer positions itself), run under autocast in `dtype` (the checkpoint's recompute restores it), when `enabled`
    and `dtype` is a half type; yields whether they do. The backward and the optimiser step stay outside, as
    PyTorch advises."""
    if not enabled or dtype not in HALF:
        if enabled:
            log.info("train.autocast: the model computes in %s, so there is nothing to autocast", dtype)
        yield False
        return
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    modules = [model] + ([decoder] if decoder is not None and decoder is not model else [])
    owns = [module.__dict__.get("forward") for module in modules]  # an instance's own forward (a hook's), put back
    for module in modules:
        module.forward = torch.autocast(device.type, dtype=dtype)(module.forward)
    log.info("train.autocast: the forward under torch.autocast(%s): LoRA's products in it, its weights fp32", dtype)
    try:
        yield True
    finally:
        for module, own in zip(modules, owns, strict=True):
            if own is None:
                del module.forward
            else:
                module.forward = own
