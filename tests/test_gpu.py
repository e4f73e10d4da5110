"""On a GPU, with the embedded model: what the CPU tests cannot show (bench/gpu_session.sh gpu_tests runs these)."""

from __future__ import annotations

import pytest
import torch
from transformers import set_seed

from adl_llm.batching import collate
from adl_llm.config import ModelConfig
from adl_llm.data import load_records
from adl_llm.encode import encode_examples
from adl_llm.loss import answer_nll
from adl_llm.memory import memory_limit
from adl_llm.modeling import add_lora, load_model, load_tokenizer, model_source
from adl_llm.prompts import build_prompts
from adl_llm.train import train
from tests.conftest import compose_config

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def embedded():
    cfg = ModelConfig()  # the embedded Gemma-3-270M, NF4, bf16 compute
    source = model_source(cfg)
    tokenizer = load_tokenizer(cfg, source)
    records = load_records(compose_config().data.train_file, need_outputs=True, limit=64)
    prompts = build_prompts([r.instruction for r in records], compose_config().prompt)
    examples = encode_examples(tokenizer, prompts, [r.output for r in records], 2048)
    return source, tokenizer, examples


def test_bf16_answer_nll_agrees_with_the_models_own_loss(embedded):
    source, tokenizer, examples = embedded
    model = load_model(ModelConfig(name_or_path=source))
    batch = collate(examples[:16], tokenizer.pad_token_id, "cuda")
    with torch.no_grad():
        ours = answer_nll(model, batch).nll.mean()
        theirs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    assert float(ours) == pytest.approx(float(theirs), rel=5e-3)


def test_packed_rows_on_the_card_score_what_padded_rows_score(embedded):
    """The embedded model in NF4 with bf16 compute, on the packed rows a GPU run cuts (several a micro-batch, by its
    break-even width): the model passes the check, and every example's answer NLL is its padded one, up to bf16
    rounding."""
    from adl_llm.packing import collate_packed, keeps_examples_apart, packed_rows, row_layout

    source, tokenizer, examples = embedded
    model = load_model(ModelConfig(name_or_path=source))
    assert keeps_examples_apart(model, examples, torch.device("cuda")) is None
    rows = row_layout(model)
    assert len(packed_rows(examples[:16], 64, rows)) > 1
    with torch.no_grad():
        padded = answer_nll(model, collate(examples[:16], tokenizer.pad_token_id, "cuda", multiple=64))
        packed = answer_nll(
            model, collate_packed(examples[:16], tokenizer.pad_token_id, "cuda", multiple=64, rows=rows)
        )
    assert float(packed.nll.sum()) == pytest.approx(float(padded.nll.sum()), rel=5e-3)
    assert len(packed.nll) == len(padded.nll)


@pytest.mark.parametrize("budget_gb", [3.0, 6.0])
def test_the_memory_plan_keeps_training_within_its_budget(embedded, tmp_path, budget_gb):
    source, tokenizer, examples = embedded
    cfg = compose_config(
        f"model.name_or_path={source}",
        f"train.memory_budget_gb={budget_gb}",
        "train.max_steps=4",
        "train.save_every=0",
        output_dir=tmp_path,
    )
    set_seed(0)
    model = add_lora(load_model(cfg.model), cfg.lora)
    torch.cuda.reset_peak_memory_stats()
    state = train(model, examples, cfg, tmp_path, tokenizer.pad_token_id)
    assert state.global_step == 4
    assert torch.cuda.max_memory_allocated() <= memory_limit(budget_gb, torch.device("cuda"))


def _train_losses(source, tokenizer, examples, tmp_path, *overrides: str) -> list[float]:
    cfg = compose_config(
        f"model.name_or_path={source}", "train.max_steps=8", "train.save_every=0", *overrides, output_dir=tmp_path
    )
    set_seed(0)
    model = add_lora(load_model(cfg.model), cfg.lora)
    return train(model, examples, cfg, tmp_path, tokenizer.pad_token_id).losses


def test_liger_kernels_train_as_the_plain_path_does(embedded, tmp_path):
    pytest.importorskip("liger_kernel")
    source, tokenizer, examples = embedded
    fused = _train_losses(source, tokenizer, examples, tmp_path / "liger", "model.liger=true")
    plain = _train_losses(source, tokenizer, examples, tmp_path / "plain", "model.liger=false")
    assert sum(abs(a - b) for a, b in zip(fused, plain)) / len(plain) <= 0.01
    with torch.no_grad():  # and the course metric's NLL of a batch
        batch = collate(examples[:16], tokenizer.pad_token_id, "cuda")
        liger = answer_nll(load_model(ModelConfig(name_or_path=source, liger=True)), batch).nll.mean()
        plain_model = load_model(ModelConfig(name_or_path=source, liger=False))
        own = answer_nll(plain_model, batch).nll.mean()
    assert float(liger) == pytest.approx(float(own), rel=5e-3)
    # Built after a Liger model in the same process, the plain one holds none of Liger's classes.
    assert not [m for m in plain_model.modules() if type(m).__module__.startswith("liger_kernel")]


def test_the_default_decoding_path_dequantises_and_decodes_as_the_plain_path(embedded):
    """A generate job's default path on a GPU: the NF4 weights dequantised once; the same text as bitsandbytes' own
    path for nearly every prompt (its fused 4-bit kernel rounds differently, which may flip a near tie). The model is
    loaded as a generate job loads it: without Liger's kernels (tasks.model_settings)."""
    from adl_llm.decoding import encode_prompts, generate_from_ids
    from adl_llm.nf4 import is_dequantized, nf4_layers

    source, tokenizer, _ = embedded
    model = load_model(ModelConfig(name_or_path=source, liger=False))
    records = load_records(compose_config().data.eval_file, need_outputs=True, limit=24)
    encoded = encode_prompts(tokenizer, build_prompts([r.instruction for r in records], compose_config().prompt))
    for gen_option in ("greedy", "beam3"):
        gen = compose_config(f"gen={gen_option}", "gen.max_new_tokens=32", "gen.batch_size=8").gen
        plain = generate_from_ids(model, tokenizer, encoded, gen, progress=False)
        stats: dict = {}
        fast = generate_from_ids(model, tokenizer, encoded, gen, progress=False, fast=True, stats=stats)
        assert stats["path"] == "dequantize"
        assert sum(a == b for a, b in zip(plain, fast)) >= 0.8 * len(encoded)
    assert not any(is_dequantized(layer) for layer in nf4_layers(model))


def test_the_compiled_decoding_path_decodes_as_the_plain_path(embedded):
    """gen.compile: the decode step in CUDA graphs over a static cache, greedy and beam search, no fallback taken."""
    from adl_llm.decoding import encode_prompts, generate_from_ids

    source, tokenizer, _ = embedded
    model = load_model(ModelConfig(name_or_path=source, liger=False))
    records = load_records(compose_config().data.eval_file, need_outputs=True, limit=24)
    encoded = encode_prompts(tokenizer, build_prompts([r.instruction for r in records], compose_config().prompt))
    for gen_option in ("greedy", "beam3"):
        gen = compose_config(f"gen={gen_option}", "gen.max_new_tokens=32", "gen.batch_size=8", "gen.compile=true").gen
        plain = generate_from_ids(model, tokenizer, encoded, gen, progress=False)
        stats: dict = {}
        fast = generate_from_ids(model, tokenizer, encoded, gen, progress=False, fast=True, stats=stats)
        assert stats["path"] == "dequantize+static_cache+compile" and stats["warmup_seconds"] > 0
        assert sum(a == b for a, b in zip(plain, fast)) >= 0.8 * len(encoded)


def test_liger_kernels_decode_a_batch_as_the_plain_path_does(embedded):
    """Liger's RoPE misread one-token steps of a batch (kernels.py): with its guard, a Liger model's greedy answers are
    the plain kernels' answers, not repeated characters after the first token."""
    pytest.importorskip("liger_kernel")
    from adl_llm.decoding import encode_prompts, generate_from_ids

    source, tokenizer, _ = embedded
    records = load_records(compose_config().data.eval_file, need_outputs=True, limit=24)
    encoded = encode_prompts(tokenizer, build_prompts([r.instruction for r in records], compose_config().prompt))
    gen = compose_config("gen=greedy", "gen.max_new_tokens=32", "gen.batch_size=8").gen
    fused = generate_from_ids(load_model(ModelConfig(name_or_path=source, liger=True)), tokenizer, encoded, gen)
    plain = generate_from_ids(load_model(ModelConfig(name_or_path=source, liger=False)), tokenizer, encoded, gen)
    assert sum(a == b for a, b in zip(fused, plain)) >= 0.8 * len(encoded)


def _nf4_shapes(model) -> dict:
    """One NF4 layer for each distinct weight shape of `model`."""
    from adl_llm.nf4 import nf4_layers

    return {tuple(layer.weight.quant_state.shape): layer for layer in nf4_layers(model)}


def test_bitsandbytes_fused_4bit_gemm_agrees_with_dequantising_for_every_row_count(embedded):
    """bitsandbytes 0.50 multiplies by an NF4 weight with its own fused kernel for 1 to 1536 rows on a CUDA card (a
    decode step's rows: prompts x beams) and by dequantise-then-matmul above. The plain decoding path at beams 5 wrote
    run-on Latin-letter answers on an H200 (docs/BENCHMARKS.md): this says whether the kernel is the cause."""
    from bitsandbytes.functional import dequantize_4bit

    source, _, _ = embedded
    model = load_model(ModelConfig(name_or_path=source, liger=False))
    torch.manual_seed(0)
    wrong = []
    for shape, layer in _nf4_shapes(model).items():
        state = layer.weight.quant_state
        weight = dequantize_4bit(layer.weight.data, state).to(torch.bfloat16)
        for rows in [*range(1, 65), *range(65, 1537, 37), 1536]:
            x = torch.randn(rows, shape[1], device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                fused = layer(x)
            expected = torch.nn.functional.linear(x.float(), weight.float())
            error = (fused.float() - expected).abs().max() / expected.abs().max()
            if not error < 0.02:  # bf16 rounding is about 0.4%; a wrong kernel is off by its whole size
                wrong.append(f"{shape} at {rows} rows: {float(error):.3f}")
    assert not wrong, "; ".join(wrong[:10])


def test_nf4_weights_dequantised_in_the_graph_are_bitsandbytes_own_on_cuda(embedded):
    """adl_llm/nf4_graph.py's torch operations against bitsandbytes' CUDA kernel, eager and compiled."""
    from bitsandbytes.functional import dequantize_4bit

    from adl_llm.nf4_graph import nf4_weight

    source, _, _ = embedded
    model = load_model(ModelConfig(name_or_path=source, liger=False))
    compiled = torch.compile(nf4_weight, dynamic=False)
    for shape, layer in _nf4_shapes(model).items():
        state = layer.weight.quant_state
        args = (
            layer.weight.data,
            state.absmax,
            state.code,
            state.state2.absmax,
            state.state2.code,
            state.offset,
            state.blocksize,
            state.state2.blocksize,
            shape,
            torch.bfloat16,
        )
        expected = dequantize_4bit(layer.weight.data, state).to(torch.bfloat16)
        assert torch.equal(nf4_weight(*args), expected), shape
        # inductor may fuse the nested scale's multiply-add into one rounding: within a bf16 step, not bit for bit
        assert torch.allclose(compiled(*args), expected, rtol=8e-3, atol=0), shape
