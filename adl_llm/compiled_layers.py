"""Regional compilation for training (`train.compile`): each decoder layer compiled by torch.compile.

A training step of a 7B-class model under QLoRA launches about 5,200 kernels, and its host work (415 ms a step on
an H200) outlasts the GPU's (248 ms): the step waits on Python and launches, not on the card (docs/BENCHMARKS.md).
Compiling each decoder layer fuses its norms, rotary embedding, activations and LoRA arithmetic, forward and
backward, into a few kernels. Compiling layer by layer, not the whole model, keeps the compile time to one layer's
(the layers share one graph) and leaves the loss, the embeddings and gradient checkpointing as they are.

Opt-in until measured on a GPU: the CPU tests show the same losses as the eager path. Inductor draws dropout's random
numbers its own way, so with `lora.lora_dropout` > 0 the masks differ from the eager path's (the same distribution).
A model that does not compile stops the run with one line naming the setting and the backend's error. Seen on an
H200: the 7B shape in NF4 with gradient checkpointing (the default 10 GiB budget) failed in inductor's partitioner
("AssertionError: Node add_380 was invalid, but is output"); without checkpointing (40 GiB) it compiled and ran.
The same model class, NF4 and checkpointing compile on a CPU (tests/test_compiled_layers.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from adl_llm.errors import RunFailed, first_line
from adl_llm.modeling import gradient_checkpointing_on

log = logging.getLogger(__name__)


def compile_failure(err: Exception) -> str:
    """One line on why a compile failed: the backend's own error where there is one (a BackendCompilerFailed's
    first line says only "backend='inductor' raised:")."""
    cause = getattr(err, "inner_exception", None) or err
    line = first_line(str(cause)).strip()[:300]
    return f"{type(cause).__name__}: {line}" if line else type(cause).__name__


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated blocks: the longest ModuleList whose children all have one class."""
    best: list[torch.nn.Module] = []
    for module in model.modules():
        one_class = isinstance(module, torch.nn.ModuleList) and len({type(child) for child in module}) == 1
        if one_class and len(module) > len(best):
            best = list(module)
    return best


@contextlib.contextmanager
def compiled_layers(model, enabled: bool) -> Iterator[int]:
    """Within: every decoder layer of `model` runs compiled when `enabled`; yields how many are. A compile error
    inside becomes one line naming train.compile."""
    layers = decoder_layers(model) if enabled else []
    if enabled and not layers:
        log.warning("train.compile: no repeated decoder layers found in %s; training uncompiled", type(model).__name__)
    for layer in layers:
        layer.compile()
    if layers:
        log.info("train.compile: %d decoder layers of %s compiled", len(layers), type(layers[0]).__name__)
    try:
        yield len(layers)
    except torch._dynamo.exc.TorchDynamoException as err:
        checkpointed = gradient_checkpointing_on(model)
        advice = "set train.compile=false" + (" or train.gradient_checkpointing=false" if checkpointed else "")
        message = f"train.compile: torch.compile failed on this model ({compile_failure(err)}); {advice}"
        raise RunFailed(message) from err
    finally:  # evaluation and generation follow in the same process, on the eager layers
        for layer in layers:
            layer._compiled_call_impl = None  # what Module.compile() set; None is Module's own "not compiled"
