"""A golden label mask, the seed report's prompts, and truncation as the course metric does it."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from adl_llm.config import PromptConfig
from adl_llm.data import Record
from adl_llm.encode import IGNORE, encode_examples
from adl_llm.prompts import build_prompts
from tests.conftest import compose_config

SYSTEM = "你是人工智慧助理，以下是用戶和人工智能助理之間的對話。你要對用戶的問題提供有用、安全、詳細和禮貌的回答。"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_golden_label_mask(tokenizer):
    prompt_cfg = PromptConfig(system="你", query_template="USER:{instruction}A:")
    prompt = build_prompts(["天"], prompt_cfg)[0]
    assert prompt == "你USER:天A:"
    [example] = encode_examples(tokenizer, [prompt], ["地。"], max_length=2048)
    ids = tokenizer.convert_tokens_to_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert example.input_ids == [bos, *ids(list("你USER:天A:")), *ids(["地", "。"]), eos]
    assert example.labels == [IGNORE] * 10 + [*ids(["地", "。"]), eos]
    assert example.n_scored == 3 and not example.truncated


def test_truncation_cuts_ids_and_labels_together(tokenizer):
    [example] = encode_examples(tokenizer, ["你是"], ["人工智慧"], max_length=5)
    assert len(example.input_ids) == len(example.labels) == 5 and example.truncated
    assert example.labels[:3] == [IGNORE] * 3 and example.labels[3:] == tokenizer.convert_tokens_to_ids(["人", "工"])


def test_seed_prompts_are_exact():
    zero = compose_config("prompt=zero_shot").prompt
    assert build_prompts(["天"], zero) == [SYSTEM + "USER: 天 ASSISTANT:"]
    few = compose_config("prompt=few_shot").prompt
    shots = [Record(str(i), f"問{i}", f"答{i}") for i in range(1, 4)]
    expected = (
        SYSTEM
        + "以下是範例：\n"
        + "1. USER: 問1 ASSISTANT: 答1\n2. USER: 問2 ASSISTANT: 答2\n3. USER: 問3 ASSISTANT: 答3\n"
        + "請作答： USER: 天 ASSISTANT:"
    )
    assert build_prompts(["天"], few, shots) == [expected]
