"""Packed passes (train.packing): the row layout, how steps are cut and dealt, the loss and gradients of padded
passes, and the check that refuses a model whose attention would let packed examples see each other."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace
from unittest.mock import ANY

import pytest
import torch
from transformers import AutoTokenizer, masking_utils

from adl_llm import packing
from adl_llm.data import load_records
from adl_llm.encode import IGNORE, Encoded, encode_examples
from adl_llm.loss import accumulate_gradients
from adl_llm.micro_batches import rank_share, split_step
from adl_llm.modeling import add_lora, load_model
from adl_llm.prompts import build_prompts
from adl_llm.train import train
from tests.conftest import TRAIN_FILE, compose_config, tiny_gemma3

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def examples(tokenizer):
    records = load_records(str(TRAIN_FILE), need_outputs=True, limit=16)
    prompts = build_prompts([r.instruction for r in records], compose_config().prompt)
    return encode_examples(tokenizer, prompts, [r.output for r in records], 2048)


def _lora_llama(tiny_model_dir):
    from adl_llm.config import DType, ModelConfig

    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir), dtype=DType.float32), CPU)
    torch.manual_seed(3)
    model = add_lora(model, compose_config("lora.lora_dropout=0").lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero, which would leave A without a gradient
                param.normal_(std=0.1)
    return model.train()


def _gemma3(tokenizer):
    """Gemma 3's local layer with a window shorter than the examples: the window and the packing both apply."""
    model = tiny_gemma3(tokenizer, sliding_window=8).float().train()
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def _gradients(model, passes, examples, *, packed: bool, multiple: int = 1, break_even: float = math.inf):
    rows = packing.Rows(break_even) if packed else None
    model.zero_grad(set_to_none=True)
    n_scored = sum(ex.n_scored for ex in examples)
    loss, tokens = accumulate_gradients(model, passes, n_scored, 0, CPU, multiple, rows=rows)
    return loss, tokens, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_packed_row_numbers_each_example_from_zero_and_scores_what_the_padded_rows_score():
    a, b = Encoded([5, 6, 7], [IGNORE, 6, 7], False), Encoded([8, 9], [8, 9], False)  # b: its first label set
    batch = packing.collate_packed([a, b], pad_id=0, multiple=4)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]  # the padding is a sequence of its own
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]] and batch.n_tokens == 5
    # b's first token is not predicted from a's last: the same tokens scored as in b's own padded row
    assert batch.labels.tolist() == [[IGNORE, 6, 7, IGNORE, 9, IGNORE, IGNORE, IGNORE]]


def test_a_micro_batch_takes_the_rows_whose_width_and_attention_cost_least():
    def lengths(rows):
        return [[len(ex.input_ids) for ex in row] for row in rows]

    four = [Encoded([1] * 300, [1] * 300, False) for _ in range(4)]
    assert lengths(packing.packed_rows(four)) == [[300] * 4]  # no attention cost: one row, no padding
    assert (
        lengths(packing.packed_rows(four, rows=packing.Rows(300))) == [[300]] * 4
    )  # 2,400 against 3,600 in 2 and 6,000
    uneven = [Encoded([1] * n, [1] * n, False) for n in (500, 60, 200, 240, 100, 20)]
    assert lengths(packing.packed_rows(uneven)) == [[500, 240, 200, 100, 60, 20]]
    # rows of 1,120, 560 and 500 tokens: 3,211, 2,165 and 2,750 (3 rows: one as wide as the 500 alone)
    assert lengths(packing.packed_rows(uneven, rows=packing.Rows(600))) == [[500, 60], [240, 200, 100, 20]]
    wide = [Encoded([1] * 3000, [1] * 3000, False)] * 2  # one row of 6,000 is past ROW_TOKENS
    assert lengths(packing.packed_rows(wide)) == [[3000], [3000]]
    overlong = [Encoded([1] * n, [1] * n, False) for n in (5000, 300, 300, 300)]  # every count is past it
    assert lengths(packing.packed_rows(overlong)) == [[5000], [300, 300, 300]]  # still as narrow as can be
    # Rows padded to the widest may hold no more than the memory plan's budget (one row always fits)
    assert lengths(packing.packed_rows(uneven, 64, packing.Rows(600, budget=1151))) == [[500, 240, 200, 100, 60, 20]]
    assert lengths(packing.packed_rows(uneven, 64, packing.Rows(600, budget=1152))) == [[500, 60], [240, 200, 100, 20]]
    batch = packing.collate_packed(uneven, pad_id=0, multiple=64, rows=packing.Rows(600))
    assert batch.input_ids.shape == (2, 576) and batch.n_tokens == 1120  # both rows as wide as the wider, rounded
    assert batch.position_ids[0].tolist() == list(range(500)) + list(range(60)) + list(range(16))
    assert batch.position_ids[1, 235:245].tolist() == [235, 236, 237, 238, 239, 0, 1, 2, 3, 4]
    assert batch.attention_mask.sum(dim=1).tolist() == [560, 560]


def test_the_attention_break_even_follows_the_models_shape():
    from transformers import Gemma3TextConfig, LlamaConfig

    llama7b = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    gemma270m = Gemma3TextConfig(
        hidden_size=640, intermediate_size=2048, num_attention_heads=4, num_key_value_heads=1, head_dim=256
    )
    widths = [packing.attention_break_even(SimpleNamespace(config=config)) for config in (llama7b, gemma270m)]
    assert widths == [pytest.approx(2573, abs=1), pytest.approx(283, abs=1)]
    unknown = SimpleNamespace(get_text_config=lambda: SimpleNamespace(hidden_size=64))
    assert packing.attention_break_even(SimpleNamespace(config=unknown)) == math.inf  # one row a micro-batch
    shape = {"hidden_size": 4096, "num_attention_heads": 32, "intermediate_size": [11008, 11008]}  # one a layer
    per_layer = SimpleNamespace(get_text_config=lambda: SimpleNamespace(**shape))  # as Gemma 3n's: their mean
    assert packing.attention_break_even(SimpleNamespace(config=per_layer)) == pytest.approx(2573, abs=1)
    # flash attention keeps packed examples apart in one row only, and has no dense mask to pay for
    flash = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32)
    flash._attn_implementation = "flash_attention_2"
    assert packing.row_layout(SimpleNamespace(config=flash)).single
    assert not packing.row_layout(SimpleNamespace(config=llama7b)).single
    layout = packing.Rows(single=True)
    assert packing.packed_rows([Encoded([1] * 3000, [1] * 3000, False)] * 2, rows=layout) == [[ANY, ANY]]


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_packed_passes_give_the_loss_and_gradients_of_padded_ones(architecture, tiny_model_dir, tokenizer, examples):
    model = _lora_llama(tiny_model_dir) if architecture == "llama" else _gemma3(tokenizer)
    loss, tokens, grads = _gradients(model, [examples], examples, packed=False)
    assert grads and all(g.abs().max() > 0 for g in grads.values())
    rows = packing.pack_rows(examples, 700, multiple=16)
    assert len(rows) > 2 and sorted(id(ex) for row in rows for ex in row) == sorted(map(id, examples))
    for passes, multiple, break_even in ((rows, 16, math.inf), ([examples], 1, math.inf), ([examples], 16, 64)):
        if break_even < math.inf:  # several rows of one micro-batch, padded to one width
            assert len(packing.packed_rows(examples, multiple, packing.Rows(break_even))) > 2
        packed_loss, packed_tokens, packed_grads = _gradients(
            model, passes, examples, packed=True, multiple=multiple, break_even=break_even
        )
        assert packed_loss == pytest.approx(loss, rel=1e-5) and packed_tokens == tokens
        for name, grad in grads.items():  # float32 rounding is ~1e-6; one example seeing another: ~1e-1
            assert (grad - packed_grads[name]).norm() / grad.norm() < 1e-4, name


def test_a_model_that_would_let_packed_examples_attend_to_each_other_is_refused(
    tiny_model_dir, tokenizer, examples, monkeypatch, caplog
):
    assert packing.keeps_examples_apart(_gemma3(tokenizer), examples, CPU) is None  # its sliding window too
    model = _lora_llama(tiny_model_dir)
    assert packing.keeps_examples_apart(model, examples, CPU) is None
    assert model.training  # the probe runs in eval mode and gives the model back as it was
    reference, *_ = _gradients(model, [examples], examples, packed=False)
    # As an architecture that builds its mask from the attention mask alone: one causal mask over the whole row
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    leaked, *_ = _gradients(model, [examples], examples, packed=True)
    assert leaked != pytest.approx(reference, rel=1e-4)  # what packing without the check would silently train on
    refused = packing.keeps_examples_apart(model, examples, CPU)
    assert refused and "attend to each other" in refused
    with caplog.at_level(logging.INFO, logger="adl_llm.packing"):
        assert not packing.packs(True, model, examples, CPU)
    assert "packed passes: off" in caplog.text and "attend to each other" in caplog.text


def test_packing_is_off_on_a_cpu_unless_asked_and_refused_where_the_model_takes_no_positions(examples):
    class NoPositions(torch.nn.Module):
        training = True

        def get_decoder(self):
            return self

        def forward(self, input_ids, attention_mask=None, use_cache=False):  # no position_ids argument
            return SimpleNamespace(last_hidden_state=torch.ones(*input_ids.shape, 4))

    assert not packing.packing_requested(None, CPU) and packing.packing_requested(None, torch.device("cuda"))
    assert not packing.packs(None, NoPositions(), examples, CPU)  # no probe at all
    refused = packing.keeps_examples_apart(NoPositions(), examples, CPU)
    assert refused.startswith("the model does not take packed rows (TypeError")


def test_steps_are_cut_first_fit_within_the_token_budget():
    batch = [Encoded([1] * n, [1] * n, False) for n in (50, 400, 120, 380, 70, 30, 250, 5000)]
    tc = compose_config().train
    rows = split_step(batch, tc, 512, multiple=64, packed=True)
    lengths = [[len(ex.input_ids) for ex in row] for row in rows]
    assert lengths == [[5000], [400, 70, 30], [380, 120], [250, 50]]  # the overlong one alone
    assert all(sum(row) <= 512 for row in lengths[1:])
    assert split_step(batch, tc, 100_000, packed=True) == [sorted(batch, key=lambda ex: -len(ex.input_ids))]
    fixed = compose_config("train.micro_batch_size=3").train  # a fixed cut keeps its groups, each packed
    assert split_step(batch, fixed, 0, packed=True) == [batch[0:3], batch[3:6], batch[6:8]]


def test_packed_steps_are_dealt_to_the_ranks_by_tokens(monkeypatch):
    from adl_llm import micro_batches

    batch = [Encoded([1] * n, [1] * n, False) for n in (5, 40, 12, 38, 7, 3, 25, 41)]
    monkeypatch.setattr(micro_batches, "world_size", lambda: 2)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(micro_batches, "rank", lambda rank=rank: rank)
        shares.append(rank_share(batch, compose_config().train, packed=True))
    assert sorted(map(id, shares[0] + shares[1])) == sorted(map(id, batch))
    assert [len(ex.input_ids) for ex in shares[0]] == [41, 25, 12, 7]  # 85 tokens
    assert [len(ex.input_ids) for ex in shares[1]] == [40, 38, 5, 3]  # 86


def test_a_packed_run_trains_as_the_padded_run_does(tiny_model_dir, examples, tmp_path, caplog):
    runs = {}
    for packed in (False, True):
        model = _lora_llama(tiny_model_dir)
        cfg = compose_config(
            f"train.packing={str(packed).lower()}",
            "train.batch_size=8",
            "train.max_steps=3",
            "train.save_every=0",
            "lora.lora_dropout=0",
            "optim.lr=1e-2",
            output_dir=tmp_path / str(packed),
        )
        with caplog.at_level(logging.INFO, logger="adl_llm"):
            runs[packed] = train(model, examples, cfg, tmp_path / str(packed), pad_id=0)
    assert "packed passes: on" in caplog.text and "packed passes: off (train.packing=false" in caplog.text
    assert runs[True].losses == pytest.approx(runs[False].losses, rel=1e-5)
    assert sum(runs[True].step_tokens) == sum(runs[False].step_tokens)  # real tokens, not the rows' padding
