"""Packed passes (`train.packing`): the examples of a micro-batch end to end in rows, no padding computed.

Padded to its longest example, a step of 16 of the report's examples is half padding (2.0 padded tokens a real one,
Gemma's tokenizer, 64-column widths), and every padded token costs a 7B as much as a real one. Packed, a pass holds
only real tokens (and the rounding of its rows to one width). The examples stay apart through transformers' own
handling of packed rows: given position ids that restart at 0 and no attention mask, the model's mask lets each token
attend only to its own example (`masking_utils.find_packed_sequence_indices`, row by row; the detection that
transformers' own `DataCollatorWithFlattening` relies on). The loss is the padded passes' up to rounding: each
position still predicts the next token of its own example.

That mask is dense, [row, row], and SDPA computes attention over all of it: in one 2,103-token row, the 7B shape's
step spent 104 ms in attention against 127 ms in its matrix products (an H200). So a micro-batch is cut into the
number of rows of about equal tokens that costs least by the model's shape (`packed_rows`,
`attention_break_even`): the 7B shape's rows pay from about 2,600 tokens wide, the Gemma-3-270M's from about 280.
The rows, padded to the widest, stay within the memory plan's tokens; on flash attention a micro-batch keeps one row
(transformers keeps packed examples apart there only in a batch of one row, and there is no dense mask).
Flex attention (transformers' `flex_attention`, block-sparse masks) was measured instead and trained the 7B shape
slower: 5,677 tokens/s against 7,474 (docs/BENCHMARKS.md).

A model whose attention ignores packed position ids (an older architecture, a custom one) would silently let
examples attend to each other, so before a run packs, `keeps_examples_apart` checks it on the model itself: an
example's hidden states in a packed row must be its own, far closer to them than where it attends to the example
before it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adl_llm.batching import Batch, padded_width
from adl_llm.encode import IGNORE, Encoded
from adl_llm.errors import first_line

log = logging.getLogger(__name__)
# Tokens of one packed row at most: the model's mask of a packed row is dense, [row, row] (a 4096-token row: 16 MiB
# of booleans a row, and attention computed over all of it).
ROW_TOKENS = 4096
# The time of a (query, key) pair of dense masked attention for each unit of attention width, over the time of a
# token for each weight of the linear layers (forward, recompute and backward of both). Measured on an H200 with the
# 7B shape's compiled, checkpointed step: a 2,103-token packed row spent 127 ms in matrix products and 104 ms in
# SDPA's memory-efficient attention with the row's mask (docs/bench/profile-llama7b-step-packed.txt).
ATTENTION_PAIR_COST = 9.6
# An example's hidden states in a packed row may be this far from its own, as a fraction of how far they are where
# it attends to the example before it (bf16 rounding: a few percent of that; a model that ignores the packing: all).
LEAK_FRACTION = 0.25
PROBE_TOKENS = (40, 24)  # the probe's two examples, cut to these lengths


def packing_requested(setting: bool | None, device: torch.device) -> bool:
    """train.packing as asked; null: on a GPU only (a CPU run keeps its padded passes, which its tests pin)."""
    return setting if setting is not None else device.type == "cuda"


def packs(setting: bool | None, model, examples: Sequence[Encoded], device: torch.device) -> bool:
    """Whether this run packs its passes: as asked (`packing_requested`) and where the model keeps packed examples
    apart; logs the choice and, where asked for but refused, why."""
    if not packing_requested(setting, device):
        log.info("packed passes: off (train.packing=%s on %s)", _shown(setting), device.type)
        return False
    refused = keeps_examples_apart(model, examples, device)
    if refused:
        log.warning("packed passes: off, %s; training on padded passes", refused)
        return False
    log.info("packed passes: on")
    return True


@torch.no_grad()
def keeps_examples_apart(model, examples: Sequence[Encoded], device: torch.device) -> str | None:
    """None where `model`, given packed rows of two examples (in as many rows as training gives it), gives the second
    the hidden states it has alone; otherwise why not, in a few words.

    "The same" is judged against what a model that ignored the packing would give (the same rows with the positions
    running on: one causal mask over each row, the second example attending to the first), so bf16 rounding, which
    moves all three, cannot pass for a leak. The two are cut from the examples' ends, their answers: their starts
    are often the same prompt text."""
    pair = (torch.tensor(ex.input_ids[-n:], device=device) for ex, n in zip([examples[0], examples[-1]], PROBE_TOKENS))
    first, second = sorted(pair, key=len, reverse=True)
    count = 1 if row_layout(model).single else 2
    rows = torch.cat([first, second]).repeat(count, 1)
    positions = torch.cat([torch.arange(len(first)), torch.arange(len(second))]).to(device).repeat(count, 1)
    decoder = model.get_decoder()
    was_training = model.training
    model.eval()  # no dropout: the passes must see the same weights
    try:
        alone = _hidden(decoder, input_ids=second[None]).expand(count, -1, -1)
        packed = _hidden(decoder, input_ids=rows, position_ids=positions)[:, len(first) :]
        leaked = _hidden(decoder, input_ids=rows)[:, len(first) :]
    except (TypeError, ValueError, RuntimeError) as err:  # no position ids, or a shape the model refuses
        return f"the model does not take packed rows ({type(err).__name__}: {first_line(str(err))[:200]})"
    finally:
        model.train(was_training)
    packed_error, leaked_error = _relative(packed, alone), _relative(leaked, alone)
    if not packed_error < LEAK_FRACTION * leaked_error:
        return (
            f"{type(decoder).__name__} lets the examples of a packed row attend to each other (an example's hidden "
            f"states {packed_error:.3f} from its own, relative; {leaked_error:.3f} where it sees the one before)"
        )
    return None


def _hidden(decoder, **inputs) -> torch.Tensor:
    return decoder(**inputs, use_cache=False).last_hidden_state.float()


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm().clamp_min(1e-12))


def pack_rows(examples: Sequence[Encoded], budget: int, multiple: int = 1) -> list[list[Encoded]]:
    """The examples in as few groups of at most `budget` tokens (each rounded up to `multiple`) as first fit finds,
    longest first (an example longer than that takes a group of its own): the micro-batches of a packed step."""
    groups: list[list[Encoded]] = []
    used: list[int] = []
    for ex in sorted(examples, key=lambda ex: -len(ex.input_ids)):
        length = len(ex.input_ids)
        fits = (i for i, tokens in enumerate(used) if padded_width(tokens + length, multiple) <= budget)
        slot = next(fits, None)
        if slot is None:
            groups.append([ex])
            used.append(length)
        else:
            groups[slot].append(ex)
            used[slot] += length
    return groups


def balance(examples: Sequence[Encoded], parts: int) -> list[list[Encoded]]:
    """The examples in `parts` groups of about equal tokens: longest first, each to the group with the fewest tokens
    so far (the first such group on a tie)."""
    loads = [0] * parts
    groups: list[list[Encoded]] = [[] for _ in range(parts)]
    for ex in sorted(examples, key=lambda ex: -len(ex.input_ids)):
        least = loads.index(min(loads))
        groups[least].append(ex)
        loads[least] += len(ex.input_ids)
    return groups


@dataclass(frozen=True)
class Rows:
    """How a packed micro-batch is cut into rows (`packed_rows`)."""

    break_even: float = math.inf  # attention_break_even of the model
    budget: int | None = None  # tokens the rows of a micro-batch may hold, padding included (the memory plan's)
    single: bool = False  # one row a micro-batch, always: flash attention keeps packed examples apart only so


def row_layout(model) -> Rows:
    """How the micro-batches of `model` are cut into packed rows: by the break-even width of its shape, or in one
    row where it runs flash attention, which keeps packed examples apart only in a batch of one row (transformers'
    `_is_packed_sequence`) and has no dense mask to pay for."""
    config = _text_config(model)
    implementation = str(getattr(config, "_attn_implementation", None) or "")
    return Rows(attention_break_even(model), single=implementation.startswith("flash"))


def _text_config(model):
    """The model's text config, or None for a model without a transformers config."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def packed_rows(examples: Sequence[Encoded], multiple: int = 1, rows: Rows = Rows()) -> list[list[Encoded]]:
    """The rows of a packed micro-batch: the count of rows of about equal tokens (`balance`) whose cost is least,
    each row's cost being its padded width times (1 + width / `rows.break_even`): the linear layers' work a token,
    and the dense mask's attention over the width. Counts whose rows, padded to the widest, would hold more than
    `rows.budget` tokens are left out (one row always fits: it is the micro-batch); rows wider than ROW_TOKENS are
    left out where narrower ones are possible, and kept as narrow as they can be where not; ties keep fewer rows."""
    best: list[list[Encoded]] = [list(examples)]
    if rows.single:
        return best
    best_key: tuple = (True, math.inf, math.inf)
    for count in range(1, len(examples) + 1):
        candidate = balance(examples, count)
        width = _row_width(candidate, multiple)
        if count > 1 and rows.budget is not None and count * width > rows.budget:
            continue
        too_wide = width > ROW_TOKENS
        key = (too_wide, width if too_wide else 0, count * width * (1 + width / rows.break_even))
        if key < best_key:
            best, best_key = candidate, key
    return best


def _row_width(rows: Sequence[Sequence[Encoded]], multiple: int) -> int:
    """The width the rows are padded to: the widest row's tokens, rounded up to `multiple`."""
    return padded_width(max(sum(len(ex.input_ids) for ex in row) for row in rows), multiple)


def collate_packed(
    examples: Sequence[Encoded],
    pad_id: int,
    device: torch.device | str = "cpu",
    *,
    multiple: int = 1,
    rows: Rows = Rows(),
) -> Batch:
    """The examples end to end in rows (`packed_rows`), each example numbered from position 0; each row padded up to
    the widest, rounded up to a multiple of `multiple` columns, its padding numbered from 0 as well (a sequence of its
    own). Each example's first token is left out of the loss: in a row, the token before it is another example's."""
    cut = packed_rows(examples, multiple, rows)
    width = _row_width(cut, multiple)
    columns: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": [], "position_ids": []}
    for row in cut:
        ids = [token for ex in row for token in ex.input_ids]
        tail = width - len(ids)
        columns["input_ids"].append(ids + [pad_id] * tail)
        columns["attention_mask"].append([1] * len(ids) + [0] * tail)
        columns["labels"].append([label for ex in row for label in (IGNORE, *ex.labels[1:])] + [IGNORE] * tail)
        columns["position_ids"].append([i for ex in row for i in range(len(ex.input_ids))] + list(range(tail)))
    return Batch(**{key: torch.tensor(value, dtype=torch.long, device=device) for key, value in columns.items()})


def attention_break_even(model) -> float:
    """The packed row width at which a row's dense attention costs as much as its linear layers, estimated from the
    model's shape; math.inf (no attention cost counted) where its config does not say it."""
    config = _text_config(model)
    try:
        hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
        intermediate = config.intermediate_size
        if isinstance(intermediate, (list, tuple)):  # one size a layer (Gemma 3n): their mean
            intermediate = sum(intermediate) / len(intermediate)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        attention = heads * head_dim
        weights = 2 * hidden * attention + 2 * hidden * kv_heads * head_dim + 3 * hidden * float(intermediate)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return math.inf
    return weights / (ATTENTION_PAIR_COST * 2 * attention)  # attention: q.k and p.v, `attention` wide, a pair


def _shown(setting: bool | None) -> str:
    return "null" if setting is None else str(setting).lower()
