"""How each optimiser step is cut into micro-batches (forward/backward passes), planned once per training run.

A fixed cut (`train.micro_batch_size` or `train.grad_accum`) keeps the data order, as the report's loop did. The
automatic one sorts a step's examples by length and fills each micro-batch up to `train.micro_batch_tokens`
padded tokens. Left null on a GPU, that size is measured: two passes of the longest example (once and twice) give
the memory of a micro-batch as a fixed part plus a part per token, and the plan takes what fits in
`train.memory_budget_gb` next to the weights, the gradients and the optimiser state. With
`train.gradient_checkpointing` null, checkpointing is measured too and chosen when a step then takes enough fewer
micro-batches to pay for recomputing the forward.

Padded to its longest example, a step of 16 of the report's examples is half padding (2.0 padded tokens a real
one, Gemma's tokenizer, 64-column widths). Where a pass waits on the host (a small model's eager launches) fewer,
larger micro-batches still win; where it waits on the card (a 7B's compiled layers) the padding costs more than a
second pass. So the plan also times two passes on the GPU, as a fixed cost plus a cost a token, and each step is cut
into the runs of its longest-first examples whose padded tokens plus that fixed cost sum to the least (about 1.4
padded tokens a real one in two passes, where the fixed cost is small).

`plan_micro_batches` leaves the model as it found it; `train()` applies the plan and logs it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adl_llm.batching import CPU_BATCH_TOKENS, epoch_batches, pad_multiple, padded_width
from adl_llm.config import TrainConfig
from adl_llm.distributed import rank, world_size
from adl_llm.encode import Encoded
from adl_llm.loss import accumulate_gradients
from adl_llm.memory import GIB, memory_limit
from adl_llm.modeling import gradient_checkpointing_on, set_gradient_checkpointing

log = logging.getLogger(__name__)
SAFETY = 0.85  # of the measured room: allocator fragmentation and lengths the probe did not see
RECOMPUTE_COST = 1.5  # a checkpointed pass's time over a plain one's (Gemma-3-270M on an H200: 1.5)
PLANNED_STEPS = 32  # the first steps of an epoch, whose micro-batches the checkpointing choice counts


@dataclass(frozen=True)
class MicroBatchPlan:
    tokens: int  # padded tokens per micro-batch (0 with a fixed cut, which counts examples instead)
    multiple: int  # micro-batch widths are rounded up to this
    gradient_checkpointing: bool
    # What a pass costs beyond its tokens, in padded tokens (measured on a GPU): a step is cut into more micro-batches
    # where that saves more padding; inf: as few micro-batches as fit
    pass_tokens: float = math.inf


def rank_share(batch: Sequence[Encoded], tc: TrainConfig) -> list[Encoded]:
    """This process's examples of a step. Under data parallelism with the automatic cut, the step's examples dealt
    longest first, so every rank's share has about the same longest example and padded work (a rank waits for the
    slowest at the gradient sum); a fixed cut keeps the data order, as the report's loop did."""
    if world_size() == 1:
        return list(batch)
    if tc.examples_per_micro_batch(world_size()):
        return list(batch[rank() :: world_size()])
    return sorted(batch, key=lambda ex: -len(ex.input_ids))[rank() :: world_size()]


def split_step(
    batch: Sequence[Encoded], tc: TrainConfig, micro_batch_tokens: int, multiple: int = 1, pass_tokens: float = math.inf
) -> list[list[Encoded]]:
    """The micro-batches of one process's share of a step: of `micro_batch_tokens` padded tokens at most, as few as
    fit, or, with a finite `pass_tokens`, those whose padded tokens plus `pass_tokens` a pass sum to the least."""
    fixed = tc.examples_per_micro_batch(world_size())
    if fixed:
        return [list(batch[i : i + fixed]) for i in range(0, len(batch), fixed)]
    if math.isfinite(pass_tokens):
        return _least_padding(batch, micro_batch_tokens, multiple, pass_tokens)
    micro_batches: list[list[Encoded]] = []
    for ex in sorted(batch, key=lambda ex: -len(ex.input_ids)):
        # Longest first, so a micro-batch's padded size is its first example's padded length times its size.
        last = micro_batches[-1] if micro_batches else None
        if last and padded_width(len(last[0].input_ids), multiple) * (len(last) + 1) <= micro_batch_tokens:
            last.append(ex)
        else:
            micro_batches.append([ex])
    return micro_batches


def _least_padding(
    batch: Sequence[Encoded], micro_batch_tokens: int, multiple: int, pass_tokens: float
) -> list[list[Encoded]]:
    """The cut of the longest-first examples into runs that costs least: each run padded to its first example's
    width, plus `pass_tokens` a run, within `micro_batch_tokens` (an example longer than that alone)."""
    examples = sorted(batch, key=lambda ex: -len(ex.input_ids))
    # best[j]: the least (cost, runs) of the first j examples: of two cuts that cost the same, the one of fewer runs
    best: list[tuple[float, int]] = [(0.0, 0)] + [(math.inf, 0)] * len(examples)
    start = [0] * (len(examples) + 1)  # where the last run of that cut starts
    for j in range(1, len(examples) + 1):
        for i in range(j - 1, -1, -1):
            padded = padded_width(len(examples[i].input_ids), multiple) * (j - i)
            if padded > micro_batch_tokens and i < j - 1:
                break  # longer runs starting earlier only grow
            candidate = (best[i][0] + padded + pass_tokens, best[i][1] + 1)
            if candidate < best[j]:
                best[j], start[j] = candidate, i
    runs, j = [], len(examples)
    while j:
        runs.append(examples[start[j] : j])
        j = start[j]
    return runs[::-1]


def plan_micro_batches(model, examples: Sequence[Encoded], tc: TrainConfig, pad_id: int, device) -> MicroBatchPlan:
    """Padded tokens per micro-batch and whether to checkpoint: given, a CPU default, or measured on the GPU."""
    multiple = pad_multiple(tc.pad_to_multiple, device)
    asked = bool(tc.gradient_checkpointing)
    if tc.micro_batch_tokens or tc.examples_per_micro_batch(world_size()):
        return MicroBatchPlan(tc.micro_batch_tokens or 0, multiple, asked)
    if device.type != "cuda":
        return MicroBatchPlan(CPU_BATCH_TOKENS, multiple, asked)
    longest = max(examples, key=lambda ex: len(ex.input_ids))
    length = padded_width(len(longest.input_ids), multiple)
    # This process's share of the first steps of an epoch, as split_step will cut them.
    shares = [
        rank_share([examples[i] for i in step], tc)
        for step in epoch_batches(len(examples), tc.batch_size, 0, 0)[:PLANNED_STEPS]
    ]

    def per_step(tokens: int | None) -> float:
        """Mean micro-batches a step with `tokens` each, or infinity where the longest example does not fit."""
        if not tokens or tokens < length:
            return math.inf
        return sum(len(split_step(share, tc, tokens, multiple)) for share in shares) / len(shares)

    def timed(plan: MicroBatchPlan) -> MicroBatchPlan:
        return _with_pass_tokens(model, plan, longest, len(shares[0]), pad_id, device)

    def measured(checkpointing: bool) -> int | None:
        return _measured_tokens(model, longest, tc, pad_id, device, multiple, checkpointing)

    plain = None if tc.gradient_checkpointing else measured(False)
    plain_per_step = per_step(plain)
    if tc.gradient_checkpointing is False or plain_per_step == 1:
        return timed(MicroBatchPlan(max(plain or 0, length), multiple, False))
    checkpointed = measured(True)
    if tc.gradient_checkpointing is None:
        checkpointed_per_step = per_step(checkpointed)
        if plain_per_step < math.inf and plain_per_step <= RECOMPUTE_COST * checkpointed_per_step:
            return timed(MicroBatchPlan(max(plain, length), multiple, False))
        log.info(
            "gradient checkpointing on: %.1f micro-batches a step without it, %.1f with it",
            plain_per_step,
            checkpointed_per_step,
        )
    if checkpointed is None:
        raise torch.OutOfMemoryError("a pass of the longest example does not fit, even with gradient checkpointing")
    return timed(MicroBatchPlan(max(checkpointed, length), multiple, True))


def _with_pass_tokens(model, plan: MicroBatchPlan, longest: Encoded, share: int, pad_id: int, device) -> MicroBatchPlan:
    """`plan` with what a pass costs beyond its tokens, from the times of two passes of copies of the longest example
    (as many as a micro-batch of a step's share holds, and half as many), each timed after a first run. Where the
    passes wait on the host (a small model's launches) the larger costs no more than the smaller: inf."""
    length = padded_width(len(longest.input_ids), plan.multiple)
    large = min(share, plan.tokens // length)
    small = large // 2
    if small < 1:
        return plan
    was_on = gradient_checkpointing_on(model)
    set_gradient_checkpointing(model, plan.gradient_checkpointing)
    try:
        small_s, large_s = (_pass_seconds(model, [longest] * n, pad_id, device, plan.multiple) for n in (small, large))
    finally:
        set_gradient_checkpointing(model, was_on)
    per_token = (large_s - small_s) / ((large - small) * length)
    fixed = small_s - per_token * small * length
    if per_token <= 0 or fixed <= 0:  # waiting on the host; or timings too noisy to say what a pass costs
        log.info(
            "passes of %d and %d padded tokens took %.1f and %.1f ms: as few micro-batches as fit",
            small * length,
            large * length,
            1000 * small_s,
            1000 * large_s,
        )
        return plan
    pass_tokens = fixed / per_token
    log.info(
        "a pass costs as much as %.0f padded tokens besides its own (%.1f ms at %d tokens, %.1f ms at %d): each step "
        "cut into the micro-batches that cost least with their padding",
        pass_tokens,
        1000 * small_s,
        small * length,
        1000 * large_s,
        large * length,
    )
    return dataclasses.replace(plan, pass_tokens=pass_tokens)


def _pass_seconds(model, examples: Sequence[Encoded], pad_id: int, device, multiple: int) -> float:
    """The shorter of two timed forward/backward passes over `examples`, after a first one (a new shape may compile)."""
    times = []
    for _ in range(3):
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        accumulate_gradients(model, [examples], 1, pad_id, device, multiple)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
    return min(times[1:])


def _measured_tokens(
    model, longest: Encoded, tc: TrainConfig, pad_id: int, device, multiple: int, checkpointing: bool
) -> int | None:
    """Padded tokens per micro-batch that fit train.memory_budget_gb; None if the probe runs out of memory.

    The model's gradient checkpointing is set as asked for the probe and restored after it."""
    was_on = gradient_checkpointing_on(model)
    set_gradient_checkpointing(model, checkpointing)
    try:
        return _measure(model, longest, tc, pad_id, device, multiple)
    finally:
        set_gradient_checkpointing(model, was_on)


def _measure(model, longest: Encoded, tc: TrainConfig, pad_id: int, device, multiple: int) -> int | None:
    length = padded_width(len(longest.input_ids), multiple)
    limit = memory_limit(tc.memory_budget_gb, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device) + 16 * trainable  # + fp32 gradients and two Adam moments
    try:
        one, two = (_pass_peak(model, [longest] * n, pad_id, device, multiple) - base for n in (1, 2))
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return None
    per_token = max((two - one) / length, 1.0)
    fixed = max(one - per_token * length, 0.0)
    tokens = int(SAFETY * (limit - base - fixed) / per_token)
    log.info(
        "%s: micro-batches of up to %d padded tokens (%.0f KiB per token + %.0f MiB, budget %.1f GiB)",
        "checkpointing" if gradient_checkpointing_on(model) else "no checkpointing",
        tokens,
        per_token / 1024,
        fixed / 2**20,
        limit / GIB,
    )
    return tokens


def _pass_peak(model, examples: Sequence[Encoded], pad_id: int, device, multiple: int) -> int:
    """Peak allocated bytes of one forward/backward pass over `examples` (its gradient is dropped)."""
    torch.cuda.reset_peak_memory_stats(device)
    accumulate_gradients(model, [examples], 1, pad_id, device, multiple)
    model.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated(device)
