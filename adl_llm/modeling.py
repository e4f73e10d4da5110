"""The model: base and tokenizer (hub id, local folder or the embedded default), NF4 quantisation, LoRA adapters
(new, loaded, saved), gradient checkpointing and the attention kernels."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from adl_llm.artifacts import replace_dir, write_json
from adl_llm.config import DType, LoraConfig, ModelConfig, Quant
from adl_llm.devices import default_device, fastest_dtype
from adl_llm.embedded import check_tokenizer, embedded_model_dir, is_embedded
from adl_llm.errors import ModelError
from adl_llm.folders import check_adapter_folder, check_model_folder
from adl_llm.kernels import apply_liger, plain_kernels
from adl_llm.nf4 import nf4_quantization, no_cpu_repacking

log = logging.getLogger(__name__)


@contextlib.contextmanager
def attention_kernels(cudnn: bool) -> Iterator[None]:
    """PyTorch's attention kernels for the work inside: flash, memory-efficient and math, and cuDNN if `cudnn`.

    cuDNN's kernel is PyTorch's first choice on recent GPUs, but it builds an execution plan for each new shape,
    and the shapes of training passes, perplexity batches and decoding steps keep changing.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel([*backends, SDPBackend.CUDNN_ATTENTION] if cudnn else backends):
        yield


def weight_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The weights' dtype and NF4's compute dtype: `auto` is the one `device` computes fastest (devices.py)."""
    return fastest_dtype(device) if cfg.dtype is DType.auto else getattr(torch, cfg.dtype.value)


def model_source(cfg: ModelConfig) -> str:
    """What transformers should load: the embedded model's cache folder, a local folder or a hub id."""
    if is_embedded(cfg.name_or_path):
        return str(embedded_model_dir(cfg.name_or_path))
    path = Path(cfg.name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model.name_or_path={cfg.name_or_path}: is a file, not a model folder")
        check_model_folder(path, "model.name_or_path")
        return str(path)
    if _looks_like_path(cfg.name_or_path):
        raise ModelError(f"model.name_or_path={cfg.name_or_path}: no such model folder")
    return cfg.name_or_path


def load_tokenizer(cfg: ModelConfig, source: str | None = None):
    """The model's tokenizer (pad = EOS where it has none); loaded once per process for the jobs of a multirun,
    since a 262k-token tokenizer takes seconds to load."""
    return _tokenizer(source or model_source(cfg), cfg.name_or_path, cfg.revision, cfg.trust_remote_code)


@functools.lru_cache(maxsize=4)
def _tokenizer(source: str, name_or_path: str, revision: str | None, trust_remote_code: bool):
    cfg = ModelConfig(name_or_path=name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    tokenizer = _from_pretrained(AutoTokenizer, source, cfg)
    if is_embedded(cfg.name_or_path):  # a later transformers might read the cached tokenizer.json otherwise
        check_tokenizer(cfg.name_or_path, tokenizer)
    if tokenizer.pad_token_id is None:  # padding is always masked out, any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> dict:
    """What run.json records of the tokenizer: its class, size and a sha256 of its full definition."""
    if tokenizer not in _fingerprints:
        _fingerprints[tokenizer] = _fingerprint(tokenizer)
    return _fingerprints[tokenizer]


_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a second per 262k-token tokenizer


def _fingerprint(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    definition += json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "sha256": hashlib.sha256(definition.encode()).hexdigest(),
    }


def load_model(cfg: ModelConfig, device: torch.device | None = None, source: str | None = None):
    """The base model in eval mode, quantised to NF4 when `cfg.quant` asks, on `device`."""
    device = device or default_device()
    source = source or model_source(cfg)
    dtype = weight_dtype(cfg, device)
    extra = {"quantization_config": nf4_quantization(dtype)} if cfg.quant is Quant.nf4 else {}
    plain_kernels()  # layers are built from the modeling module's classes: never from an earlier run's Liger ones
    model = _from_pretrained(
        AutoModelForCausalLM,
        source,
        cfg,
        dtype=dtype,
        device_map={"": str(device)},
        attn_implementation=cfg.attn_implementation,
        **extra,
    )
    # The gen group is the whole decoding: transformers 5 fills every key adl-llm leaves unset from the folder's own
    # generation_config.json (an export's stop strings, a hub model's top_k or repetition_penalty).
    model.generation_config = GenerationConfig()
    if cfg.quant is Quant.nf4 and device.type == "cpu":
        no_cpu_repacking(model)
    apply_liger(model, cfg.liger)
    chosen = " (model.dtype=auto: what this device computes natively)" if cfg.dtype is DType.auto else ""
    log.info("loaded %s (%s, %s%s) on %s", cfg.name_or_path, cfg.quant.value, dtype, chosen, device)
    return model.eval()


def add_lora(model, cfg: LoraConfig):
    """A fresh, trainable LoRA adapter on `model`; every base weight stays frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = "all-linear" if list(cfg.target_modules) == ["all-linear"] else list(cfg.target_modules)
    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        bias=cfg.bias,
        task_type="CAUSAL_LM",
    )
    try:
        with _quiet_peft_deprecation():
            return get_peft_model(model, peft_config)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        if "not found" not in str(err):
            raise
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_linear(m)})
        raise ModelError(
            f"lora.target_modules={list(cfg.target_modules)}: no module of this model matches; its linear "
            f"layers are {', '.join(linear)} (or use [all-linear])"
        ) from None


@contextlib.contextmanager
def _quiet_peft_deprecation() -> Iterator[None]:
    """PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: a FutureWarning on
    every run that no user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _is_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear")


def load_adapter(model, adapter_dir: str, *, trainable: bool = False):
    """Put a saved PEFT adapter on `model`."""
    from peft import PeftModel

    path = Path(adapter_dir).expanduser()
    check_adapter_folder(path, "adapter")
    try:
        with _quiet_peft_deprecation():
            return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
    except RuntimeError as err:  # shape mismatches: the adapter belongs to another base model
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines if "size mismatch" in line), lines[0] if lines else "")
        raise ModelError(f"adapter={adapter_dir}: does not fit this base model ({detail[:200]})") from None


def save_adapter(model, folder: Path, info: dict) -> None:
    """Save the PEFT adapter (safetensors) with `training.json` beside it, complete or not at all."""
    work = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    model.save_pretrained(str(work), safe_serialization=True)
    write_json(work / "training.json", info)
    replace_dir(work, folder)


def set_gradient_checkpointing(model, on: bool) -> None:
    """Recompute activations in the backward pass, or not; off also removes the hook that turning it on put on
    the input embeddings (transformers leaves it on a PEFT model)."""
    if on == gradient_checkpointing_on(model):
        return
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    model.gradient_checkpointing_disable()
    base = base_model(model)
    if hasattr(base, "_require_grads_hook"):
        base.disable_input_require_grads()


def base_model(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def gradient_checkpointing_on(model) -> bool:
    """Whether any layer recomputes its activations (transformers' flag, read the same way in 4.x and 5.x)."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def _from_pretrained(auto_class, source: str, cfg: ModelConfig, **kwargs):
    try:
        return auto_class.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **kwargs
        )
    except ValueError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "attn_implementation" in str(err) or "attention" in first.lower():
            raise ModelError(f"model.attn_implementation={cfg.attn_implementation}: {first[:300]}") from None
        if Path(source).is_dir():
            raise ModelError(f"{source}: cannot load {auto_class.__name__} ({first[:300]})") from None
        raise
    except OSError as err:
        if Path(source).is_dir():
            raise ModelError(f"{source}: cannot load {auto_class.__name__} ({str(err).splitlines()[0]})") from None
        raise ModelError(
            f"model.name_or_path={cfg.name_or_path}: cannot be fetched from the Hugging Face hub "
            "(offline, or no such repository); pass a local model folder instead"
        ) from None
