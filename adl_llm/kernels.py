"""Liger's fused Triton kernels on a loaded model: RMSNorm, the gated MLP and RoPE, each one kernel instead of several.

The kernels come from a maintained library (liger-kernel, the `liger` extra), not from adl-llm. `model.liger`: null
uses them where they can run (a CUDA device, liger-kernel importable, an architecture Liger knows) and logs which
path was taken and why; true requires them (a one-line error otherwise); false never uses them. The loss keeps
adl-llm's own chunked answer-token NLL: Liger's fused cross-entropy is not applied.

Liger patches the modules of the model instance, and also names in the architecture's modeling module in
transformers (its RMSNorm and MLP classes and `apply_rotary_pos_emb`, which the attention layers look up on each
call), for the whole process. So the names Liger replaces are remembered and put back when a model of that
architecture is later loaded without Liger: a multirun job with `model.liger=false` gets the plain path even after
a job with Liger in the same process.

Liger's RoPE kernel is wrong for a batch of one-token queries where a fused norm came before it (Gemma 3's q_norm,
or any architecture's): seen on an H200, where every greedy answer of a batch turned to repeated characters after
its first token.
The kernel steps from row to row by `q.transpose(1, 2).stride(1)`; Liger's RMSNorm returns q contiguous in (batch,
heads, 1, head_dim) layout, whose transposed stride over the size-1 dimension is head_dim, not heads x head_dim, and
a size-1 dimension's stride does not make a tensor non-contiguous, so Liger's `.contiguous()` copies nothing. Every
row past the first is then rotated from the wrong place. So a one-token step (a decode step) takes transformers'
own RoPE; prompts and training keep Liger's.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import sys

from adl_llm.errors import ModelError

log = logging.getLogger(__name__)

# What is fused: every norm, the gated MLP (SwiGLU or GeGLU, as the architecture has it) and RoPE.
KERNELS = {
    "rms_norm": True,
    "swiglu": True,
    "geglu": True,
    "rope": True,
    "cross_entropy": False,
    "fused_linear_cross_entropy": False,
}

ROPE = "apply_rotary_pos_emb"  # the RoPE function of a modeling module, which Liger replaces (guarded, see above)

_pristine: dict[str, dict] = {}  # modeling module name -> {name: value} of what Liger replaced there


def apply_liger(model, setting: bool | None) -> bool:
    """Fuse the model's kernels with Liger when `setting` (model.liger) allows and they can run; True if they were."""
    module = sys.modules[type(model).__module__]
    reason = "model.liger=false" if setting is False else why_not(model)
    if reason is None:
        _apply(model, module)
        log.info("kernels: Liger's fused RMSNorm, gated MLP and RoPE (%s)", model.config.model_type)
        return True
    if setting is True:
        raise ModelError(f"model.liger=true: {reason}; set model.liger=null to fall back to the plain kernels")
    plain_kernels()
    log.info("kernels: transformers' own (%s)", reason)
    return False


def _apply(model, module) -> None:
    """Patch `model` with Liger's kernels, remembering what Liger replaced in `module` (also if it fails)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    before = dict(vars(module))
    try:
        _apply_liger_kernel_to_instance(model=model, **KERNELS)
    except Exception as exc:  # part of the model may be patched already: not a plain model to fall back to
        raise ModelError(
            f"model.liger: Liger failed on this {model.config.model_type} model ({type(exc).__name__}: {exc}); "
            "set model.liger=false"
        ) from exc
    finally:
        patched = _pristine.setdefault(module.__name__, {})
        for name, value in before.items():  # the first value of each name Liger replaced
            if vars(module)[name] is not value:
                patched.setdefault(name, value)
    if vars(module).get(ROPE) is not before.get(ROPE) and ROPE in patched:
        setattr(module, ROPE, _one_token_steps_unfused(getattr(module, ROPE), patched[ROPE]))


def _one_token_steps_unfused(fused, reference):
    """`fused` (Liger's RoPE), except for one-token queries, which take `reference` (the module's docstring)."""

    @functools.wraps(fused)
    def rope(q, k, cos, sin, *args, **kwargs):
        if q.shape[-2] == 1 and not args:
            kwargs.pop("position_ids", None)  # Liger's signature has it; transformers' 5.x function does not
            return reference(q, k, cos, sin, **kwargs)
        return fused(q, k, cos, sin, *args, **kwargs)

    return rope


def plain_kernels() -> None:
    """Put back what Liger replaced in every modeling module adl-llm applied it to, whoever patched it last (TRL's
    `use_liger_kernel` patches too): `load_model` calls this before building a model, whose layers are made from
    the module's classes, and the bench before each side that must run without Liger."""
    for name, namespace in _pristine.items():
        vars(sys.modules[name]).update(namespace)


def why_not(model) -> str | None:
    """Why Liger's kernels cannot run on `model`, or None if they can."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return f"the model is on {device.type}, and Liger's kernels are Triton kernels for CUDA GPUs"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install 'adl-llm[liger]')"
    try:
        supported = importlib.import_module("liger_kernel.transformers.monkey_patch").MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception as exc:  # a broken Triton or CUDA set-up, or a Liger whose layout changed
        return f"liger-kernel does not load ({type(exc).__name__}: {exc})"
    model_type = getattr(model.config, "model_type", None)
    if model_type not in supported:
        return f"Liger has no kernels for model type {model_type!r}"
    return None
