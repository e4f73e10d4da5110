"""The fast decoding path of a batch job: NF4 weights dequantised once, a static KV cache, a compiled decode step.

A decoding step of a small model is bound by kernel launches and Python, not by the card (the 270M reads its 0.5
GB of weights in about 0.15 ms on an H200). Three pieces, each chosen per job and logged:

- **dequantise** (`gen.dequantize`, null: on a GPU, where the copy fits): bitsandbytes runs its 4-bit kernels on
  every step. Where the dequantised weights take at most a quarter of `gen.memory_budget_gb`, they are dequantised
  once for the job (nf4.py, the copy training uses): the same weights, plain matmuls, the adapter unmerged. On an
  H200, greedy decoding of the 250 test prompts: 1.25x, 244 of 250 answers the same text. On 2 AVX2 cores it was
  within the machine's noise (0.9x to 1.4x over six pairs of runs, the same answers): asked for only.
- **static cache** (`gen.static_cache`, null: with `gen.compile`): transformers' StaticCache, one shape for the
  whole job: its batches are cut to one size and padded to one width, so a compiled step is reused, not
  recompiled; a compiled job keeps one cache for all its batches (job_cache). Alone, 1.16x on that greedy run.
- **compile** (`gen.compile`, false unless asked): the decode step compiled by `torch.compile` (mode
  reduce-overhead: CUDA graphs on a GPU), for greedy, sampling and beam search alike; the prompt pass stays eager.
  The first batch is decoded a few tokens first, to compile and capture, timed apart (`gen/warmup_seconds`). On an
  H200 (docs/BENCHMARKS.md) a first version crashed (it compiled the prompt pass); the next ran, but slower than
  the plain path: Gemma 3's step was recompiled at every token (transformers' sliding-window cache layer counts in
  a Python int), beam search's reorder replaced the cache's tensors (CUDA graphs skipped), and generate gave the
  step no positions (the wrapper hid the model's signature). Each is fixed and tested on a CPU. The rows of a
  batch (prompts x beams) are a dynamic dimension of the step, and the dequantised weights buffers of one layer
  class (nf4.py), so the jobs of a sweep over beams, adapters or prompts of one width reuse the first job's graph.
  On an H200, with fused sampling and the late stop tests, against the plain path in the same call: 12.4x, 3.6x
  and 7.6x its examples/s at beams 1, 3 and 5 with the report's sampling, 9.6x greedy; the beam sweep compiled for
  48 s in its first job and 0.3 s in the next two, so a sweep of 250 prompts takes about as long as on the plain
  path (91 against 86 s): opt-in.
- **NF4 in the graph** (`gen.nf4_graph`, null: with `gen.compile`): where the weights stay NF4 (a 7B within its
  memory budget), the compiled step dequantises them in torch operations that inductor fuses (nf4_graph.py, as
  `train.compile` does) instead of calling bitsandbytes' operator from Python for every layer and token; the prompt
  pass, uncompiled, keeps bitsandbytes' kernels.
- **fused sampling** (`gen.fused_sampling`, null: when sampling with a top_k): temperature, top-k and top-p on the
  k best tokens of each row (sampling.py) instead of transformers' three warpers, whose top-p sorts all 262k of
  Gemma's scores for every row and step. The same tokens kept with the same scores, so the same draws.
- **deferred syncs** (`gen.defer_syncs`, null: on a GPU): the stop tests and the fused sampler's fallback test
  read late, so the host queues the next step while the card runs this one (deferred_syncs.py); the same tokens.

Whatever fails on the first batch (an architecture without a static cache, a graph that does not compile) falls
back to the plain path with a warning naming the setting, and the batch is decoded again. A model whose cache
kinds would recompile the step (a sliding window shorter than the job's prompts and answers, linear attention)
takes transformers' own static cache, uncompiled, and the log says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Iterator

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer
from transformers.generation import utils as generation_utils

from adl_llm import nf4_graph
from adl_llm.batching import padded_width
from adl_llm.compiled_layers import decoder_layers
from adl_llm.config import GenConfig
from adl_llm.memory import memory_limit
from adl_llm.modeling import base_model
from adl_llm.nf4 import dequantized_base, nf4_layers, restore_cpu_nf4_training_path

log = logging.getLogger(__name__)

WIDTH_MULTIPLE = 64  # prompt widths of a static-cache job are rounded up to this
COMPILE_MODE = "reduce-overhead"  # CUDA graphs of the decode step; a CPU compiles with mode "default"
# generate's keyword for a cache it is given: `cache` since transformers renamed it (5.2x, which lists the names it
# accepts), `past_key_values` before, which later releases still take but warn about
CACHE_KWARG = "cache" if "cache" in getattr(generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


class FixedAddressLayer(StaticLayer):
    """transformers' StaticLayer, reordered in place for beam search: StaticLayer's reorder makes new tensors, and a
    CUDA graph that captured the old ones is skipped ("mutated inputs", seen on an H200 at beams 5). Its rows are
    marked dynamic for the compiled step, as are the step's inputs (`compiled`). A crop by 0 tokens is skipped."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        for tensor in (self.keys, self.values):  # rows = prompts x beams: one graph for every setting of a sweep
            torch._dynamo.maybe_mark_dynamic(tensor, 0)

    def crop(self, tokens_to_remove: int) -> None:
        # transformers' late stop test crops a cache it is given by 0 tokens every step: a kernel a layer, for nothing
        if tokens_to_remove:
            super().crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            index = beam_idx.to(self.keys.device)
            self.keys.copy_(self.keys.index_select(0, index))
            self.values.copy_(self.values.index_select(0, index))


@dataclasses.dataclass
class DecodePath:
    dequantize: bool
    static_cache: bool
    compile: bool
    fused_sampling: bool = False
    nf4_graph: bool = False
    deferred_syncs: bool = False

    def describe(self) -> str:
        pieces = [name for name, on in dataclasses.asdict(self).items() if on]
        return "+".join(pieces) if pieces else "plain"


PLAIN = DecodePath(dequantize=False, static_cache=False, compile=False)


@contextlib.contextmanager
def fast_path(model, gen: GenConfig) -> Iterator[DecodePath]:
    """Within: the path of a decoding job as `gen` sets it (the module's docstring), the NF4 weights dequantised
    while it lasts (nf4.dequantized_base, the training run's copy)."""
    base = base_model(model)
    on_gpu = base.device.type == "cuda"
    static = gen.static_cache if gen.static_cache is not None else gen.compile
    compiled = gen.compile
    if compiled and not static:
        log.info("gen.compile: off, because gen.static_cache=false (a compiled step needs the cache's fixed shape)")
        compiled = False
    if compiled and on_gpu:
        log.info(
            "gen.compile=true: the step compiles in the process's first job (11 to 43 s on an H200), later jobs of "
            "a sweep reuse it (docs/BENCHMARKS.md)"
        )
    # On a CPU the copy was no clear gain (docs/BENCHMARKS.md), so it is made only when asked, and from the weights
    # unpacked from bitsandbytes' CPU packing (a pipeline scores, which packs them, before it decodes).
    dequantize = gen.dequantize if gen.dequantize is not None else (None if on_gpu else False)
    graph_wanted = compiled and gen.nf4_graph is not False
    if (dequantize or graph_wanted) and not on_gpu:
        restore_cpu_nf4_training_path(model)
    limit = memory_limit(gen.memory_budget_gb, base.device)
    with dequantized_base(model, enabled=dequantize, memory_limit=limit) as dequantized:
        if gen.dequantize and not dequantized:
            log.info("gen.dequantize: the model has no NF4 layers bitsandbytes runs as loaded; nothing dequantised")
        fused = gen.do_sample and gen.top_k > 0 and gen.fused_sampling is not False
        in_graph = graph_wanted and any(nf4_graph.supported(layer) for layer in nf4_layers(model))
        if gen.nf4_graph and not in_graph:
            log.info("gen.nf4_graph: no NF4 layers bitsandbytes runs (or no compiled step); nothing changed")
        # Late tests pay on a GPU, where the host would otherwise wait for the card at every step (not on a CPU).
        deferred = gen.defer_syncs if gen.defer_syncs is not None else on_gpu
        path = DecodePath(dequantized, static, compiled, fused, in_graph, deferred)
        log.info("decoding path: %s", path.describe())
        yield path


def generation_settings() -> dict:
    """The GenerationConfig keys of a static-cache path (a compiled job's cache, job_cache, is passed to generate;
    otherwise transformers makes a static one per batch)."""
    # transformers would compile the step of a static cache by itself, but only when sampling or greedy (not in beam
    # search) and never for a bitsandbytes model: compiled() does it for every setting instead.
    return {"disable_compile": True}


def job_cache(model, max_cache_len: int):
    """One static KV cache for every batch of a compiled job (reset before each): its tensors keep their addresses,
    which the CUDA graphs of the step captured. Each layer is a FixedAddressLayer, also where the architecture has a
    sliding window, as long as the window is no shorter than the cache (it never slides then), since transformers'
    sliding layer counts its length in a Python int that a compiled step would be recompiled for at every token
    (seen on an H200: Gemma 3's 5 sliding layers of 6). None where that does not hold: other layer kinds (linear
    attention, shared KV), a window shorter than the prompts and answers."""
    cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=max_cache_len)
    for layer in cache.layers:
        # a sliding layer holds min(window, max_cache_len) positions: all of them when the window cannot slide
        fits = type(layer) is StaticLayer or (
            type(layer) is StaticSlidingWindowLayer and layer.max_cache_len == max_cache_len
        )
        if not fits:
            return None
    cache.layers = [FixedAddressLayer(max_cache_len=max_cache_len) for _ in cache.layers]
    return cache


@contextlib.contextmanager
def compiled(model, path: DecodePath) -> Iterator[None]:
    """Within: the model's decode step is compiled (once per model; a fixed shape gives one graph), in CUDA graphs
    on a GPU; the prompt pass stays eager, as transformers' own compiled generation keeps it."""
    base = base_model(model)
    if not path.compile:
        yield
        return
    step = getattr(base, "_adl_llm_compiled_forward", None)
    if step is None:
        mode = COMPILE_MODE if base.device.type == "cuda" else "default"
        eager = base.forward
        compiled_forward = torch.compile(eager, mode=mode, dynamic=None)

        # The model's own signature, which generate reads: without `position_ids` in it, generate passes none, and
        # the model counts positions from its cache, ignoring left padding.
        @functools.wraps(eager)
        def step(*args, **kwargs):
            ids = kwargs.get("input_ids")
            if ids is None or ids.shape[-1] != 1:
                # The prompt pass runs eagerly: the static cache allocates its buffers there, and marks them as
                # fixed addresses only outside a compiled region; a buffer allocated inside a CUDA-graphed region
                # and passed back mutated crashes the process (pytorch/pytorch#192748, seen on an H200).
                return eager(*args, **kwargs)
            # Each call is a new step for the CUDA graphs: the last call's outputs (logits, already copied by
            # generate) may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
            for name in ("input_ids", "attention_mask", "position_ids"):  # rows, as the cache's (FixedAddressLayer)
                value = kwargs.get(name)
                for tensor in value.values() if isinstance(value, dict) else [value]:  # Gemma 3: a mask per kind
                    if isinstance(tensor, torch.Tensor) and tensor.dim():
                        torch._dynamo.maybe_mark_dynamic(tensor, 0)
            return compiled_forward(*args, **kwargs)

        base._adl_llm_compiled_forward = step
    own = base.__dict__.get("forward")  # an instance's own forward (a hook's), put back after
    base.forward = step
    in_graph: list = []
    try:
        in_graph = nf4_graph.to_graph(decoder_layers(base)) if path.nf4_graph else []
        yield
    finally:
        nf4_graph.restore(in_graph)
        if own is None:
            del base.forward
        else:
            base.forward = own


def fixed_batches(order: list[int], cap: int) -> list[tuple[list[int], int]]:
    """`order` cut into batches of one size (at most `cap`), as (rows, how many are real): the last is filled up
    with repeats of its last row, so a static cache and a compiled step see one shape; the repeats are dropped."""
    count = -(-len(order) // cap)
    size = -(-len(order) // count)
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    return [(rows + [rows[-1]] * (size - len(rows)), len(rows)) for rows in batches]


def bucket(width: int) -> int:
    return padded_width(width, WIDTH_MULTIPLE)
