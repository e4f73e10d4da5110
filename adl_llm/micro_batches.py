"""How each optimiser step is cut into micro-batches (forward/backward passes), planned once per training run.

A fixed cut (`train.micro_batch_size` or `train.grad_accum`) keeps the data order, as the report's loop did. The
automatic one sorts a step's examples by length and fills each micro-batch up to `train.micro_batch_tokens`
padded tokens. Left null on a GPU, that size is measured: two passes of the longest example (once and twice) give
the memory of a micro-batch as a fixed part plus a part per token, and the plan takes what fits in
`train.memory_budget_gb` next to the weights, the gradients and the optimiser state. With
`train.gradient_checkpointing` null, checkpointing is measured too and chosen when a step then takes enough fewer
micro-batches to pay for recomputing the forward. Before it, where NF4 weights dequantise in the compiled graph and
keeping them for the backward pass costs passes, passes that dequantise them again are measured (nf4_graph.py):
on the 7B shape, a data-parallel rank's share then trains without checkpointing.

Padded to its longest example, a step of 16 of the report's examples is half padding (2.0 padded tokens a real
one, Gemma's tokenizer, 64-column widths). Cutting a step into more, less padded passes where two timed passes said
a pass cost little beyond its tokens was tried, and measured slower on an H200 (the 7B shape's compiled steps at
the default budget 0.99x TRL + Liger with it, 1.38x without; more pass shapes, more compiled variants): a step
takes as few micro-batches as fit (docs/BENCHMARKS.md). Packed passes (`train.packing`, packing.py) drop the
padding instead: a micro-batch then holds examples end to end, up to the same token budget, in packed rows.

`plan_micro_batches` leaves the model as it found it; `train()` applies the plan and logs it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adl_llm import nf4_graph
from adl_llm.batching import CPU_BATCH_TOKENS, epoch_batches, pad_multiple, padded_width
from adl_llm.compiled_layers import compile_failure
from adl_llm.config import TrainConfig
from adl_llm.distributed import rank, world_size
from adl_llm.encode import Encoded
from adl_llm.loss import accumulate_gradients
from adl_llm.memory import GIB, memory_limit
from adl_llm.modeling import gradient_checkpointing_on, set_gradient_checkpointing
from adl_llm.packing import Rows, balance, pack_rows, row_layout

log = logging.getLogger(__name__)
SAFETY = 0.85  # of the measured room: allocator fragmentation and lengths the probe did not see
RECOMPUTE_COST = 1.5  # a checkpointed pass's time over a plain one's (Gemma-3-270M on an H200: 1.5)
PLANNED_STEPS = 32  # the first steps of an epoch, whose micro-batches the checkpointing choice counts


@dataclass(frozen=True)
class MicroBatchPlan:
    # Tokens per micro-batch, padding included (0 with a fixed cut, which counts examples instead); packed, the
    # examples are grouped by their own tokens and the rows' padding is kept within it (packing.packed_rows).
    tokens: int
    multiple: int  # micro-batch widths are rounded up to this
    gradient_checkpointing: bool
    rows: Rows | None = None  # how a micro-batch is cut into packed rows (packing.py); None: padded rows
    # Without checkpointing: the compiled backward dequantises NF4 weights again rather than keep them (nf4_graph.py)
    recompute_nf4: bool = False

    @property
    def packed(self) -> bool:
        return self.rows is not None


def rank_share(batch: Sequence[Encoded], tc: TrainConfig, packed: bool = False) -> list[Encoded]:
    """This process's examples of a step. Under data parallelism with the automatic cut, the step's examples dealt
    longest first, so every rank does about the same work (a rank waits for the slowest at the gradient sum): with
    padded passes, every rank's share has about the same longest example; with packed ones, about the same tokens.
    A fixed cut keeps the data order, as the report's loop did."""
    if world_size() == 1:
        return list(batch)
    if tc.examples_per_micro_batch(world_size()):
        return list(batch[rank() :: world_size()])
    if packed:
        return balance(batch, world_size())[rank()]  # the same deal on every rank
    return sorted(batch, key=lambda ex: -len(ex.input_ids))[rank() :: world_size()]


def split_step(
    batch: Sequence[Encoded], tc: TrainConfig, micro_batch_tokens: int, multiple: int = 1, packed: bool = False
) -> list[list[Encoded]]:
    """The micro-batches of one process's share of a step: of `micro_batch_tokens` padded tokens at most, as few as
    fit; `packed`: of at most `micro_batch_tokens` real tokens, put in rows as packing.collate_packed puts them."""
    fixed = tc.examples_per_micro_batch(world_size())
    if fixed:
        return [list(batch[i : i + fixed]) for i in range(0, len(batch), fixed)]
    if packed:
        return pack_rows(batch, micro_batch_tokens, multiple)
    micro_batches: list[list[Encoded]] = []
    for ex in sorted(batch, key=lambda ex: -len(ex.input_ids)):
        # Longest first, so a micro-batch's padded size is its first example's padded length times its size.
        last = micro_batches[-1] if micro_batches else None
        if last and padded_width(len(last[0].input_ids), multiple) * (len(last) + 1) <= micro_batch_tokens:
            last.append(ex)
        else:
            micro_batches.append([ex])
    return micro_batches


def plan_micro_batches(
    model, examples: Sequence[Encoded], tc: TrainConfig, pad_id: int, device, packed: bool = False
) -> MicroBatchPlan:
    """Padded tokens per micro-batch and whether to checkpoint: given, a CPU default, or measured on the GPU (with
    packed passes where `packed`)."""
    multiple = pad_multiple(tc.pad_to_multiple, device)
    asked = bool(tc.gradient_checkpointing)
    probe_rows = row_layout(model) if packed else None  # the layout the memory probe's passes take

    def plan(tokens: int, checkpointing: bool, recompute_nf4: bool = False) -> MicroBatchPlan:
        rows = dataclasses.replace(probe_rows, budget=tokens or None) if probe_rows else None
        return MicroBatchPlan(tokens, multiple, checkpointing, rows, recompute_nf4)

    if tc.micro_batch_tokens or tc.examples_per_micro_batch(world_size()):
        return plan(tc.micro_batch_tokens or 0, asked)
    if device.type != "cuda":
        return plan(CPU_BATCH_TOKENS, asked)
    longest = max(examples, key=lambda ex: len(ex.input_ids))
    length = padded_width(len(longest.input_ids), multiple)
    # This process's share of the first steps of an epoch, as split_step will cut them.
    shares = [
        rank_share([examples[i] for i in step], tc, packed)
        for step in epoch_batches(len(examples), tc.batch_size, 0, 0)[:PLANNED_STEPS]
    ]

    def per_step(tokens: int | None) -> float:
        """Mean micro-batches a step with `tokens` each, or infinity where the longest example does not fit."""
        if not tokens or tokens < length:
            return math.inf
        return sum(len(split_step(share, tc, tokens, multiple, packed)) for share in shares) / len(shares)

    def measured(checkpointing: bool, recompute_nf4: bool = False) -> int | None:
        return _measured_tokens(model, longest, tc, pad_id, device, multiple, checkpointing, probe_rows, recompute_nf4)

    plain = None if tc.gradient_checkpointing else measured(False)
    plain_per_step = per_step(plain)
    recompute_nf4 = False
    recomputable = nf4_graph.in_graph(model) and not nf4_graph.recompute_refused()
    if plain_per_step > 1 and not tc.gradient_checkpointing and recomputable:
        # Kept for the backward pass, the dequantised weights can fill the budget (12.1 GiB on the 7B shape);
        # dequantised again instead, at one more dequantisation a weight, where that saves passes
        lean = _recomputing_probe(model, lambda: measured(False, recompute_nf4=True))
        lean_per_step = per_step(lean)
        if lean_per_step < plain_per_step:
            plain, plain_per_step, recompute_nf4 = lean, lean_per_step, True
    if tc.gradient_checkpointing is False or plain_per_step == 1:
        return plan(max(plain or 0, length), False, recompute_nf4)
    checkpointed = measured(True)
    if tc.gradient_checkpointing is None:
        checkpointed_per_step = per_step(checkpointed)
        if plain_per_step < math.inf and plain_per_step <= RECOMPUTE_COST * checkpointed_per_step:
            return plan(max(plain, length), False, recompute_nf4)
        log.info(
            "gradient checkpointing on: %.1f micro-batches a step without it, %.1f with it",
            plain_per_step,
            checkpointed_per_step,
        )
    if checkpointed is None:
        raise torch.OutOfMemoryError("a pass of the longest example does not fit, even with gradient checkpointing")
    return plan(max(checkpointed, length), True)


def _recomputing_probe(model, probe) -> int | None:
    """The probe with NF4 weights recomputed; None, with a warning, where that variant fails to compile (the run
    then keeps them, which compiled already)."""
    try:
        return probe()
    except torch._dynamo.exc.TorchDynamoException as err:
        model.zero_grad(set_to_none=True)
        nf4_graph.refuse_recompute()
        log.warning(
            "recomputing NF4 weights in the backward pass failed to compile (%s); keeping them", compile_failure(err)
        )
        return None


def _measured_tokens(
    model,
    longest: Encoded,
    tc: TrainConfig,
    pad_id: int,
    device,
    multiple: int,
    checkpointing: bool,
    rows: Rows | None,
    recompute_nf4: bool = False,
) -> int | None:
    """Padded tokens per micro-batch that fit train.memory_budget_gb; None if the probe runs out of memory.

    The model's gradient checkpointing (and nf4_graph's recomputing) is set as asked for the probe and restored after
    it."""
    was_on, was_recomputing = gradient_checkpointing_on(model), nf4_graph.recomputes_weights()
    set_gradient_checkpointing(model, checkpointing)
    nf4_graph.recompute_weights(recompute_nf4)
    try:
        return _measure(model, longest, tc, pad_id, device, multiple, rows)
    finally:
        set_gradient_checkpointing(model, was_on)
        nf4_graph.recompute_weights(was_recomputing)


def _measure(
    model, longest: Encoded, tc: TrainConfig, pad_id: int, device, multiple: int, rows: Rows | None
) -> int | None:
    length = padded_width(len(longest.input_ids), multiple)
    limit = memory_limit(tc.memory_budget_gb, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device) + 16 * trainable  # + fp32 gradients and two Adam moments
    try:
        one, two = (_pass_peak(model, [longest] * n, pad_id, device, multiple, rows) - base for n in (1, 2))
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return None
    per_token = max((two - one) / length, 1.0)
    fixed = max(one - per_token * length, 0.0)
    tokens = int(SAFETY * (limit - base - fixed) / per_token)
    log.info(
        "%s: micro-batches of up to %d padded tokens (%.0f KiB per token + %.0f MiB, budget %.1f GiB)",
        "checkpointing"
        if gradient_checkpointing_on(model)
        else "no checkpointing, NF4 weights dequantised again in the backward pass"
        if nf4_graph.recomputes_weights()
        else "no checkpointing",
        tokens,
        per_token / 1024,
        fixed / 2**20,
        limit / GIB,
    )
    return tokens


def _pass_peak(model, examples: Sequence[Encoded], pad_id: int, device, multiple: int, rows: Rows | None) -> int:
    """Peak allocated bytes of one forward/backward pass over `examples` (its gradient is dropped)."""
    torch.cuda.reset_peak_memory_stats(device)
    accumulate_gradients(model, [examples], 1, pad_id, device, multiple, rows=rows)
    model.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated(device)
