"""Shared fixtures: a tiny random causal LM with a character-level tokenizer, built offline, and the real
`conf/` composed through Hydra's compose API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adl_llm.config import PROJECT_ROOT, Config, compose

ASSETS = Path(__file__).parent / "assets"
TRAIN_FILE = ASSETS / "train.json"  # the first 40 records of data/classical_zh/train.json
EVAL_FILE = ASSETS / "eval.json"  # the first 12 records of data/classical_zh/public_test.json
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Each test compiles from empty caches: torch.compile keeps at most 8 graphs per function for the whole process
    (recompile_limit) and then runs it eagerly, which would make a compiled test depend on the tests before it."""
    torch._dynamo.reset()


def build_tiny_model(folder: Path, *, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 64) and a one-character-per-token tokenizer over the test assets."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    sources = [TRAIN_FILE, EVAL_FILE, *sorted((PROJECT_ROOT / "conf" / "prompt").glob("*.yaml"))]
    text = "".join(path.read_text(encoding="utf-8") for path in sources)
    chars = sorted(set(text) - {"\n"}) + ["\n"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()  # decoded text is the characters themselves, so stop strings can match
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        initializer_range=0.2,  # wide enough that a LoRA can make the predictions confident within a few steps
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_gemma3(tokenizer, sliding_window: int):
    """A 2-layer Gemma 3 of random weights, one sliding-window layer and one full: transformers' static cache keeps
    a Python count in the sliding one."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def build_tiny_adapter(model_dir: Path, folder: Path) -> Path:
    """A saved LoRA adapter (q/v, r=4) for the tiny model that changes its predictions (B drawn at random, not the
    zeros a fresh adapter starts from), with the training.json of a two-stage chain."""
    from transformers import AutoModelForCausalLM

    from adl_llm.config import LoraConfig
    from adl_llm.modeling import add_lora, save_adapter

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none")
    torch.manual_seed(2)  # before add_lora, whose A matrices are drawn too: the same adapter whatever ran before
    model = add_lora(AutoModelForCausalLM.from_pretrained(model_dir), lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    stages = [{"run_dir": str(folder.parent / f"stage-{n}"), "epochs": epochs} for n, epochs in ((1, 1.0), (2, 2.0))]
    save_adapter(model, folder, {"base_model": str(model_dir), "cumulative_epochs": 3.0, "stages": stages})
    return folder


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return build_tiny_adapter(tiny_model_dir, tmp_path_factory.mktemp("tiny-adapter") / "adapter")


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory) -> Path:
    """An ADL_LLM_CACHE holding the embedded model, built from its packages by two processes started at once."""
    cache = tmp_path_factory.mktemp("adl-llm-cache")
    build = [
        sys.executable,
        "-c",
        "from adl_llm.embedded import embedded_model_dir as d; print(d('embedded:gemma3-270m'))",
    ]
    env = {**os.environ, "ADL_LLM_CACHE": str(cache)}
    procs = [subprocess.Popen(build, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    folders = [proc.communicate(timeout=900)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert folders[0] == folders[1] == str(cache / "models" / "gemma3-270m")
    return cache


def compose_config(*overrides: str, output_dir: Path | str = "unused") -> Config:
    """The real conf/ with overrides, checked and typed like the entrypoint does."""
    return compose(*overrides, output_dir=output_dir)


# Two optimiser steps of four of the test records, without dropout (whose masks differ between compared paths)
# and with no checkpoint: the runs the tests compare two training paths on.
TWO_STEPS = (
    "task=train",
    "data.n_train=8",
    "train.batch_size=4",
    "train.max_steps=2",
    "lora.lora_dropout=0.0",
    "train.save_every=0",
)


def tiny_overrides(model_dir: Path, *extra: str) -> list[str]:
    """Overrides that point the config at the tiny model and the test records."""
    return [
        f"model.name_or_path={model_dir}",
        "model.quant=none",
        "model.dtype=float32",
        f"data.train_file={TRAIN_FILE}",
        f"data.eval_file={EVAL_FILE}",
        *extra,
    ]


def gpus_sweep(model_dir: Path, sweep: Path, gpus: list[str], *overrides: str) -> str:
    """An eval sweep of the tiny model under hydra/launcher=gpus, with stand-in GPU names for CUDA_VISIBLE_DEVICES
    (claims are files, not CUDA): its console output, once it succeeded and wrote its summary."""
    result = run_entrypoint(
        "-m",
        "hydra/launcher=gpus",
        f"hydra.sweep.dir={sweep}",
        *tiny_overrides(model_dir, "task=eval", "data.n_eval=2", *overrides),
        env={"CUDA_VISIBLE_DEVICES": ",".join(gpus)},
    )
    assert result.returncode == 0, result.stderr
    assert (sweep / "summary.md").exists()
    return result.stdout + result.stderr


def run_entrypoint(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m adl_llm.run ARGS` in a subprocess, as a user would run it."""
    return run_module("adl_llm.run", *args, env=env, timeout=timeout)


def run_module(
    module: str, *args: str, env: dict | None = None, stdin: str | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in a subprocess from the project's root, `stdin` piped in, output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=PROJECT_ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need a CUDA device: skipped, saying so, where there is none (bench/gpu_session.sh runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on a GPU machine: bash bench/gpu_session.sh gpu_tests)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
