"""model.liger: which kernel path a model gets, why, and that a plain model is never left with Liger's patches.

Liger's kernels are Triton kernels for CUDA, so here a stand-in `liger_kernel` package records what adl-llm asks
of it; tests/test_gpu.py runs the real one against the plain path."""

from __future__ import annotations

import dataclasses
import importlib.machinery
import logging
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException
from transformers.models.llama import modeling_llama

from adl_llm import kernels
from adl_llm.config import DType, ModelConfig, Quant
from adl_llm.errors import ModelError, one_line_error
from adl_llm.modeling import load_model
from tests.conftest import compose_config

PLAIN_NORM = modeling_llama.LlamaRMSNorm


def liger_rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """Stands in for Liger's RoPE: tells its results apart from transformers' own."""
    return q + 100, k + 100


def _on(device: str, model_type: str = "llama"):
    """A stand-in model whose parameters live on `device`."""
    param = SimpleNamespace(device=torch.device(device))
    return SimpleNamespace(parameters=lambda: iter([param]), config=SimpleNamespace(model_type=model_type))


@pytest.fixture
def fake_liger(monkeypatch):
    """A `liger_kernel` that knows llama and, like the real one, patches the modeling module's RoPE function."""
    calls = []

    def apply_to_instance(model, **kwargs):
        calls.append(kwargs)
        modeling_llama.apply_rotary_pos_emb = liger_rope
        modeling_llama.LlamaRMSNorm = type("LigerRMSNorm", (PLAIN_NORM,), {})  # what later models would be built of

    package = types.ModuleType("liger_kernel")
    package.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None, is_package=True)
    transformers_part = types.ModuleType("liger_kernel.transformers")
    transformers_part._apply_liger_kernel_to_instance = apply_to_instance
    monkey_patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": apply_to_instance}
    for name, module in [
        ("liger_kernel", package),
        ("liger_kernel.transformers", transformers_part),
        ("liger_kernel.transformers.monkey_patch", monkey_patch),
    ]:
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)
    monkeypatch.setattr(modeling_llama, "LlamaRMSNorm", PLAIN_NORM)
    monkeypatch.setattr(kernels, "_pristine", {})
    return calls


def test_on_a_cpu_the_plain_path_is_taken_and_said(tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="adl_llm.kernels"):
        load_model(ModelConfig(name_or_path=str(tiny_model_dir), quant=Quant.none, dtype=DType.float32))
    assert "kernels: transformers' own (the model is on cpu" in caplog.text


def test_required_where_they_cannot_run_is_a_one_line_error(tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), quant=Quant.none, dtype=DType.float32, liger=True)
    with pytest.raises(ModelError, match=r"^model.liger=true: the model is on cpu.*model.liger=null") as caught:
        load_model(cfg)
    assert "\n" not in str(caught.value)


def test_why_not_names_each_obstacle(monkeypatch, fake_liger):
    assert kernels.why_not(_on("cuda")) is None
    assert kernels.why_not(_on("cuda", "mamba")) == "Liger has no kernels for model type 'mamba'"
    assert "Triton kernels for CUDA" in kernels.why_not(_on("cpu"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", None)  # an import that fails
    assert kernels.why_not(_on("cuda")).startswith("liger-kernel does not load (ModuleNotFoundError")
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: None)
    assert kernels.why_not(_on("cuda")) == "liger-kernel is not installed (pip install 'adl-llm[liger]')"


def test_applied_without_the_fused_loss_and_undone_for_a_plain_model(tiny_model_dir, monkeypatch, fake_liger):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), quant=Quant.none, dtype=DType.float32)
    model = load_model(cfg)
    plain_rope = modeling_llama.apply_rotary_pos_emb
    monkeypatch.setattr(kernels, "why_not", lambda model: None)  # as on a GPU with liger-kernel

    assert kernels.apply_liger(model, None) is True
    assert fake_liger[-1]["rms_norm"] and fake_liger[-1]["rope"] and fake_liger[-1]["swiglu"]
    assert not fake_liger[-1]["fused_linear_cross_entropy"] and not fake_liger[-1]["cross_entropy"]
    assert modeling_llama.apply_rotary_pos_emb.__wrapped__ is liger_rope

    # A later job of the same process asks for the plain kernels: the module is as it was before Liger.
    assert kernels.apply_liger(model, False) is False
    assert modeling_llama.apply_rotary_pos_emb is plain_rope
    assert len(fake_liger) == 1

    # Another library patches it (TRL's use_liger_kernel): the bench's plain sides put it back.
    modeling_llama.apply_rotary_pos_emb = "TRL's liger rope"
    kernels.plain_kernels()
    assert modeling_llama.apply_rotary_pos_emb is plain_rope


def test_the_setting_is_checked_when_composed():
    assert compose_config().model.liger is None
    assert compose_config("model.liger=false").model.liger is False
    with pytest.raises((HydraException, OmegaConfBaseException)) as info:
        compose_config("model.liger=sometimes")
    assert one_line_error(info.value).startswith("model.liger")


def test_a_plain_model_after_a_liger_one_is_built_of_transformers_own_classes(tiny_model_dir, monkeypatch, fake_liger):
    monkeypatch.setattr(kernels, "why_not", lambda model: None)  # as on a GPU with liger-kernel
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), quant=Quant.none, dtype=DType.float32)
    load_model(cfg)
    assert modeling_llama.LlamaRMSNorm is not PLAIN_NORM  # Liger's class, for whatever is built next

    plain = load_model(dataclasses.replace(cfg, liger=False))
    assert type(plain.model.norm) is PLAIN_NORM and type(plain.model.layers[0].input_layernorm) is PLAIN_NORM


def test_a_liger_failing_part_way_is_one_line_and_the_next_model_is_plain(tiny_model_dir, monkeypatch, fake_liger):
    def fails_part_way(model, **kwargs):
        modeling_llama.apply_rotary_pos_emb = "liger rope"
        raise AssertionError("an architecture this Liger does not know")

    monkeypatch.setattr(sys.modules["liger_kernel.transformers"], "_apply_liger_kernel_to_instance", fails_part_way)
    monkeypatch.setattr(kernels, "why_not", lambda model: None)
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), quant=Quant.none, dtype=DType.float32)
    with pytest.raises(ModelError, match=r"^model.liger: Liger failed on this llama model .*set model.liger=false$"):
        load_model(cfg)
    assert modeling_llama.apply_rotary_pos_emb == "liger rope"  # left by the failed attempt
    load_model(dataclasses.replace(cfg, liger=False))
    assert modeling_llama.apply_rotary_pos_emb != "liger rope"


def test_one_token_steps_take_transformers_rope_and_longer_queries_liger_s(tiny_model_dir, monkeypatch, fake_liger):
    """Liger's RoPE kernel misreads a batch of one-token queries after a fused q_norm (kernels.py): decode steps take
    the plain function, prompts and training passes Liger's."""
    plain_rope = modeling_llama.apply_rotary_pos_emb
    monkeypatch.setattr(kernels, "why_not", lambda model: None)
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), quant=Quant.none, dtype=DType.float32)
    model = load_model(cfg)
    kernels.apply_liger(model, None)  # applied again over the guarded function: the guard wraps the plain one
    rope = modeling_llama.apply_rotary_pos_emb
    assert rope.__wrapped__ is liger_rope
    assert plain_rope in [cell.cell_contents for cell in rope.__closure__]  # not the first guard, nested
    torch.manual_seed(0)
    cos, sin = torch.randn(4, 1, 8), torch.randn(4, 1, 8)
    q, k = torch.randn(4, 2, 1, 8), torch.randn(4, 2, 1, 8)  # (batch, heads, one token, head_dim)
    for got, want in zip(rope(q, k, cos, sin), plain_rope(q, k, cos, sin)):
        torch.testing.assert_close(got, want)
    q, k, cos, sin = torch.randn(4, 2, 3, 8), torch.randn(4, 2, 3, 8), torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    torch.testing.assert_close(rope(q, k, cos, sin)[0], q + 100)

    load_model(dataclasses.replace(cfg, liger=False))
    assert modeling_llama.apply_rotary_pos_emb is plain_rope


def test_decoding_jobs_load_without_liger_unless_asked():
    from adl_llm.tasks import model_settings

    assert model_settings(compose_config(), compiled=False, decoding=True).liger is False
    assert model_settings(compose_config(), compiled=False).liger is None  # training and scoring: where it can run
    assert model_settings(compose_config("model.liger=true"), compiled=False, decoding=True).liger is True
