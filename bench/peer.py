"""The peer: TRL's `SFTTrainer`, with and without Liger kernels, the tool a user would pick instead of adl-llm.

Set up as its documentation sets up QLoRA instruction tuning: the base in NF4 (double quantisation, bf16 compute)
as `baseline.load_nf4` loads it, the report's LoRA as `peft_config`, a batch of 16 examples and no accumulation,
lr 3e-5 linear, bf16, `completion_only_loss` over a pre-tokenised dataset (`input_ids` + `completion_mask`, the
same ids adl-llm trains on), optionally `use_liger_kernel` and `gradient_checkpointing`. Needs the `bench` extra
(`pip install -e ".[bench]"`); Liger needs a GPU with Triton. A side whose package is missing is recorded as
skipped, with the reason.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch

from adl_llm.encode import IGNORE, Encoded
from bench import measure
from bench.baseline import SEED, load_nf4, load_tokenizer, step_clock

BATCH = 16  # examples per optimiser step, as adl-llm's train.batch_size
# name -> (use_liger_kernel, gradient_checkpointing)
SIDES = {
    "trl": (False, False),
    "trl_checkpointing": (False, True),
    "trl_liger": (True, False),
    "trl_liger_checkpointing": (True, True),
}


def missing_package(liger: bool) -> str | None:
    """Why a side cannot run here, or None."""
    if importlib.util.find_spec("trl") is None:
        return "trl is not installed (pip install -e '.[bench]')"
    if liger and importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install -e '.[bench]')"
    if liger and not torch.cuda.is_available():
        return "Liger's kernels are Triton kernels: they need a GPU"
    return None


class _TokenCounter:
    """Wraps the trainer's collator and records the real (non-pad) tokens of each batch it builds, in order."""

    def __init__(self, collator):
        self.collator = collator
        self.tokens: list[int] = []

    def __call__(self, features):
        batch = self.collator(features)
        self.tokens.append(int(batch["attention_mask"].sum()))
        return batch


def train_peer(
    model_path: str,
    examples: Sequence[Encoded],
    steps: int,
    *,
    liger: bool,
    checkpointing: bool,
    work_dir: Path,
    warmup: int,
) -> dict:
    """`steps` optimiser steps of TRL's SFTTrainer from a fresh adapter; speed, memory and losses."""
    reason = missing_package(liger)
    if reason:
        return {"skipped": reason}
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    on_gpu = torch.cuda.is_available()
    measure.reset_peak()
    set_seed(0)
    tokenizer = load_tokenizer(model_path)
    model = load_nf4(model_path)
    lora = LoraConfig(
        r=SEED["r"],
        lora_alpha=SEED["lora_alpha"],
        lora_dropout=SEED["lora_dropout"],
        target_modules=SEED["target_modules"],
        task_type="CAUSAL_LM",
    )
    args = SFTConfig(
        output_dir=str(work_dir),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        learning_rate=SEED["lr"],
        lr_scheduler_type=SEED["schedule"],
        max_steps=steps,
        bf16=on_gpu,
        use_cpu=not on_gpu,
        completion_only_loss=True,
        use_liger_kernel=liger,
        gradient_checkpointing=checkpointing,
        max_length=2048,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    rows = [
        {"input_ids": e.input_ids, "completion_mask": [int(label != IGNORE) for label in e.labels]} for e in examples
    ]
    clock = step_clock()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=_dataset(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[clock],
    )
    counter = _TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    started = measure.now()
    trainer.train()
    wall = measure.now() - started
    memory = measure.peak()
    trainer.accelerator.free_memory()
    del trainer, model
    measure.free()
    return {
        **measure.rates(counter.tokens[: len(clock.seconds)], clock.seconds, warmup),
        "losses": clock.losses,
        "wall_seconds": wall,
        **memory,
        "settings": {
            "trainer": "trl.SFTTrainer",
            "batch": f"{BATCH} x 1",
            "use_liger_kernel": liger,
            "gradient_checkpointing": checkpointing,
            "completion_only_loss": True,
            "bf16": on_gpu,
        },
    }


def _dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(rows)
