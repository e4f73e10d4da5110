"""The chunked answer-token NLL equals cross-entropy over full logits, in value and in gradient (fp64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from adl_llm import batching, loss
from adl_llm.batching import collate
from adl_llm.config import LoraConfig
from adl_llm.data import load_records
from adl_llm.encode import IGNORE, encode_examples
from adl_llm.loss import answer_nll
from adl_llm.modeling import add_lora
from adl_llm.prompts import build_prompts
from tests.conftest import TRAIN_FILE, compose_config


def full_logits_nll(model, batch) -> torch.Tensor:
    """Summed answer-token NLL the plain way: every position's logits, shifted by one."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )


@pytest.fixture()
def lora_batch(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64), LoraConfig())
    for name, param in model.named_parameters():  # LoRA B starts at zero; make the adapter matter
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    model.eval()  # no dropout, so both computations see the same function
    records = load_records(str(TRAIN_FILE), need_outputs=True)[:6]
    prompts = build_prompts([r.instruction for r in records], compose_config().prompt)
    examples = encode_examples(tokenizer, prompts, [r.output for r in records], 2048)
    return model, collate(examples, tokenizer.pad_token_id)


def lora_grads(model) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("chunk_elements", [loss.LOGIT_CHUNK_ELEMENTS, 3 * 101])  # one chunk; chunks of 3 rows
def test_value_and_lora_gradient_equal_full_logits(lora_batch, monkeypatch, chunk_elements):
    model, batch = lora_batch
    monkeypatch.setattr(loss, "LOGIT_CHUNK_ELEMENTS", chunk_elements)
    expected = full_logits_nll(model, batch)
    expected.backward()
    expected_grads = lora_grads(model)
    got = answer_nll(model, batch)
    got.nll.sum().backward()
    assert len(got.nll) == int((batch.labels[:, 1:] != IGNORE).sum())
    torch.testing.assert_close(got.nll.sum(), expected.detach(), rtol=1e-12, atol=0)
    for got_grad, want in zip(lora_grads(model), expected_grads):
        torch.testing.assert_close(got_grad, want, rtol=1e-9, atol=1e-12)


def test_per_row_sums_and_counts(lora_batch):
    model, batch = lora_batch
    with torch.no_grad():
        sums, counts = answer_nll(model, batch).per_row(len(batch.input_ids))
        for row in range(len(batch.input_ids)):
            one = collate_row(batch, row)
            torch.testing.assert_close(sums[row], full_logits_nll(model, one), rtol=1e-12, atol=0)
            assert counts[row] == int((one.labels[:, 1:] != IGNORE).sum())


def collate_row(batch, row: int) -> batching.Batch:
    width = int(batch.attention_mask[row].sum())
    return batching.Batch(*(t[row : row + 1, :width] for t in (batch.input_ids, batch.attention_mask, batch.labels)))


def test_soft_capped_gradient_matches_autograd(monkeypatch):
    """Gemma 2's final soft-capping, through the hand-written gradient, against autograd on full logits."""
    monkeypatch.setattr(loss, "LOGIT_CHUNK_ELEMENTS", 4 * 50)  # chunks of 4 positions over 11
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(50, 8, generator=generator, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    targets = torch.randint(0, 50, (11,), generator=generator)
    upstream = torch.rand(11, generator=generator, dtype=torch.float64)
    logits = 3.0 * torch.tanh(F.linear(hidden, weight, bias) / 3.0)
    expected = F.cross_entropy(logits, targets, reduction="none")
    (expected * upstream).sum().backward()
    want = hidden.grad.clone()
    hidden.grad = None
    got = loss._ChunkedNLL.apply(hidden, weight, bias, targets, 3.0)
    (got * upstream).sum().backward()
    torch.testing.assert_close(got, expected.detach())
    torch.testing.assert_close(hidden.grad, want)


def test_trainable_head_goes_through_autograd(tiny_model_dir, lora_batch):
    """LoRA on lm_head: the hand-written gradient does not apply; the head's adapter must still learn."""
    _, batch = lora_batch
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    model = add_lora(base, LoraConfig(target_modules=["q_proj", "lm_head"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    model.eval()
    expected = full_logits_nll(model, batch)
    expected.backward()
    expected_grads = lora_grads(model)
    got = answer_nll(model, batch).nll.sum()
    got.backward()
    torch.testing.assert_close(got, expected.detach(), rtol=1e-12, atol=0)
    for got_grad, want in zip(lora_grads(model), expected_grads):
        torch.testing.assert_close(got_grad, want, rtol=1e-9, atol=1e-12)
