"""Stop and fallback tests read late (deferred_syncs.py) give the answers of tests read at every step. The deferral
pays on a GPU only, so here it is asked for (gen.defer_syncs); the answers do not depend on the device."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adl_llm import deferred_syncs, sampling
from adl_llm.config import GenConfig
from adl_llm.decoding import encode_prompts, generate_from_ids
from adl_llm.sampling import TopKTopPSampling

PROMPTS = ["USER: 子曰 ASSISTANT:", "USER: 短 ASSISTANT:", "USER: 這是一個很長很長的問題 ASSISTANT:"] * 2


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer, encode_prompts(tokenizer, PROMPTS)


def _answers(tiny, gen: GenConfig, deferred: bool, monkeypatch, stats: dict | None = None) -> list[str]:
    model, tokenizer, encoded = tiny
    torch.manual_seed(0)
    stats = {} if stats is None else stats
    gen = dataclasses.replace(gen, defer_syncs=deferred)
    answers = generate_from_ids(model, tokenizer, encoded, gen, progress=False, fast=True, stats=stats)
    assert ("deferred_syncs" in stats["path"]) == deferred
    return answers


def _stopping_apart(tiny, gen: GenConfig, monkeypatch) -> GenConfig:
    """`gen` with a character the model often says as its stop string, one that ends the answers at different
    steps: rows and beams finish apart, and searches end before their last token."""
    said = Counter("".join(_answers(tiny, gen, False, monkeypatch))).most_common(5)
    for character, _ in said:
        stopping = dataclasses.replace(gen, stop_strings=[character])
        if len({len(answer) for answer in _answers(tiny, stopping, False, monkeypatch)}) > 1:
            return stopping
    raise AssertionError(f"none of {said} ends the answers at different steps")


@pytest.mark.parametrize(("beams", "do_sample"), [(3, False), (3, True), (5, True), (1, True), (1, False)])
def test_late_stop_tests_give_the_same_answers(tiny, monkeypatch, beams, do_sample):
    gen = GenConfig(beams=beams, do_sample=do_sample, top_k=10, top_p=0.9, temperature=1.2, max_new_tokens=10,
                    stop_strings=[], batch_size=3)  # fmt: skip
    gen = _stopping_apart(tiny, gen, monkeypatch)
    assert _answers(tiny, gen, True, monkeypatch) == _answers(tiny, gen, False, monkeypatch)


def test_a_search_that_stops_early_leaves_the_next_batches_draws_alone(tiny, monkeypatch):
    """A late stop test runs one step more, which samples too: each batch draws from its own seed, so the batches
    after one that stopped early sample as without the late test (a batch a prompt, up to 30 tokens)."""
    gen = GenConfig(beams=3, do_sample=True, top_k=10, top_p=0.9, temperature=1.2, max_new_tokens=30,
                    stop_strings=[], batch_size=1)  # fmt: skip
    gen = _stopping_apart(tiny, gen, monkeypatch)
    assert _answers(tiny, gen, True, monkeypatch) == _answers(tiny, gen, False, monkeypatch)


def test_a_beam_stop_test_is_read_a_step_late_and_never_past_the_last_token():
    flags = iter([True, True, False, True])  # the search could stop after its third step
    late = deferred_syncs.DeferredBeamStop(lambda: torch.tensor(next(flags)), max_new_tokens=8)
    assert [late() for _ in range(4)] == [True, True, True, False]
    last = deferred_syncs.DeferredBeamStop(lambda: torch.tensor(True), max_new_tokens=3)
    assert [last() for _ in range(3)] == [True, True, False]  # the third token is the last: stop, flag or not


def test_transformers_deferred_stop_is_allowed_on_cuda_within_and_only_within(tiny):
    model, _, _ = tiny
    check = deferred_syncs._DEFERRED_STOP
    if check is None:
        pytest.skip("this transformers has no DeferredStopCheck")
    cuda = torch.device("cuda")
    assert not check.is_supported(cuda, None, False, False)
    with deferred_syncs.deferred(model, 8):
        assert check.is_supported(cuda, None, False, False)
        assert not check.is_supported(cuda, None, False, True)  # an assistant model: still refused
        assert model._beam_search_has_unfinished_sequences.__class__ is deferred_syncs.DeferredBeamStop
    assert not check.is_supported(cuda, None, False, False)
    assert "_beam_search_has_unfinished_sequences" not in vars(model)


def test_a_deferred_fallback_is_gathered_for_the_batch():
    fused = TopKTopPSampling(0.7, 4, 0.9, defer_fallback=True)
    flat = torch.zeros(2, 100)  # every score tied: the warpers are needed
    fused(None, torch.randn(2, 100))
    assert not fused.missed_any()
    fused(None, flat)
    fused(None, torch.randn(2, 100))
    assert fused.missed_any()  # still set by the earlier step


@pytest.mark.parametrize("beams", [1, 3])
def test_a_batch_that_needed_the_warpers_is_decoded_again_with_the_same_draws(tiny, monkeypatch, beams):
    """With a margin of one candidate every step needs the warpers: each batch is decoded twice, and the answers
    are those of testing at every step."""
    monkeypatch.setattr(sampling, "TIE_MARGIN", 1)
    gen = GenConfig(beams=beams, do_sample=True, top_k=10, top_p=0.9, temperature=1.2, max_new_tokens=10,
                    stop_strings=[], batch_size=3)  # fmt: skip
    stats: dict = {}
    again = _answers(tiny, gen, True, monkeypatch, stats)
    assert stats["batches_decoded_again"] == 2  # 6 prompts, 3 a batch
    assert again == _answers(tiny, gen, False, monkeypatch)
    monkeypatch.setattr(sampling, "TIE_MARGIN", 8)
    assert again == _answers(tiny, dataclasses.replace(gen, fused_sampling=False), False, monkeypatch)
