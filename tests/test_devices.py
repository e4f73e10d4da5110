"""`model.dtype=auto` follows what the device computes natively; no warning a user cannot act on."""

from __future__ import annotations

import warnings

import pytest
import torch

from adl_llm import devices
from adl_llm.config import DType, ModelConfig, Quant
from adl_llm.modeling import add_lora, load_model, weight_dtype
from tests.conftest import compose_config


@pytest.mark.parametrize(
    "flags,native",
    [
        ("flags : fpu sse avx2 fma f16c", False),  # AVX2 only: bf16 emulated
        ("flags : fpu avx512f avx512bw avx512vl", False),  # AVX-512 without its BF16 extension
        ("flags : fpu avx512f avx512_bf16", True),
        ("flags : fpu amx_bf16 amx_tile", True),
        ("Features : fp asimd bf16 i8mm", True),  # Arm
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor : 0\n{flags}\n")
    monkeypatch.setattr(devices, "Path", lambda path: cpuinfo if path == "/proc/cpuinfo" else devices.Path(path))
    monkeypatch.setattr(devices.platform, "system", lambda: "Linux")
    devices.cpu_has_native_bf16.cache_clear()
    try:
        assert devices.cpu_has_native_bf16() is native
    finally:
        devices.cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_where_the_cpu_computes_it(monkeypatch, native):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if native else torch.float32
    for quant in Quant:
        assert weight_dtype(ModelConfig(quant=quant), cpu) == expected
    assert weight_dtype(ModelConfig(dtype=DType.bfloat16), cpu) == torch.bfloat16  # asked for: kept


def test_nf4_compute_follows_auto_on_this_cpu(tiny_model_dir):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), torch.device("cpu"))
    compute = {m.compute_dtype for m in model.modules() if type(m).__name__ == "Linear4bit"}
    assert compute == {devices.fastest_dtype(torch.device("cpu"))}


def test_putting_lora_on_a_model_warns_of_nothing(tiny_model_dir):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir), quant=Quant.none), torch.device("cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_lora(model, compose_config().lora)
    assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]
