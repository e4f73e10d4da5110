"""The batched course perplexity equals a plain one-example-at-a-time computation, at any batch size."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adl_llm.config import DType, ModelConfig, Quant
from adl_llm.data import load_records
from adl_llm.encode import encode_examples
from adl_llm.evaluate import perplexities
from adl_llm.modeling import load_adapter, load_model
from adl_llm.prompts import build_prompts
from tests.conftest import TRAIN_FILE, compose_config


def reference_ppl(model, tokenizer, prompt: str, answer: str, max_length: int = 2048) -> float:
    """The course metric, written out plainly: one example, full logits, no batching."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = ([tokenizer.bos_token_id] + prompt_ids + answer_ids + [tokenizer.eos_token_id])[:max_length]
    mask = ([0] * (1 + len(prompt_ids)) + [1] * (len(answer_ids) + 1))[:max_length]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
    weights = torch.tensor(mask[1:], dtype=torch.float64)
    return math.exp(float((nll * weights).sum() / weights.sum()))


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    records = load_records(str(TRAIN_FILE), need_outputs=True)[:23]
    prompts = build_prompts([r.instruction for r in records], compose_config("prompt=zero_shot").prompt)
    answers = [r.output for r in records]
    return model, tokenizer, prompts, answers


@pytest.mark.parametrize("max_length", [2048, 115])
def test_batched_equals_plain_loop_at_every_batch_size(setup, max_length):
    model, tokenizer, prompts, answers = setup
    examples = encode_examples(tokenizer, prompts, answers, max_length)
    if max_length == 115:  # some answers lose their tail, two lose all of it (NaN in both computations)
        assert sum(ex.truncated for ex in examples) > 2 and sum(not ex.n_scored for ex in examples) == 2
    expected = [reference_ppl(model, tokenizer, p, a, max_length) for p, a in zip(prompts, answers)]
    # (7, 64): every batch padded to a multiple of 64 columns, as on a GPU
    for batch_size, multiple in ((1, 1), (4, 1), (7, 1), (23, 1), (7, 64)):
        got = perplexities(
            model,
            examples,
            batch_size=batch_size,
            pad_id=tokenizer.pad_token_id,
            pad_to_multiple=multiple,
            progress=False,
        )
        for value, ref in zip(got, expected):
            assert (math.isnan(value) and math.isnan(ref)) or abs(value - ref) / ref < 1e-5, (
                batch_size,
                value,
                ref,
            )


def test_example_with_no_answer_left_is_nan_not_dropped(setup):
    model, tokenizer, prompts, answers = setup
    examples = encode_examples(tokenizer, prompts[:3], answers[:3], max_length=8)
    got = perplexities(model, examples, batch_size=2, pad_id=tokenizer.pad_token_id, progress=False)
    assert len(got) == 3 and all(math.isnan(v) for v in got)


def test_nf4_model_loads_on_cpu_and_scores(tiny_model_dir, setup):
    _, tokenizer, prompts, answers = setup
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir), quant=Quant.nf4), torch.device("cpu"))
    linear4bit = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(linear4bit) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    examples = encode_examples(tokenizer, prompts[:6], answers[:6], 2048)
    got = perplexities(model, examples, batch_size=3, pad_id=tokenizer.pad_token_id, progress=False)
    vocab = model.config.vocab_size
    assert all(1 < v < 10 * vocab for v in got)  # a random model: near the vocabulary size, finite


def test_saved_adapter_reproduces_the_in_memory_one(tiny_model_dir, setup, tmp_path):
    from peft import LoraConfig, get_peft_model

    _, tokenizer, prompts, answers = setup
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), quant=Quant.none, dtype=DType.float32)
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(load_model(cfg, torch.device("cpu")), lora).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    examples = encode_examples(tokenizer, prompts[:5], answers[:5], 2048)
    kwargs = dict(batch_size=2, pad_id=tokenizer.pad_token_id, progress=False)
    in_memory = perplexities(peft_model, examples, **kwargs)
    base = perplexities(load_model(cfg, torch.device("cpu")), examples, **kwargs)
    reloaded = perplexities(
        load_adapter(load_model(cfg, torch.device("cpu")), str(tmp_path / "adapter")), examples, **kwargs
    )
    assert in_memory == pytest.approx(reloaded, rel=1e-6)
    assert in_memory != pytest.approx(base, rel=1e-3)  # the adapter really changes the model


@pytest.mark.parametrize("window", [None, 40])
def test_a_shared_prompt_prefix_is_run_once_and_changes_no_value(setup, tiny_model_dir, monkeypatch, window):
    """3-shot prompts share their system text and examples: computed once, the values equal full passes'. A model
    whose sliding window is shorter than an example gets full passes for those examples."""
    from adl_llm import evaluate

    model, tokenizer, _, answers = setup
    records = load_records(str(TRAIN_FILE), need_outputs=True)
    shots = records[-3:]
    prompts = build_prompts([r.instruction for r in records[:23]], compose_config("prompt=few_shot").prompt, shots)
    examples = encode_examples(tokenizer, prompts, answers, 2048)
    monkeypatch.setattr(model.config, "sliding_window", window, raising=False)
    used = []
    real = evaluate.answer_nll
    monkeypatch.setattr(evaluate, "answer_nll", lambda m, b, prefix=None: used.append(prefix) or real(m, b, prefix))
    kwargs = dict(batch_size=5, pad_id=tokenizer.pad_token_id, progress=False)
    shared = perplexities(model, examples, **kwargs)
    prefixes = [p for p in used if p is not None]
    if window is None:
        assert len(prefixes) == len(used) and prefixes[0].length > 200  # system text and three worked examples
    else:
        assert not prefixes  # every example is longer than the window
    whole = perplexities(model, examples, share_prefix=False, **kwargs)
    assert shared == pytest.approx(whole, rel=1e-5)
    expected = [reference_ppl(model, tokenizer, p, a) for p, a in zip(prompts[:4], answers[:4])]
    assert shared[:4] == pytest.approx(expected, rel=1e-5)
