"""NF4 weights dequantised in torch operations (train.compile): bitsandbytes' values, its layer's outputs and
gradients, and the same training losses."""

from __future__ import annotations

import logging

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit

from adl_llm import nf4_graph
from adl_llm.config import DType, ModelConfig, Quant
from adl_llm.modeling import load_model
from adl_llm.nf4 import dequantized_base, is_dequantized, nf4_layers
from adl_llm.tasks import run_train
from tests.conftest import TWO_STEPS, compose_config, tiny_overrides


def _weight(state, packed, dtype):
    nested = state.nested
    return nf4_graph.nf4_weight(
        packed,
        state.absmax,
        state.code,
        state.state2.absmax if nested else None,
        state.state2.code if nested else None,
        state.offset if nested else 0.0,
        state.blocksize,
        state.state2.blocksize if nested else 0,
        tuple(state.shape),
        dtype,
    )


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_weight_is_bitsandbytes_own_bit_for_bit(nested, dtype):
    torch.manual_seed(0)
    weight = torch.randn(96, 320) * 0.05  # 30,720 values: absmax blocks beyond one nested block of 256
    packed, state = quantize_4bit(weight.to(dtype), quant_type="nf4", compress_statistics=nested)
    assert state.nested == nested
    assert torch.equal(_weight(state, packed, dtype), dequantize_4bit(packed, state))


@pytest.fixture
def nf4_model(tiny_model_dir):
    return load_model(ModelConfig(name_or_path=str(tiny_model_dir), quant=Quant.nf4, dtype=DType.float32))


def test_a_layer_gives_the_outputs_and_input_gradients_of_bitsandbytes(nf4_model):
    layer = nf4_layers(nf4_model)[0]
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    expected = layer(x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    changed = nf4_graph.to_graph([nf4_model])
    try:
        assert layer in changed and len(changed) == len(nf4_layers(nf4_model))
        out = torch.compile(layer, backend="eager")(x)  # traced: the torch operations run, not bitsandbytes
        (grad,) = torch.autograd.grad(out.square().sum(), x)
    finally:
        nf4_graph.restore(changed)
    assert torch.allclose(out, expected, atol=1e-6, rtol=1e-5)
    assert torch.allclose(grad, expected_grad, atol=1e-5, rtol=1e-5)
    assert type(layer).__name__ == "Linear4bit" and "nf4_absmax" not in layer._buffers  # bitsandbytes' layer again


def _kept_bytes(run, x) -> int:
    """Bytes the autograd graph of `run(x)` keeps for its backward pass."""
    kept = []

    def pack(tensor):
        kept.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run(x)
    return sum(kept)


def test_recomputed_weights_are_not_kept_for_the_backward_and_give_the_same_gradients(nf4_model):
    """Compiled with the partitioner inductor uses (min-cut): kept, the dequantised weight is saved for the input's
    gradient; recomputed, only the quantised weight and its scales are."""
    layer = nf4_layers(nf4_model)[0]
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    changed = nf4_graph.to_graph([nf4_model])
    weight_bytes = layer.in_features * layer.out_features * 4  # float32 compute
    try:
        compiled = torch.compile(layer, backend="aot_eager_decomp_partition")
        results = {}
        for recomputed in (False, True, False):  # and back: the setting is guarded, not baked into one graph
            nf4_graph.recompute_weights(recomputed)
            out = compiled(x)
            (grad,) = torch.autograd.grad(out.square().sum(), x)
            results.setdefault(recomputed, []).append((out, grad, _kept_bytes(compiled, x)))
        assert nf4_graph.recomputes_weights() is False
    finally:
        nf4_graph.restore(changed)
    assert not nf4_graph.recomputes_weights()  # restore() gives the default back
    (kept_out, kept_grad, kept_bytes), again = results[False]
    (out, grad, recomputed_bytes) = results[True][0]
    assert torch.equal(out, kept_out) and torch.allclose(grad, kept_grad, atol=1e-6, rtol=1e-5)
    assert kept_bytes >= weight_bytes  # the dequantised weight itself
    assert recomputed_bytes < weight_bytes / 4  # 4-bit codes and block scales: about an eighth of float32
    assert again[2] == kept_bytes


def test_an_eager_call_on_a_gpu_takes_bitsandbytes_own_kernel(nf4_model, monkeypatch):
    """Outside a graph on a GPU (a decoding job's prompt pass) the unfused torch operations would be slow and large;
    on a CPU they run (bitsandbytes' CPU kernel repacks the weight the graph's state describes), with its values."""
    layer = nf4_layers(nf4_model)[0]
    x = torch.randn(2, layer.in_features)
    expected = layer(x)
    changed = nf4_graph.to_graph([nf4_model])
    traced = []
    real_weight = nf4_graph.nf4_weight
    monkeypatch.setattr(nf4_graph, "nf4_weight", lambda *args: traced.append(1) or real_weight(*args))
    try:
        assert torch.allclose(layer(x), expected, atol=1e-6, rtol=1e-5) and traced  # a CPU: the torch operations
        traced.clear()
        monkeypatch.setattr(nf4_graph, "_eager_kernel", lambda x: not torch.compiler.is_compiling())  # as on a GPU
        assert torch.equal(layer(x), expected) and not traced
        torch.compile(layer, backend="eager")(x)
        assert traced
    finally:
        nf4_graph.restore(changed)


def test_dequantised_layers_are_left_as_they_are(nf4_model):
    with dequantized_base(nf4_model, enabled=True, memory_limit=1e12) as used:
        assert used
        assert nf4_graph.to_graph([nf4_model]) == []
        assert all(is_dequantized(layer) for layer in nf4_layers(nf4_model))


def test_layers_outside_the_packing_it_reads_stay_with_bitsandbytes():
    import bitsandbytes as bnb

    partial = bnb.nn.Linear4bit(10, 10, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    assert partial.weight.quant_state.shape.numel() % partial.weight.quant_state.blocksize  # a block left over
    assert not nf4_graph.supported(partial) and nf4_graph.to_graph([partial]) == []
    x = torch.randn(2, 10)
    assert partial(x).shape == (2, 10)  # bitsandbytes' own forward, which handles the last block


@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_compiled_training_of_an_nf4_model_gives_the_losses_of_bitsandbytes(
    tiny_model_dir, tmp_path, caplog, checkpointing
):
    """The NF4 base kept quantised (train.dequantize_base=false), without dropout, with and without gradient
    checkpointing (whose recompute runs the compiled layer again); about half a minute each on 2 cores."""
    losses, compiled_steps = {}, {}
    for compile_layers in ("false", "true"):
        overrides = (
            *TWO_STEPS,
            f"train.gradient_checkpointing={checkpointing}",
            "model.quant=nf4",
            "train.dequantize_base=false",
            f"train.compile={compile_layers}",
        )
        cfg = compose_config(*tiny_overrides(tiny_model_dir, *overrides), output_dir=tmp_path / compile_layers)
        with caplog.at_level(logging.INFO):
            metrics = run_train(cfg)
        losses[compile_layers] = metrics["train/losses"]
        compiled_steps[compile_layers] = metrics["train/compiled_steps"]
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-4)
    assert compiled_steps == {"false": 0, "true": 2}
    assert "NF4 weights dequantised in the graph" in caplog.text
