"""The course perplexity, batched.

Per example: exp(mean NLL of the answer tokens, EOS included), each predicted from the tokens before it;
the score is the mean of the per-example values. Batches are sorted by length and padded on the right,
pads are masked out of attention and of the mean, and the vocabulary projection runs only over the span
of positions that predict answer tokens, so the result does not depend on the batch size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from adl_llm.encode import IGNORE, Encoded


def pad_right(rows: Sequence[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)


@torch.no_grad()
def perplexities(
    model, examples: Sequence[Encoded], *, batch_size: int, pad_id: int, progress: bool = True
) -> list[float]:
    """Per-example course perplexity, in the order of `examples` (NaN where no answer token is left)."""
    device = next(model.parameters()).device
    # Longest first: similar lengths share a batch (little padding), and an out-of-memory shows at once.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    result = [math.nan] * len(examples)
    with tqdm(total=len(examples), desc="perplexity", unit="ex", disable=not progress, mininterval=2) as bar:
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start : start + batch_size]]
            for i, value in zip(order[start : start + batch_size], _batch_ppl(model, batch, pad_id, device)):
                result[i] = value
            bar.update(len(batch))
    return result


def _batch_ppl(model, batch: Sequence[Encoded], pad_id: int, device: torch.device) -> list[float]:
    input_ids = pad_right([ex.input_ids for ex in batch], pad_id).to(device)
    labels = pad_right([ex.labels for ex in batch], IGNORE).to(device)
    attention_mask = pad_right([[1] * len(ex.input_ids) for ex in batch], 0).to(device)
    # Position t predicts token t+1: keep the positions from the first scored token's predecessor on.
    scored = labels[:, 1:] != IGNORE
    first = int(scored.any(dim=0).nonzero()[0]) if scored.any() else 0
    keep = torch.arange(first, labels.shape[1] - 1, device=device)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False
    ).logits
    targets = labels[:, first + 1 :]
    values = []
    for row_logits, row_targets in zip(logits, targets):  # one row at a time: fp32 logits stay small
        mask = row_targets != IGNORE
        if not mask.any():
            values.append(math.nan)
            continue
        nll = F.cross_entropy(row_logits[mask].float(), row_targets[mask], reduction="mean")
        values.append(math.exp(nll.item()))
    return values
