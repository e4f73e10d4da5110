"""The course perplexity, batched.

Per example: exp(mean NLL of the answer tokens, EOS included), each predicted from the tokens before it;
the score is the mean of the per-example values. Batches are sorted by length and padded on the right (on a
GPU to a multiple of 64 columns), pads are masked out of attention and of the mean, and the vocabulary
projection runs only at the positions that predict answer tokens, a chunk at a time (batching.py), so the
result does not depend on the batch size.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from adl_llm.batching import CPU_BATCH_TOKENS, collate, pad_multiple
from adl_llm.config import Config
from adl_llm.data import Record, by_slice, slice_names
from adl_llm.distributed import is_main, map_in_order
from adl_llm.encode import Encoded, encode_examples
from adl_llm.errors import RunFailed
from adl_llm.loss import SharedPrefix, answer_nll, shared_prefix
from adl_llm.memory import out_of_memory_advice
from adl_llm.prompts import build_prompts
from adl_llm.scores import perplexity_summary

log = logging.getLogger(__name__)


def encode_for_eval(cfg: Config, tokenizer, records: list[Record], shots: list[Record]) -> list[Encoded]:
    """The examples as the course metric encodes them; cut ones logged, none left to score refused (before any
    model loads)."""
    prompts = build_prompts([r.instruction for r in records], cfg.prompt, shots)
    examples = encode_examples(tokenizer, prompts, [r.output for r in records], cfg.eval.max_length)
    truncated = [r.id for r, ex in zip(records, examples) if ex.truncated]
    if truncated:
        log.warning(
            "%d of %d examples are longer than eval.max_length=%d and were cut as the course metric does: %s",
            len(truncated),
            len(records),
            cfg.eval.max_length,
            ", ".join(truncated[:5]),
        )
    if not any(ex.n_scored for ex in examples):
        raise RunFailed(
            f"eval.max_length={cfg.eval.max_length} leaves no answer token to score in any of the {len(records)} "
            "examples (every prompt fills it); raise eval.max_length"
        )
    return examples


def evaluate_examples(cfg: Config, model, tokenizer, records: list[Record], examples: list[Encoded]) -> dict:
    """The `eval/` metrics of `records`: mean and per-example perplexity, ids in file order, counts, time."""
    truncated = [r.id for r, ex in zip(records, examples) if ex.truncated]
    started = time.perf_counter()
    with out_of_memory_advice("perplexity", f"eval.batch_size (now {cfg.eval.batch_size}) or eval.max_length"):
        values = perplexities(
            model,
            examples,
            batch_size=cfg.eval.batch_size,
            pad_id=tokenizer.pad_token_id,
            pad_to_multiple=cfg.eval.pad_to_multiple,
            share_prefix=cfg.eval.share_prefix,
        )
    seconds = time.perf_counter() - started
    unscored = [r.id for r, v in zip(records, values) if math.isnan(v)]
    if unscored:
        log.warning("%d examples have no answer token left after truncation; left out of the mean", len(unscored))
    summary = perplexity_summary(values)
    log.info(
        "mean perplexity %.4f over %d examples (%s, %.1f s)",
        summary["eval/perplexity"],
        len(values) - len(unscored),
        cfg.prompt.name,
        seconds,
    )
    per_slice = {}
    if cfg.data.slices:
        for name, group in by_slice(values, slice_names(records, cfg.data.slices)).items():
            per_slice |= {f"{key}/{name}": value for key, value in perplexity_summary(group).items()}
            per_slice[f"eval/n_examples/{name}"] = len(group)
    return {
        **summary,
        **per_slice,
        "eval/perplexities": [None if math.isnan(v) else v for v in values],
        "eval/ids": [r.id for r in records],
        "eval/n_examples": len(records),
        "eval/n_truncated": len(truncated),
        "eval/n_unscored": len(unscored),
        "eval/seconds": seconds,
        "eval/prompt": cfg.prompt.name,
    }


@torch.no_grad()
def perplexities(
    model,
    examples: Sequence[Encoded],
    *,
    batch_size: int,
    pad_id: int,
    pad_to_multiple: int | None = None,
    progress: bool = True,
    share_prefix: bool = True,
) -> list[float]:
    """Per-example course perplexity, in the order of `examples` (NaN where no answer token is left).

    Batches are padded to a multiple of `pad_to_multiple` columns (null: batching.pad_multiple's default). With
    `share_prefix`, the tokens every example starts with (the system text, few-shot examples) are run once and
    their KV cache reused: the same values (tested), less compute, most for a few-shot prompt.
    """
    device = next(model.parameters()).device
    multiple = pad_multiple(pad_to_multiple, device)
    prefix = shared_prefix(model, examples) if share_prefix and examples else None
    # Sliding-window attention (Gemma 3: 512 tokens) sees a cached prefix as a full pass would only within its window.
    window = getattr(model.config.get_text_config(), "sliding_window", None) or math.inf
    # Longest first: similar lengths share a batch (little padding), and an out-of-memory shows at once.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))

    def work(share: list[int]) -> list[float]:
        values: list[float] = []
        with tqdm(total=len(share), desc="perplexity", unit="ex", disable=not progress or not is_main()) as bar:
            start = 0
            while start < len(share):
                size = batch_size
                if device.type == "cpu":  # a CPU pays for padding: batches of about CPU_BATCH_TOKENS padded tokens
                    size = max(1, min(batch_size, CPU_BATCH_TOKENS // len(examples[share[start]].input_ids)))
                batch = [examples[i] for i in share[start : start + size]]
                start += size
                usable = prefix if prefix and len(batch[0].input_ids) <= window else None
                values.extend(_batch_ppl(model, batch, pad_id, device, multiple, usable))
                bar.update(len(batch))
        return values

    by_index = map_in_order(order, work)  # under torchrun each rank scores a share
    return [by_index[i] for i in range(len(examples))]


def _batch_ppl(
    model, batch: Sequence[Encoded], pad_id: int, device: torch.device, multiple: int, prefix: SharedPrefix | None
) -> list[float]:
    if prefix is not None:  # the examples without the prefix they share
        batch = [
            dataclasses.replace(ex, input_ids=ex.input_ids[prefix.length :], labels=ex.labels[prefix.length :])
            for ex in batch
        ]
    sums, counts = answer_nll(model, collate(batch, pad_id, device, multiple=multiple), prefix).per_row(len(batch))
    mean_nll = (sums / counts).tolist()  # one transfer per batch; 0/0 gives NaN where no answer token is left
    return [math.exp(value) for value in mean_nll]
