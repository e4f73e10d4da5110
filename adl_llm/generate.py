"""task=generate: the eval file's prompts (fitted to gen.max_prompt_tokens) decoded by decoding.py, written as
predictions.json, scored with chrF and BLEU where the file has references."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from adl_llm.artifacts import write_json
from adl_llm.config import Config, LongPrompts
from adl_llm.data import Record, by_slice, slice_names
from adl_llm.decoding import encode_prompts, generate_from_ids
from adl_llm.distributed import is_main
from adl_llm.errors import UserError
from adl_llm.memory import out_of_memory_advice
from adl_llm.prompts import build_prompts
from adl_llm.scores import translation_scores

log = logging.getLogger(__name__)


def encode_for_generation(cfg: Config, tokenizer, records: list[Record], shots: list[Record]):
    """The prompts' token ids within gen.max_prompt_tokens (default eval.max_length), before any model loads;
    returns them and the ids of the records whose prompts were cut."""
    prompts = build_prompts([r.instruction for r in records], cfg.prompt, shots)
    limit = cfg.gen.max_prompt_tokens or cfg.eval.max_length
    bos = tokenizer.bos_token_id is not None
    return fit_prompts(encode_prompts(tokenizer, prompts), limit, cfg.gen.long_prompts, [r.id for r in records], bos)


def generate_records(cfg: Config, model, tokenizer, records: list[Record], prepared, out: Path) -> dict:
    """Decode `records` from their `prepared` prompts (encode_for_generation), write predictions.json ({id,
    output} in file order) and return the `gen/` metrics."""
    encoded, cut = prepared
    started = time.perf_counter()
    if cfg.gen.batch_size:
        settings = f"gen.batch_size (now {cfg.gen.batch_size}) or gen.beams"
    else:
        settings = "gen.memory_budget_gb or set gen.batch_size, or lower gen.beams"
    stats: dict = {}
    with out_of_memory_advice("generation", settings):
        texts = generate_from_ids(model, tokenizer, encoded, cfg.gen, fast=True, stats=stats)
    wall = time.perf_counter() - started
    seconds = wall - stats["warmup_seconds"]  # decoding; the stop-string tables and any compiling counted apart
    if is_main():
        write_json(out / "predictions.json", [{"id": r.id, "output": text} for r, text in zip(records, texts)])
    metrics = {
        "gen/n_examples": len(records),
        "gen/n_prompts_cut": len(cut),
        "gen/seconds": seconds,
        "gen/warmup_seconds": stats["warmup_seconds"],
        "gen/wall_seconds": wall,
        "gen/path": stats["path"],
        "gen/batches_decoded_again": stats.get("batches_decoded_again", 0),  # deferred_syncs.py: rare
        "gen/examples_per_s": len(records) / seconds,
        "gen/new_tokens_per_s": count_new_tokens(tokenizer, texts) / seconds,
        "gen/setting": dataclasses.asdict(cfg.gen),
    }
    references = [r.output for r in records]
    if all(ref is not None for ref in references):
        metrics.update(translation_scores(texts, references))
        if cfg.data.slices:
            pairs = by_slice(list(zip(texts, references)), slice_names(records, cfg.data.slices))
            for name, group in pairs.items():
                hypotheses, refs = (list(side) for side in zip(*group))
                metrics |= {f"{key}/{name}": value for key, value in translation_scores(hypotheses, refs).items()}
                metrics[f"gen/n_examples/{name}"] = len(group)
    log.info(
        "generated %d answers in %.1f s (%.2f examples/s; path %s, %.1f s warm-up)",
        len(records),
        seconds,
        len(records) / seconds,
        stats["path"],
        stats["warmup_seconds"],
    )
    return metrics


def fit_prompts(
    encoded: list[list[int]], limit: int, policy: LongPrompts, names: Sequence[str], bos: bool
) -> tuple[list[list[int]], list[str]]:
    """Prompts of at most `limit` tokens: longer ones cut from the left (BOS kept) or refused, naming the first.

    Returns the prompts and the names of those cut. Without a limit one long prompt (a pasted document) grows a
    batch's attention and KV cache until the machine runs out of memory."""
    long = [i for i, ids in enumerate(encoded) if len(ids) > limit]
    if long and policy is LongPrompts.refuse:
        first = long[0]
        raise UserError(
            f"record {names[first]!r}: its prompt has {len(encoded[first])} tokens, over gen.max_prompt_tokens="
            f"{limit}; raise it, or set gen.long_prompts=cut_left ({len(long)} prompt(s) too long)"
        )
    head = 1 if bos else 0
    fitted = [ids[:head] + ids[len(ids) - (limit - head) :] if len(ids) > limit else ids for ids in encoded]
    if long:
        log.warning(
            "%d prompt(s) longer than gen.max_prompt_tokens=%d were cut from the left: %s",
            len(long),
            limit,
            ", ".join(str(names[i]) for i in long[:5]),
        )
    return fitted, [names[i] for i in long]


def count_new_tokens(tokenizer, texts: Sequence[str]) -> int:
    """Tokens of the kept answers (the cut text), for a tokens/s figure that ignores padding and cut tails."""
    return sum(len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]) if texts else 0
