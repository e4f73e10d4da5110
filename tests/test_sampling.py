"""The fused sampling processor keeps what transformers' three warpers keep, so generate draws the same tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adl_llm import decode_path
from adl_llm.config import GenConfig
from adl_llm.decoding import encode_prompts, generate_from_ids
from adl_llm.sampling import TopKTopPSampling

PROMPTS = ["USER: 子曰 ASSISTANT:", "USER: 短 ASSISTANT:", "USER: 這是一個很長很長的問題 ASSISTANT:"] * 2


def _scores(rows: int, vocab: int, *, seed: int, bf16: bool) -> torch.Tensor:
    """Log-probabilities as decoding sees them; rounded through bf16 (a bf16 model's logits) they hold many ties."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator) * 3
    if bf16:
        logits = logits.to(torch.bfloat16).float()
    return logits.log_softmax(-1)


@pytest.fixture
def stable_sort(monkeypatch):
    """TopPLogitsWarper's sort made stable, as a GPU's radix sort is: a CPU's orders tied scores as it happens to."""
    real = torch.sort
    monkeypatch.setattr(torch, "sort", lambda *args, **kwargs: real(*args, **{**kwargs, "stable": True}))


SETTINGS = [(10, 0.9, 1), (10, 0.9, 2), (3, 0.5, 1), (50, 0.99, 2), (10, 1.0, 1)]  # top_p 1: top-k alone


@pytest.mark.parametrize(("top_k", "top_p", "keep"), SETTINGS)
def test_it_keeps_the_tokens_and_scores_of_the_three_warpers(top_k, top_p, keep):
    fused = TopKTopPSampling(1.2, top_k, top_p, keep)
    for seed in range(5):
        scores = _scores(16, 3000, seed=seed, bf16=False)
        assert torch.equal(fused(None, scores), fused._warpers(None, scores))


@pytest.mark.parametrize(("top_k", "top_p", "keep"), SETTINGS)
def test_tied_scores_are_cut_as_a_stable_sort_cuts_them(stable_sort, top_k, top_p, keep):
    """Where top-p's cut falls between tied scores (common in a bf16 model's), the tokens kept are those a stable
    ascending sort of the whole row keeps: the later token ids."""
    fused = TopKTopPSampling(1.2, top_k, top_p, keep)
    for seed in range(5):
        scores = _scores(16, 3000, seed=seed, bf16=True)
        assert torch.equal(fused(None, scores), fused._warpers(None, scores))


def test_ties_past_the_margin_and_masked_rows_take_the_warpers(stable_sort):
    fused = TopKTopPSampling(0.7, 4, 0.9)
    flat = torch.zeros(2, 100)  # every score tied: top-k keeps all 100
    flat[1, :3] = 1.0
    masked = torch.full((1, 100), -float("inf"))  # fewer finite scores than k (suppressed tokens)
    masked[0, :2] = torch.tensor([0.5, 0.1])
    for scores in (flat, masked):
        out = fused(None, scores)
        assert torch.equal(out, fused._warpers(None, scores))
    assert torch.isfinite(fused(None, flat)[0]).sum() == 90  # top-k kept all 100 ties; top-p, 90 of 0.01 each


def test_the_fallback_warps_a_few_rows_at_a_time_as_transformers_warps_them_all(stable_sort):
    """Bounded memory (a batch is sized for the fused path), the same scores as the three warpers on every row."""
    from adl_llm.sampling import FALLBACK_ROWS

    fused = TopKTopPSampling(1.2, 10, 0.9, 1)
    scores = _scores(2 * FALLBACK_ROWS + 5, 500, seed=3, bf16=True)
    expected = scores
    for warper in fused.warpers:
        expected = warper(None, expected)
    assert torch.equal(fused._warpers(None, scores), expected)


def test_a_small_vocabulary_is_taken_whole(stable_sort):
    fused = TopKTopPSampling(1.0, 8, 0.8, 2)
    scores = _scores(4, 10, seed=0, bf16=True)
    assert torch.equal(fused(None, scores), fused._warpers(None, scores))


def test_top_k_must_be_set():
    with pytest.raises(ValueError, match="top_k >= 1"):
        TopKTopPSampling(1.0, 0, 0.9)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer, encode_prompts(tokenizer, PROMPTS)


@pytest.mark.parametrize("beams", [1, 3])
def test_generate_draws_the_same_tokens_with_it(tiny, beams):
    """Same seed, same answers: the fused processor in place of transformers' warpers changes nothing drawn."""
    model, tokenizer, encoded = tiny
    gen = GenConfig(beams=beams, do_sample=True, top_k=10, top_p=0.9, temperature=1.2, max_new_tokens=12,
                    stop_strings=[], batch_size=3)  # fmt: skip
    answers = {}
    for fused in (False, True):
        torch.manual_seed(0)
        stats: dict = {}
        setting = dataclasses.replace(gen, fused_sampling=fused)
        answers[fused] = generate_from_ids(model, tokenizer, encoded, setting, progress=False, fast=True, stats=stats)
        assert ("fused_sampling" in stats["path"]) == fused
    assert answers[True] == answers[False] and any(answers[True])


def test_it_applies_only_when_sampling_with_a_top_k(tiny):
    model, _, _ = tiny
    base = GenConfig(beams=1, do_sample=True, top_k=10, max_new_tokens=4)
    cases = [
        (base, True),
        (dataclasses.replace(base, fused_sampling=False), False),
        (dataclasses.replace(base, top_k=0), False),  # no top-k: nothing to cut the vocabulary to
        (dataclasses.replace(base, do_sample=False), False),
    ]
    for gen, expected in cases:
        with decode_path.fast_path(model, gen) as path:
            assert path.fused_sampling == expected
    assert not decode_path.PLAIN.fused_sampling


def test_fused_sampling_fits_more_prompts_a_batch_on_a_gpu(monkeypatch):
    """Without top-p's sorted copies of every row, sampling needs the vocabulary rows of search, so a batch holds
    more prompts within gen.memory_budget_gb (no GPU here: the device and its allocated memory are stubbed)."""
    from types import SimpleNamespace

    from transformers import Gemma3TextConfig

    from adl_llm.decoding import prompts_per_batch

    config = Gemma3TextConfig(num_hidden_layers=18, num_key_value_heads=1, head_dim=256, vocab_size=262_144)
    on_gpu = SimpleNamespace(device=torch.device("cuda", 0))
    model = SimpleNamespace(config=config, dtype=torch.bfloat16, parameters=lambda: iter([on_gpu]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2**29)  # the model's half GiB
    sampling = GenConfig(beams=5, do_sample=True, top_k=10, max_new_tokens=128)
    search = dataclasses.replace(sampling, do_sample=False)
    plain = prompts_per_batch(model, sampling, 192)
    fused = prompts_per_batch(model, sampling, 192, fused_sampling=True)
    assert plain < fused == prompts_per_batch(model, search, 192)
    assert prompts_per_batch(model, search, 192, fused_sampling=True) == fused  # search has no sampling to fuse
