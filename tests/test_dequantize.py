"""Training over a dequantised copy of the NF4 base gives the numbers of bitsandbytes' own path."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoTokenizer

from adl_llm.config import DType, ModelConfig, Quant
from adl_llm.data import load_records
from adl_llm.encode import encode_examples
from adl_llm.loss import accumulate_gradients
from adl_llm.modeling import add_lora, attention_kernels, load_model
from adl_llm.nf4 import dequantized_base, dequantized_bytes, is_dequantized, nf4_layers
from adl_llm.prompts import build_prompts
from tests.conftest import TRAIN_FILE, compose_config


def _nf4_model_and_examples(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = load_records(str(TRAIN_FILE), need_outputs=True, limit=6)
    prompts = build_prompts([r.instruction for r in records], compose_config().prompt)
    examples = encode_examples(tokenizer, prompts, [r.output for r in records], 2048)
    # bf16 compute, as on a GPU, whatever this CPU computes natively: the copy sizes below are in bf16
    nf4 = ModelConfig(name_or_path=str(tiny_model_dir), quant=Quant.nf4, dtype=DType.bfloat16)
    model = load_model(nf4, torch.device("cpu"))
    torch.manual_seed(0)
    model = add_lora(model, compose_config("lora.lora_dropout=0.0").lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave A without a gradient
            param.data.normal_(std=0.1)
    return model.train(), examples


def _loss_and_grads(model, examples):
    n_scored = sum(ex.n_scored for ex in examples)
    loss, _ = accumulate_gradients(model, [examples], n_scored, pad_id=0, device=torch.device("cpu"))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss, grads


def test_same_loss_and_lora_gradients_as_the_nf4_path(tiny_model_dir, monkeypatch):
    import bitsandbytes

    model, examples = _nf4_model_and_examples(tiny_model_dir)
    loss, grads = _loss_and_grads(model, examples)
    with dequantized_base(model, enabled=True, memory_limit=2**30) as used, monkeypatch.context() as patch:
        patch.setattr(bitsandbytes, "matmul_4bit", _not_called)  # proof that the copy, not NF4, is multiplied
        assert used and all(is_dequantized(layer) for layer in nf4_layers(model))
        cached_loss, cached_grads = _loss_and_grads(model, examples)
    assert not any(is_dequantized(layer) for layer in nf4_layers(model))  # bitsandbytes' forward again
    assert len(grads) == 8 and cached_loss == loss
    for name, grad in grads.items():  # the same dequantised values and matmuls: the same numbers
        assert torch.equal(cached_grads[name], grad), name
    assert _loss_and_grads(model, examples)[0] == loss


def _not_called(*args, **kwargs):
    raise AssertionError("the NF4 matmul ran inside dequantized_base")


def test_the_copy_is_made_only_where_it_fits_a_quarter_of_the_budget(tiny_model_dir):
    model, _ = _nf4_model_and_examples(tiny_model_dir)
    size = dequantized_bytes(model, torch.bfloat16)
    assert size == 2 * sum(layer.in_features * layer.out_features for layer in nf4_layers(model))
    fits, crowded = 4.01 * size, 3.99 * size
    with dequantized_base(model, enabled=None, memory_limit=fits) as used:
        assert used
    with dequantized_base(model, enabled=None, memory_limit=crowded) as used:
        assert not used and not any(is_dequantized(layer) for layer in nf4_layers(model))
    with dequantized_base(model, enabled=False, memory_limit=100 * 2**30) as used:
        assert not used


def test_attention_kernels_leave_cudnn_out_unless_asked_and_restore_the_setting():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with attention_kernels(cudnn=False):
        assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    with attention_kernels(cudnn=True):
        assert torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_an_error_inside_restores_every_layer(tiny_model_dir):
    model, _ = _nf4_model_and_examples(tiny_model_dir)
    with pytest.raises(RuntimeError, match="inside"), dequantized_base(model, enabled=True, memory_limit=2**30):
        assert all(is_dequantized(layer) for layer in nf4_layers(model))
        raise RuntimeError("inside")
    assert not any(is_dequantized(layer) for layer in nf4_layers(model))


def test_a_base_dequantised_already_is_not_dequantised_again(tiny_model_dir):
    model, _ = _nf4_model_and_examples(tiny_model_dir)
    with dequantized_base(model, enabled=True, memory_limit=2**30) as outer:
        with dequantized_base(model, enabled=True, memory_limit=2**30) as inner:
            assert outer and not inner
        assert all(is_dequantized(layer) for layer in nf4_layers(model))  # the outer copy still in place
    assert not any(is_dequantized(layer) for layer in nf4_layers(model))


def test_a_base_whose_forwards_hooks_replaced_is_left_alone(tiny_model_dir):
    model, _ = _nf4_model_and_examples(tiny_model_dir)
    hooked = nf4_layers(model)[0]
    hooked.forward = wrapper = functools.partial(type(hooked).forward, hooked)  # as accelerate's hooks do
    with dequantized_base(model, enabled=True, memory_limit=2**30) as used:
        assert not used and vars(hooked)["forward"] is wrapper
    assert vars(hooked)["forward"] is wrapper


@pytest.mark.parametrize("dtype", [DType.float32, DType.bfloat16])
def test_loading_keeps_bitsandbytes_repacking_cpu_kernel_out(tiny_model_dir, monkeypatch, dtype):
    """On a CPU with AVX512-BF16, bitsandbytes' inference kernel computes in bfloat16 only and repacks the weights
    in a way undone only approximately (nf4.no_cpu_repacking): loading turns it off, whatever the compute dtype.
    Here every CPU claims the kernel, as such a CPU does."""
    from bitsandbytes.nn import Linear4bit

    real_init = Linear4bit.__init__

    def claiming(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.support_avx512bf16_for_cpu = True

    monkeypatch.setattr(Linear4bit, "__init__", claiming)
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir), quant=Quant.nf4, dtype=dtype))
    assert nf4_layers(model) and not any(layer.support_avx512bf16_for_cpu for layer in nf4_layers(model))


def test_float32_nf4_layers_score_in_float32_on_this_cpu(tiny_model_dir):
    """Whatever this CPU's kernels, an eval call of a float32 NF4 layer gives the float32 product of its
    dequantised weight, not a bfloat16 one (the values bfloat16 would round to 8 bits)."""
    from bitsandbytes.functional import dequantize_4bit

    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir), quant=Quant.nf4, dtype=DType.float32))
    layer = nf4_layers(model)[0]
    x = torch.randn(4, layer.in_features)
    with torch.no_grad():
        out = layer(x)
        expected = x @ dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.float32).T
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
