"""Garbage-collection pauses: the objects a loop starts with stay frozen for it, then go back to the collector."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from transformers import AutoTokenizer

from adl_llm import gc_pauses
from adl_llm.config import DType, ModelConfig
from adl_llm.data import load_records
from adl_llm.decoding import generate_texts
from adl_llm.encode import encode_examples
from adl_llm.modeling import add_lora, load_model
from adl_llm.prompts import build_prompts
from adl_llm.train import train
from tests.conftest import TRAIN_FILE, compose_config


class _Node:
    """An object in a reference cycle: only a collection frees it."""

    def __init__(self) -> None:
        self.me = self


def test_objects_alive_at_the_start_are_frozen_and_returned_at_the_end():
    assert gc.get_freeze_count() == 0
    old = _Node()
    with gc_pauses.frozen() as freeze:
        frozen_at_start = gc.get_freeze_count()
        assert frozen_at_start > 0
        young = _Node()  # allocated in the loop: collected as ever
        young_ref = weakref.ref(young)
        del young
        gc.collect()
        assert young_ref() is None
        old_ref = weakref.ref(old)
        del old
        gc.collect()
        assert old_ref() is not None  # frozen: no pause walks it, so it waits for the end
        compiled = [_Node() for _ in range(100)]
        freeze()
        assert gc.get_freeze_count() >= frozen_at_start + len(compiled)
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert old_ref() is None  # freed once the block gave it back


def test_the_outermost_block_unfreezes_also_after_an_error():
    with pytest.raises(RuntimeError), gc_pauses.frozen():
        with gc_pauses.frozen():
            pass
        assert gc.get_freeze_count() > 0  # the inner block's end leaves the outer one's objects frozen
        raise RuntimeError("a failed step")
    assert gc.get_freeze_count() == 0


@pytest.fixture(scope="module")
def tiny_lora(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir), dtype=DType.float32), torch.device("cpu"))
    return add_lora(model, compose_config().lora), tokenizer


def _watch_freezes(monkeypatch) -> list[str]:
    """Records each freeze: at the block's start, and each call of what the block yields."""
    seen: list[str] = []
    real = gc_pauses._freeze

    def spy() -> None:
        seen.append("freeze")
        real()

    monkeypatch.setattr(gc_pauses, "_freeze", spy)
    return seen


def test_training_freezes_at_its_start_and_after_its_first_step(tiny_lora, tmp_path, monkeypatch):
    model, tokenizer = tiny_lora
    records = load_records(str(TRAIN_FILE), need_outputs=True, limit=8)
    prompts = build_prompts([r.instruction for r in records], compose_config().prompt)
    examples = encode_examples(tokenizer, prompts, [r.output for r in records], 2048)
    seen = _watch_freezes(monkeypatch)
    freeze_counts = []
    monkeypatch.setattr(
        torch.optim.AdamW, "step", lambda self, *a, **k: freeze_counts.append(gc.get_freeze_count()), raising=True
    )
    state = train(model, examples, compose_config("train.batch_size=2", output_dir=tmp_path), tmp_path, pad_id=0)
    assert state.global_step == 4
    assert seen == ["freeze", "freeze"]  # not again at every step: one freeze of what the first step built
    assert all(count > 0 for count in freeze_counts)  # every step ran frozen
    assert gc.get_freeze_count() == 0


def test_decoding_runs_its_batches_frozen(tiny_lora, monkeypatch):
    model, tokenizer = tiny_lora
    seen = _watch_freezes(monkeypatch)
    gen = compose_config("gen=greedy", "gen.max_new_tokens=4").gen
    assert len(generate_texts(model.eval(), tokenizer, ["一", "二三"], gen, progress=False)) == 2
    assert seen == ["freeze"]
    assert gc.get_freeze_count() == 0
