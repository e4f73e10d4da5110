"""Regional compilation for training (`train.compile`): each decoder layer compiled by torch.compile.

A training step of a 7B-class model under QLoRA launches about 5,200 kernels, and its host work (415 ms a step on
an H200) outlasts the GPU's (248 ms): the step waits on Python and launches, not on the card (docs/BENCHMARKS.md).
Compiling each decoder layer fuses its norms, rotary embedding, activations and LoRA arithmetic, forward and
backward, into a few kernels. Compiling layer by layer, not the whole model, keeps the compile time to one layer's
(the layers share one graph) and leaves the loss and the embeddings as they are. On an H200, against the eager
layers with Liger's kernels, the Gemma-3-270M trains 2.3x faster and the 7B shape 1.6x at the default budget, for
10 to 20 s of compiling once per process (docs/BENCHMARKS.md): on by default on a GPU (training_compiles). The NF4
weights a run keeps quantised are dequantised inside the graph (nf4_graph.py), not by bitsandbytes' operator
called from Python. The
CPU tests show the same losses as the eager path. Inductor draws dropout's random numbers its own way, so with
`lora.lora_dropout` > 0 the masks differ from the eager path's (the same distribution). Where a model does not
compile, the run warns with the backend's error and trains on the eager layers, the failed step redone whole.

Gradient checkpointing stays outside the compiled graph: the checkpoint wraps the compiled layer, so the recompute
in the backward pass runs the same compiled forward again (in a mode that captures CUDA graphs, `train.compile_mode`,
checkpointed calls take the layer compiled without them: a graph's outputs are overwritten by its next replay,
before the recompute reads them). transformers (5.x) checkpoints inside a layer's
`forward`, which would put the checkpoint inside the graph, and that failed on an H200 with the 7B shape in NF4
(inductor's partitioner: "AssertionError: Node add_380 was invalid, but is output") where the same layer without
checkpointing compiled and ran.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from adl_llm import nf4_graph
from adl_llm.errors import first_line

log = logging.getLogger(__name__)
T = TypeVar("T")
# torch.compile's modes that capture CUDA graphs, and the mode of a checkpointed call under each (no graphs)
CUDA_GRAPH_MODES = {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}
# Variants of the layer code torch.compile keeps before it runs new ones eagerly (its default, 8, is shared by every
# job of a process: on an H200 a bench's third compiled run, or a sweep's third job, trained eagerly).
RECOMPILE_LIMIT = 64


def training_compiles(setting: bool | None, device: torch.device) -> bool:
    """train.compile as asked; null: on a GPU only (conf/train/default.yaml says why)."""
    return setting if setting is not None else device.type == "cuda"


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


def _uncheckpointed(layer, compiled, *args, **kwargs):
    """The compiled call of `layer`, with transformers' checkpointing (which sits inside a layer's forward) off, so
    the graph holds the layer alone: also when the checkpoint recomputes it in the backward pass."""
    wanted = layer.gradient_checkpointing
    layer.gradient_checkpointing = False
    try:
        return compiled(*args, **kwargs)
    finally:
        layer.gradient_checkpointing = wanted


def _call(layer, compiled, recomputable, *args, **kwargs):
    """A call of the compiled `layer`, inside the checkpoint function transformers set on it (with the model's
    `use_reentrant`) when checkpointing is on at the time: the memory planner turns it on and off after compiling.
    A checkpointed call runs `recomputable`, the layer compiled without CUDA graphs: a graph's outputs are
    overwritten by its next replay, before the backward pass recomputes from them (docs/bench/compile)."""
    # Unlike transformers' wrapper, this checkpoint also holds the layer's module hooks (they run again in the
    # recompute), and it leaves a KV cache argument as it is: training passes none (transformers' model itself sets
    # use_cache=False while checkpointing).
    if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
        run = functools.partial(_uncheckpointed, layer, recomputable, **kwargs)
        return layer._gradient_checkpointing_func(run, *args)
    return _uncheckpointed(layer, compiled, *args, **kwargs)


def _compile(layer, mode: str | None) -> None:
    """Compile `layer` in place, in the slot Module.compile() uses."""
    if not hasattr(layer, "gradient_checkpointing"):  # not a transformers layer: nothing to move out of the graph
        layer.compile(mode=mode)
        return
    compiled = torch.compile(layer._call_impl, mode=mode)
    # compiled on first use only: a run that never checkpoints never compiles it
    recomputable = (
        torch.compile(layer._call_impl, mode=CUDA_GRAPH_MODES[mode]) if mode in CUDA_GRAPH_MODES else compiled
    )
    layer._compiled_call_impl = functools.partial(_call, layer, compiled, recomputable)


class _RecompileLimit(logging.Handler):
    """Notes torch.compile's warning that a function reached its recompile limit: from then on torch runs that
    function's new variants eagerly, silently but for that warning."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.hit = self.said = False

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()  # the limit's name since torch 2.6, and before
        self.hit = self.hit or "recompile_limit" in message or "cache_size_limit" in message


class CompiledLayers:
    """The decoder layers a training run compiled (and the NF4 layers it dequantises in the graph: nf4_graph.py),
    and the way back to their eager selves."""

    def __init__(self, model, layers: list[torch.nn.Module], nf4: list[torch.nn.Module]):
        self.model = model
        self.layers = layers
        self.nf4 = nf4
        self.limit = _RecompileLimit()

    @property
    def count(self) -> int:
        """The decoder layers that run compiled: none once torch.compile stopped compiling their new variants."""
        return 0 if self.limit.hit else len(self.layers)

    def uncompile(self) -> None:
        for layer in self.layers:
            layer._compiled_call_impl = None  # what Module.compile() set; None is Module's own "not compiled"
        self.layers = []
        nf4_graph.restore(self.nf4)
        self.nf4 = []

    def run(self, work: Callable[[], T], on_fallback: Callable[[], None] | None = None) -> T:
        """`work()`; where torch.compile fails within it, a warning and `work()` again on the eager layers, from
        zeroed gradients (so a step that failed part-way is redone whole; it seeds its own dropout), after
        `on_fallback()` (a memory plan made for the compiled layers may not hold for the eager ones). Where the
        failing variant recomputes NF4 weights (nf4_graph.recompute_weights), the layers stay compiled and keep the
        weights instead, for the rest of the run. Warns once where torch.compile reached its recompile limit, after
        which it runs new variants eagerly."""
        try:
            result = work()
            if self.layers and self.limit.hit and not self.limit.said:
                self.limit.said = True
                log.warning(
                    "train.compile: torch.compile reached its recompile limit (torch._dynamo.config.recompile_limit) "
                    "in this process; new variants of the decoder layers run eagerly, and train/compiled_steps stops "
                    "counting"
                )
            return result
        except torch._dynamo.exc.TorchDynamoException as err:
            if not self.layers:
                raise
            recomputing = nf4_graph.recomputes_weights()
            log.warning(
                "train.compile: torch.compile failed on this model (%s); %s",
                compile_failure(err),
                "keeping NF4 weights for the backward pass" if recomputing else "training on the eager layers",
            )
            if recomputing:
                nf4_graph.refuse_recompute()
            else:
                self.uncompile()
        self.model.zero_grad(set_to_none=True)
        if on_fallback is not None:
            on_fallback()
        return self.run(work, on_fallback) if self.layers else work()


@contextlib.contextmanager
def compiled_layers(model, enabled: bool, mode: str | None = None) -> Iterator[CompiledLayers]:
    """Within: every decoder layer of `model` runs compiled when `enabled` (work run through the yielded object's
    `run` falls back to the eager layers if a compile fails); after: the eager layers, for evaluation and generation.
    `mode`: torch.compile's (`train.compile_mode`)."""
    layers = decoder_layers(model) if enabled else []
    if enabled and not layers:
        log.warning("train.compile: no repeated decoder layers found in %s; training uncompiled", type(model).__name__)
    compiled = CompiledLayers(model, layers, [])
    dynamo_log = logging.getLogger("torch._dynamo.convert_frame")  # where torch warns of the recompile limit
    config = torch._dynamo.config
    key = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # its name before torch 2.6
    limit = max(getattr(config, key), RECOMPILE_LIMIT if layers else 0)
    with config.patch(**{key: limit}):
        dynamo_log.addHandler(compiled.limit)
        try:
            for layer in layers:
                _compile(layer, mode)
            compiled.nf4 = nf4_graph.to_graph(layers)
            if layers:
                name = type(layers[0]).__name__
                in_graph = f", {len(compiled.nf4)} NF4 weights dequantised in the graph" if compiled.nf4 else ""
                log.info("train.compile: %d decoder layers of %s compiled%s", len(layers), name, in_graph)
            yield compiled
        finally:
            dynamo_log.removeHandler(compiled.limit)
            compiled.uncompile()
