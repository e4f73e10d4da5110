"""adl-llm's own paths, called as `adl_llm.tasks` calls them, timed and measured like the baselines.

The config is the real `conf/` composed through Hydra's compose API, so "default" means whatever `train.*`
and `gen.*` default to in this checkout.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from adl_llm.config import Config, compose
from adl_llm.encode import Encoded
from bench import measure

log = logging.getLogger(__name__)


def train_framework(
    model_path: str, examples: Sequence[Encoded], steps: int, *overrides: str, work_dir: Path, pad_id: int, warmup: int
) -> dict:
    """`steps` optimiser steps of `adl_llm.train.train` from a fresh adapter, as `run_train` sets it up."""
    from transformers import set_seed

    from adl_llm.compiled_layers import training_compiles
    from adl_llm.devices import default_device
    from adl_llm.modeling import add_lora, attention_kernels, load_model
    from adl_llm.tasks import model_settings
    from adl_llm.train import train

    cfg = compose(
        f"model.name_or_path={model_path}",
        f"train.max_steps={steps}",
        "train.save_every=0",  # one checkpoint at the end, outside the timed steps
        "train.resume=never",
        *overrides,
        output_dir=work_dir,
    )
    measure.reset_peak()
    set_seed(cfg.seed)
    compiled = training_compiles(cfg.train.compile, default_device())
    model = add_lora(load_model(model_settings(cfg, compiled=compiled)), cfg.lora)
    messages = _LogCollector("adl_llm")  # what adl-llm decided (pass sizes, checkpointing, the dequantised base)
    started = measure.now()
    try:
        with attention_kernels(cfg.model.cudnn_attention):
            state = train(model, examples, cfg, Path(work_dir), pad_id)
    finally:
        messages.detach()
    wall = measure.now() - started
    memory = measure.peak()
    del model
    measure.free()
    return {
        **measure.rates(state.step_tokens, state.step_seconds, warmup),
        "losses": state.losses,
        "wall_seconds": wall,
        **memory,
        "settings": {"overrides": list(overrides), "train": dataclasses.asdict(cfg.train), "lora": cfg.lora},
        "log": messages.messages,
    }


class _LogCollector(logging.Handler):
    """Keeps the INFO-and-above messages of one logger while attached."""

    def __init__(self, name: str):
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.logger = logging.getLogger(name)
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def detach(self) -> None:
        self.logger.removeHandler(self)


def ppl_framework(
    model, examples: Sequence[Encoded], *, batch_size: int, pad_id: int, cfg: Config
) -> tuple[list[float], float]:
    """`adl_llm.evaluate.perplexities` with `cfg.eval` and `cfg.model`'s kernels: per-example values, seconds."""
    from adl_llm.evaluate import perplexities
    from adl_llm.modeling import attention_kernels

    started = measure.now()
    with attention_kernels(cfg.model.cudnn_attention):
        values = perplexities(
            model,
            examples,
            batch_size=batch_size,
            pad_id=pad_id,
            pad_to_multiple=cfg.eval.pad_to_multiple,
            progress=False,
        )
    return values, measure.now() - started


def generate_framework(model, tokenizer, prompts: Sequence[str], gen, *, cudnn: bool, fast: bool = False) -> dict:
    """`adl_llm.decoding`'s batched, left-padded decoding with the settings of `gen`; `fast`: on the decoding path
    of a generate job (decode_path.py), whose warm-up (compiling) is timed apart and left out of examples/s."""
    from adl_llm.decoding import encode_prompts, generate_from_ids
    from adl_llm.modeling import attention_kernels

    measure.reset_peak()
    stats: dict = {}
    started = measure.now()
    with attention_kernels(cudnn):
        encoded = encode_prompts(tokenizer, prompts)
        texts = generate_from_ids(model, tokenizer, encoded, gen, progress=False, fast=fast, stats=stats)
    wall = measure.now() - started
    seconds = wall - stats["warmup_seconds"]
    return {
        "texts": texts,
        "seconds": seconds,
        "wall_seconds": wall,
        "warmup_seconds": stats["warmup_seconds"],
        "path": stats["path"],
        "examples_per_s": len(prompts) / seconds,
        **measure.peak(),
    }
