"""Regional compilation for training (`train.compile`): each decoder layer compiled by torch.compile.

A training step of a 7B-class model under QLoRA launches about 5,200 kernels, and its host work (415 ms a step on
an H200) outlasts the GPU's (248 ms): the step waits on Python and launches, not on the card (docs/BENCHMARKS.md).
Compiling each decoder layer fuses its norms, rotary embedding, activations and LoRA arithmetic, forward and
backward, into a few kernels. Compiling layer by layer, not the whole model, keeps the compile time to one layer's
(the layers share one graph) and leaves the loss, the embeddings and gradient checkpointing as they are.

Opt-in until measured on a GPU: the CPU tests show the same losses as the eager path. Inductor draws dropout's random
numbers its own way, so with `lora.lora_dropout` > 0 the masks differ from the eager path's (the same distribution).
A model that does not compile stops the run with one line naming the setting and the backend's error.

Gradient checkpointing stays outside the compiled graph: the checkpoint wraps the compiled layer, so the recompute
in the backward pass runs the same compiled forward again. transformers (5.x) checkpoints inside a layer's
`forward`, which would put the checkpoint inside the graph, and that failed on an H200 with the 7B shape in NF4
(inductor's partitioner: "AssertionError: Node add_380 was invalid, but is output") where the same layer without
checkpointing compiled and ran.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import torch

from adl_llm.errors import RunFailed, first_line

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


def _checkpointed_call(layer, compiled, *args, **kwargs):
    """A call of `layer` that recomputes `compiled` (the layer's compiled call) in the backward pass, through the
    checkpoint function transformers set on the layer (with the model's `use_reentrant`); eager work, such as
    evaluation, calls it directly."""
    if layer.training and torch.is_grad_enabled():
        return layer._gradient_checkpointing_func(functools.partial(compiled, **kwargs), *args)
    return compiled(*args, **kwargs)


def _compile(layer) -> bool:
    """Compile `layer` in place (Module.compile's slot); returns whether its checkpointing moved outside the graph."""
    if not getattr(layer, "gradient_checkpointing", False):
        layer.compile()
        return False
    layer.gradient_checkpointing = False  # the compiled graph holds the layer alone ...
    compiled = torch.compile(layer._call_impl)
    layer._compiled_call_impl = functools.partial(_checkpointed_call, layer, compiled)  # ... the checkpoint wraps it
    return True


@contextlib.contextmanager
def compiled_layers(model, enabled: bool) -> Iterator[int]:
    """Within: every decoder layer of `model` runs compiled when `enabled`; yields how many are. A compile error
    inside becomes one line naming train.compile."""
    layers = decoder_layers(model) if enabled else []
    if enabled and not layers:
        log.warning("train.compile: no repeated decoder layers found in %s; training uncompiled", type(model).__name__)
    checkpointed = [layer for layer in layers if _compile(layer)]
    if layers:
        around = ", each inside its gradient checkpoint" if checkpointed else ""
        log.info("train.compile: %d decoder layers of %s compiled%s", len(layers), type(layers[0]).__name__, around)
    try:
        yield len(layers)
    except torch._dynamo.exc.TorchDynamoException as err:
        advice = "set train.compile=false" + (" or train.gradient_checkpointing=false" if checkpointed else "")
        message = f"train.compile: torch.compile failed on this model ({compile_failure(err)}); {advice}"
        raise RunFailed(message) from err
    finally:  # evaluation and generation follow in the same process, on the eager layers
        for layer in layers:
            layer._compiled_call_impl = None  # what Module.compile() set; None is Module's own "not compiled"
        for layer in checkpointed:
            layer.gradient_checkpointing = True
