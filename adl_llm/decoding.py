"""Batched decoding of encoded prompts: sorted by length, left-padded, cut where the model starts a new turn.

Each prompt is `[BOS] + tok(prompt)`, exactly the prefix the course perplexity scores the answer after. A
generation ends at EOS, at `gen.max_new_tokens`, or at the first stop string (`USER:` or a newline by default:
3-shot outputs otherwise go on to invent a fourth numbered question); the text from the stop string on is cut.

A batch holds as many prompts as fit in `gen.memory_budget_gb` (unless `gen.batch_size` is set): for a small
model a decoding step costs about the same for 1 or 500 sequences, so the batch size is the speed-up. A batch job
can take the fast path of decode_path.py; chat and the tests call the same function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)

from adl_llm import decode_path, deferred_syncs
from adl_llm.config import GenConfig
from adl_llm.distributed import is_main, map_in_order
from adl_llm.errors import UserError, first_line
from adl_llm.memory import GIB
from adl_llm.sampling import TopKTopPSampling

log = logging.getLogger(__name__)

CPU_BATCH_SIZE = 16  # prompts per batch on a CPU, where compute, not memory, limits...
CPU_BATCH_TOKENS = 4096  # ...unless they are long: at most this many prompt and new tokens a batch
# fp32 vocabulary rows per sequence while a token is chosen (bounds; docs/BENCHMARKS.md): search (greedy or beams)
# holds logits, log-probabilities and scored candidates; sampling adds probabilities and top-p's sorted copies,
# which fused sampling (sampling.py) does not make: it needs the rows of search (on an H200 its beams-5 job peaked
# at 3.43 GiB, with batches sized for the 10 copies, against the plain path's 6.23).
LOGIT_COPIES = {"search": 6, "sampling": 10}
SAFETY = 0.8  # of the estimated room: allocator fragmentation, workspace of the attention kernels
WARMUP_NEW_TOKENS = 4  # a compiled step is traced on its first call, captured as a CUDA graph on a later one


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the earliest stop string, without surrounding whitespace."""
    end = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:end].strip()


def prompts_per_batch(model, gen: GenConfig, longest: int, fused_sampling: bool = False) -> int:
    """`gen.batch_size`, or the prompts whose sequences fit `gen.memory_budget_gb` next to the model.

    A sequence (one per beam) holds its KV cache for `longest + max_new_tokens` positions and, while a token is
    chosen, a few fp32 rows of the vocabulary (LOGIT_COPIES; fewer with `fused_sampling`): with Gemma's 262k
    tokens the latter dominate.
    """
    device = next(model.parameters()).device
    if gen.batch_size:
        return gen.batch_size
    if device.type != "cuda":
        return max(1, min(CPU_BATCH_SIZE, CPU_BATCH_TOKENS // ((longest + gen.max_new_tokens) * gen.beams)))
    text = model.config.get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * heads * head_dim * torch.finfo(model.dtype).bits // 8
    copies = LOGIT_COPIES["sampling" if gen.do_sample and not fused_sampling else "search"]
    per_sequence = kv_per_token * (longest + gen.max_new_tokens) + copies * 4 * text.vocab_size
    room = gen.memory_budget_gb * GIB - torch.cuda.memory_allocated(device)
    return max(1, int(SAFETY * room / per_sequence) // gen.beams)


def pad_left(rows: Sequence[list[int]], value: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and their attention mask, `width` columns (default: the longest row's): every prompt ends at
    the last column, where decoding starts."""
    width = max([width or 0, *(len(row) for row in rows)])
    ids = torch.tensor([[value] * (width - len(row)) + row for row in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], dtype=torch.long)
    return ids, mask


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """`[BOS] + tok(prompt)`: the prefix the course perplexity scores the answer after."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + ids for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]


def generate_texts(model, tokenizer, prompts: Sequence[str], gen: GenConfig, *, progress: bool = True) -> list[str]:
    """One decoded answer per prompt, in the order of `prompts`."""
    return generate_from_ids(model, tokenizer, encode_prompts(tokenizer, prompts), gen, progress=progress)


@torch.no_grad()
def generate_from_ids(
    model,
    tokenizer,
    encoded: list[list[int]],
    gen: GenConfig,
    *,
    progress: bool = True,
    fast: bool = False,
    stats: dict | None = None,
) -> list[str]:
    """One decoded answer per encoded prompt, in their order. `fast`: the decode path of decode_path.py (a batch
    job's; a chat's prompts come one at a time). Into `stats`: the path, and the seconds of warm-up before the first
    answer (the stop-string tables, and the compiling of a compiled step), which examples/s leaves out."""
    # Longest first: little padding per batch, and an out-of-memory shows in the first batch, not the last.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    stats = {} if stats is None else stats
    started = time.perf_counter()
    stops = stop_criterion(tokenizer, gen.stop_strings)
    stats["warmup_seconds"] = time.perf_counter() - started
    with decode_path.fast_path(model, gen) if fast else contextlib.nullcontext(decode_path.PLAIN) as path:
        stats["path"] = path.describe()
        by_index = map_in_order(order, _with_fallback(model, tokenizer, encoded, gen, path, stops, stats, progress))
    return [by_index[i] for i in range(len(encoded))]


def _with_fallback(model, tokenizer, encoded, gen, path, stops, stats, progress):
    """The decoding of one share of the prompts (under torchrun each rank decodes one), on `path`, or where a
    static cache or a compiled step fails, on the plain path (with the weights as `path` has them)."""

    def work(share: list[int]) -> list[str]:
        nonlocal path
        try:
            return _decode(model, tokenizer, encoded, share, gen, path, stops, stats, progress)
        except (torch.OutOfMemoryError, UserError):  # named as ever, not retried
            raise
        except Exception as err:
            if not path.static_cache:
                raise
            log.warning(
                "decoding with a %s failed (%s: %s); decoding again on the plain path (gen.static_cache=false "
                "gen.compile=false skip the attempt)",
                "compiled step" if "compile" in stats["path"] else "static cache",
                type(err).__name__,
                first_line(str(err)).strip()[:200],
            )
        # Out of the except block: the failed attempt's frames, and its static cache with them, are gone, so the
        # plain path's batches are sized on the memory it really has.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        path = dataclasses.replace(path, static_cache=False, compile=False, nf4_graph=False)
        stats["path"] = path.describe()
        return _decode(model, tokenizer, encoded, share, gen, path, stops, stats, progress)

    return work


def _decode(model, tokenizer, encoded, share, gen, path, stops, stats, progress) -> list[str]:
    """The answers of `share` (prompt indices, longest first) in its order, batch by batch on `path`."""
    if not share:  # under torchrun, a rank whose share of a few prompts is empty
        return []
    device = next(model.parameters()).device
    width = decode_path.bucket(len(encoded[share[0]])) if path.static_cache else None
    extra, cache = {}, None
    if path.static_cache:  # one cache length for every batch, the warm-up's too
        extra = decode_path.generation_settings()
        cache = decode_path.job_cache(model, width + gen.max_new_tokens) if path.compile else None
        if cache is None:
            extra.update(cache_implementation="static", max_cache_len=width + gen.max_new_tokens)
        if path.compile and cache is None:
            log.info("gen.compile: off, since this model's KV cache kinds would recompile the step (decode_path)")
            path = dataclasses.replace(path, compile=False, nf4_graph=False)
            stats["path"] = path.describe()
    settings = generation_config(gen, tokenizer, fused_sampling=path.fused_sampling, **extra)
    processors = sampling_processors(gen, path.fused_sampling, defer_fallback=path.deferred_syncs)
    sampler = next((p for p in processors if isinstance(p, TopKTopPSampling) and p.defer_fallback), None)

    def attempt(ids: torch.Tensor, mask: torch.Tensor, settings: GenerationConfig, seed: int) -> torch.Tensor:
        given = {}
        if cache is not None:
            cache.reset()
            given[decode_path.CACHE_KWARG] = cache
        if sampler is not None:
            sampler.missed = None
        with (
            deferred_syncs.seeded(device, seed),
            decode_path.compiled(model, path),
            deferred_syncs.deferred(model, settings.max_new_tokens, enabled=path.deferred_syncs),
        ):
            return model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=settings,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([stops(ids.shape[1])] if stops else []),
                **given,
            )

    def run(rows: list[int], settings: GenerationConfig = settings, seed: int | None = None) -> list[str]:
        ids, mask = pad_left([encoded[i] for i in rows], tokenizer.pad_token_id, width)
        seed = deferred_syncs.batch_seed() if seed is None else seed
        out = attempt(ids, mask, settings, seed)
        if sampler is not None and sampler.missed_any():  # rare (sampling.TIE_MARGIN): the batch again, exactly
            log.info("fused sampling: a row of this batch needed transformers' warpers; decoding it again with them")
            stats["batches_decoded_again"] = stats.get("batches_decoded_again", 0) + 1
            sampler.defer_fallback = False
            try:
                out = attempt(ids, mask, settings, seed)
            finally:
                sampler.defer_fallback = True
        decoded = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        return [cut_at_stop(text, gen.stop_strings) for text in decoded]

    fixed = None
    if path.static_cache:  # one batch size for the job, so a static cache and a compiled step see one shape
        fixed = decode_path.fixed_batches(share, prompts_per_batch(model, gen, width, path.fused_sampling))
    if path.compile:  # compiled and captured on the batches' one shape, timed apart (gen/warmup_seconds)
        started = time.perf_counter()
        warm = dataclasses.replace(gen, max_new_tokens=min(WARMUP_NEW_TOKENS, gen.max_new_tokens))  # the cache's
        # its own seed: the warm-up takes no draw from the process's stream, so both paths' batches sample alike
        run(fixed[0][0], generation_config(warm, tokenizer, fused_sampling=path.fused_sampling, **extra), seed=0)
        stats["warmup_seconds"] += time.perf_counter() - started
    texts: list[str] = []
    bar = tqdm(total=len(share), desc=f"generate (beams {gen.beams})", unit="ex", disable=not progress or not is_main())
    start = 0
    while start < len(share):
        if fixed:
            rows, real = fixed.pop(0)
        else:
            rows = share[start : start + prompts_per_batch(model, gen, len(encoded[share[start]]), path.fused_sampling)]
            real = len(rows)
        start += real
        texts.extend(run(rows)[:real])
        bar.update(real)
    bar.close()
    return texts


def generation_config(gen: GenConfig, tokenizer, *, fused_sampling: bool = False, **extra) -> GenerationConfig:
    """The gen group's decoding as a GenerationConfig; the sampling keys only when sampling (transformers refuses
    them otherwise), and as no-ops where `fused_sampling` applies them instead (sampling_processors). Keys left
    unset here take the model's generation config, which load_model clears, so a model's own defaults (Gemma ships
    top_k=64, top_p=0.95; an export, its stop strings) never leak in."""
    sampling = {"top_p": gen.top_p, "top_k": gen.top_k, "temperature": gen.temperature} if gen.do_sample else {}
    if sampling and fused_sampling:
        sampling = {"top_p": 1.0, "top_k": 0, "temperature": 1.0}
    return GenerationConfig(
        num_beams=gen.beams,
        do_sample=gen.do_sample,
        max_new_tokens=gen.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **sampling,
        **extra,
    )


def sampling_processors(gen: GenConfig, fused_sampling: bool, defer_fallback: bool = False) -> LogitsProcessorList:
    """The fused sampling processor where it applies (generation_config then turns transformers' warpers off)."""
    if not fused_sampling:
        return LogitsProcessorList()
    keep = 2 if gen.beams > 1 else 1  # as generate sets min_tokens_to_keep: beam sampling keeps a non-EOS token
    return LogitsProcessorList([TopKTopPSampling(gen.temperature, gen.top_k, gen.top_p, keep, defer_fallback)])


_STOP_TABLES: dict[tuple, StopStringCriteria] = {}  # built once per process and tokenizer (stop_criterion)


def stop_criterion(tokenizer, stop_strings: Sequence[str]):
    """A factory of the stop-string criterion for a batch whose prompts are `width` columns wide, or None.

    transformers' StopStringCriteria is vectorised, but its tables need a tokenizer whose tokens it can map back
    to text (1 to 2 s to build for Gemma's 262k tokens on an H200's host, more than decoding 250 prompts takes on
    the fast path), so they are built once per process for a tokenizer loaded from a folder (the jobs of a sweep
    load theirs anew); where they cannot be (a tokenizer without a decoder), the new text of every row is decoded
    and searched each step instead."""
    if not stop_strings:
        return None
    key = None
    if tokenizer.name_or_path:  # a tokenizer made in memory has nothing to tell it from another: not kept
        key = (type(tokenizer).__name__, tokenizer.name_or_path, _vocabulary_sample(tokenizer), tuple(stop_strings))
        if key in _STOP_TABLES:
            return lambda width: _STOP_TABLES[key]
    try:
        fast = StopStringCriteria(tokenizer, list(stop_strings))
    except Exception as err:  # transformers raises a bare ValueError("substring not found") here
        log.info("stop strings checked on the decoded text (%s: %s)", type(err).__name__, err)
        return lambda width: DecodedStopCriteria(tokenizer, stop_strings, width)
    if key is not None:
        _STOP_TABLES[key] = fast
    return lambda width: fast


def _vocabulary_sample(tokenizer) -> tuple:
    """The vocabulary's size and every 997th token: tells apart two tokenizers of one folder or hub id (another
    revision, a folder rewritten), in microseconds, where the whole vocabulary would take a second to compare."""
    size = len(tokenizer)
    return (size, *tokenizer.convert_ids_to_tokens(list(range(0, size, 997))))


class DecodedStopCriteria(StoppingCriteria):
    """Stop a row once its decoded new text holds a stop string: any tokenizer, one decode per row and step."""

    def __init__(self, tokenizer, stop_strings: Sequence[str], prompt_width: int):
        self.tokenizer, self.stop_strings, self.prompt_width = tokenizer, list(stop_strings), prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        found = [any(stop in text for stop in self.stop_strings) for text in texts]
        return torch.tensor(found, dtype=torch.bool, device=input_ids.device)
