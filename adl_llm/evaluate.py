"""The course perplexity, batched.

Per example: exp(mean NLL of the answer tokens, EOS included), each predicted from the tokens before it;
the score is the mean of the per-example values. Batches are sorted by length and padded on the right (on a
GPU to a multiple of 64 columns), pads are masked out of attention and of the mean, and the vocabulary
projection runs only at the positions that predict answer tokens, a chunk at a time (batching.py), so the
result does not depend on the batch size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from adl_llm.batching import answer_nll, collate, pad_multiple
from adl_llm.distributed import is_main, map_in_order
from adl_llm.encode import Encoded


@torch.no_grad()
def perplexities(
    model,
    examples: Sequence[Encoded],
    *,
    batch_size: int,
    pad_id: int,
    pad_to_multiple: int | None = None,
    progress: bool = True,
) -> list[float]:
    """Per-example course perplexity, in the order of `examples` (NaN where no answer token is left).

    Batches are padded to a multiple of `pad_to_multiple` columns (null: batching.pad_multiple's default).
    """
    device = next(model.parameters()).device
    multiple = pad_multiple(pad_to_multiple, device)
    # Longest first: similar lengths share a batch (little padding), and an out-of-memory shows at once.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))

    def work(share: list[int]) -> list[float]:
        values: list[float] = []
        with tqdm(total=len(share), desc="perplexity", unit="ex", disable=not progress or not is_main()) as bar:
            for start in range(0, len(share), batch_size):
                batch = [examples[i] for i in share[start : start + batch_size]]
                values.extend(_batch_ppl(model, batch, pad_id, device, multiple))
                bar.update(len(batch))
        return values

    by_index = map_in_order(order, work)  # under torchrun each rank scores a share
    return [by_index[i] for i in range(len(examples))]


def _batch_ppl(model, batch: Sequence[Encoded], pad_id: int, device: torch.device, multiple: int) -> list[float]:
    sums, counts = answer_nll(model, collate(batch, pad_id, device, multiple=multiple)).per_row(len(batch))
    mean_nll = (sums / counts).tolist()  # one transfer per batch; 0/0 gives NaN where no answer token is left
    return [math.exp(value) for value in mean_nll]
