"""train.autocast: LoRA's products in the model's half type, its weights fp32; nothing where the model is fp32."""

from __future__ import annotations

import logging

import pytest
import torch

from adl_llm.config import DType, LoraConfig, ModelConfig, Quant
from adl_llm.encode import IGNORE, Encoded
from adl_llm.loss import accumulate_gradients
from adl_llm.modeling import add_lora, load_model
from adl_llm.precision import autocast_forward
from adl_llm.tasks import run_train
from tests.conftest import TWO_STEPS, compose_config, tiny_overrides

CPU = torch.device("cpu")


def _lora_dtypes(model) -> set[torch.dtype]:
    """The dtypes of the lora_A products in a call of the model and in a training pass (accumulate_gradients, which
    calls the decoder and projects the answer positions itself)."""
    seen = []
    hooks = [
        module.register_forward_hook(lambda _, __, out: seen.append(out.dtype))
        for name, module in model.named_modules()
        if name.endswith("lora_A.default")
    ]
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 9, 3]]))
    example = Encoded(input_ids=[1, 5, 9, 3, 7, 2], labels=[IGNORE, IGNORE, 9, 3, 7, 2], truncated=False)
    accumulate_gradients(model, [[example]], 4, 0, CPU)
    model.zero_grad(set_to_none=True)
    for hook in hooks:
        hook.remove()
    return set(seen)


def _model(tiny_model_dir, dtype: DType):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir), quant=Quant.none, dtype=dtype))
    return add_lora(model, LoraConfig())


def test_under_autocast_lora_computes_in_bf16_and_keeps_fp32_weights(tiny_model_dir):
    model = _model(tiny_model_dir, DType.bfloat16)
    assert _lora_dtypes(model) == {torch.float32}  # peft's own: the adapter in fp32
    with autocast_forward(model, True, torch.bfloat16, CPU) as used:
        assert used and _lora_dtypes(model) == {torch.bfloat16}
    assert "forward" not in vars(model) and "forward" not in vars(model.get_decoder())
    assert _lora_dtypes(model) == {torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_an_fp32_model_has_nothing_to_autocast(tiny_model_dir, caplog):
    model = _model(tiny_model_dir, DType.float32)
    with caplog.at_level(logging.INFO), autocast_forward(model, True, torch.float32, CPU) as used:
        assert not used and "forward" not in vars(model)
    assert "nothing to autocast" in caplog.text
    with autocast_forward(model, False, torch.bfloat16, CPU) as used:
        assert not used


def test_a_bf16_run_trains_under_autocast(tiny_model_dir, tmp_path, caplog):
    losses = {}
    for autocast in ("false", "true"):
        overrides = (*TWO_STEPS, "model.dtype=bfloat16", f"train.autocast={autocast}")
        cfg = compose_config(*tiny_overrides(tiny_model_dir, *overrides), output_dir=tmp_path / autocast)
        with caplog.at_level(logging.INFO):
            losses[autocast] = run_train(cfg)["train/losses"]
    assert "train.autocast: the forward under torch.autocast(torch.bfloat16)" in caplog.text
    assert losses["true"] == pytest.approx(losses["false"], abs=0.05)  # LoRA's products rounded to bf16
