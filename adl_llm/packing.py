"""Packed passes (`train.packing`): the examples of a micro-batch end to end in one row, no padding computed.

Padded to its longest example, a step of 16 of the report's examples is half padding (2.0 padded tokens a real one,
Gemma's tokenizer, 64-column widths), and every padded token costs a 7B as much as a real one. Packed, a pass holds
only real tokens (and at most `multiple` - 1 of padding at the row's end). The examples stay apart through
transformers' own handling of packed rows: given position ids that restart at 0 and no attention mask, the model's
mask lets each token attend only to its own example (`masking_utils.find_packed_sequence_indices`; the same path as
transformers' `DataCollatorWithFlattening`). The loss is the padded passes' up to rounding: each position still
predicts the next token of its own example.

A model whose attention ignores that (an older architecture, a custom one) would silently let examples attend to
each other, so before a run packs, `keeps_examples_apart` checks it on the model itself: an example's hidden states
in a packed row must be its own, far closer to them than where it attends to the example before it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from adl_llm.batching import padded_width
from adl_llm.encode import Encoded
from adl_llm.errors import first_line

log = logging.getLogger(__name__)
# Tokens of one packed row at most: the model's mask of a packed row is dense, [row, row] (a 4096-token row: 16 MiB
# of booleans, and attention computed over all of it: by FLOP count about 15% of a 7B's pass at 4096 tokens).
ROW_TOKENS = 4096
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
    log.info("packed passes: on (rows of up to %d tokens)", ROW_TOKENS)
    return True


@torch.no_grad()
def keeps_examples_apart(model, examples: Sequence[Encoded], device: torch.device) -> str | None:
    """None where `model`, given a packed row of two examples, gives the second the hidden states it has alone;
    otherwise why not, in a few words.

    "The same" is judged against what a model that ignored the packing would give (the row under one causal mask:
    the second example attending to the first), so bf16 rounding, which moves all three, cannot pass for a leak."""
    pair = (torch.tensor(ex.input_ids[:n], device=device) for ex, n in zip([examples[0], examples[-1]], PROBE_TOKENS))
    first, second = sorted(pair, key=len, reverse=True)
    decoder = model.get_decoder()
    row = torch.cat([first, second])[None]
    positions = torch.cat([torch.arange(len(first)), torch.arange(len(second))]).to(device)[None]
    was_training = model.training
    model.eval()  # no dropout: the passes must see the same weights
    try:
        alone = _hidden(decoder, input_ids=second[None])
        packed = _hidden(decoder, input_ids=row, position_ids=positions)[:, len(first) :]
        leaked = _hidden(decoder, input_ids=row, position_ids=positions, attention_mask=torch.ones_like(row))
    except (TypeError, ValueError, RuntimeError) as err:  # no position ids, or a shape the model refuses
        return f"the model does not take packed rows ({type(err).__name__}: {first_line(str(err))[:200]})"
    finally:
        model.train(was_training)
    packed_error, leaked_error = _relative(packed, alone), _relative(leaked[:, len(first) :], alone)
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


def pack_rows(examples: Sequence[Encoded], row_tokens: int, multiple: int = 1) -> list[list[Encoded]]:
    """The examples in as few packed rows of at most `row_tokens` padded tokens as first fit finds, longest first
    (an example longer than that takes a row of its own)."""
    rows: list[list[Encoded]] = []
    used: list[int] = []
    for ex in sorted(examples, key=lambda ex: -len(ex.input_ids)):
        length = len(ex.input_ids)
        fits = (i for i, tokens in enumerate(used) if padded_width(tokens + length, multiple) <= row_tokens)
        slot = next(fits, None)
        if slot is None:
            rows.append([ex])
            used.append(length)
        else:
            rows[slot].append(ex)
            used[slot] += length
    return rows


def deal_by_tokens(batch: Sequence[Encoded], ranks: int, rank: int) -> list[Encoded]:
    """Rank `rank`'s share of a step whose passes are packed, so cost the tokens they hold: longest first, each
    example to the rank with the fewest tokens so far (the lowest such rank on a tie), the same on every rank."""
    loads = [0] * ranks
    shares: list[list[Encoded]] = [[] for _ in range(ranks)]
    for ex in sorted(batch, key=lambda ex: -len(ex.input_ids)):
        least = loads.index(min(loads))
        shares[least].append(ex)
        loads[least] += len(ex.input_ids)
    return shares[rank]


def _shown(setting: bool | None) -> str:
    return "null" if setting is None else str(setting).lower()
