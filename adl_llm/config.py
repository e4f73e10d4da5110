"""Typed schemas of every config group, registered in Hydra's ConfigStore.

Hydra merges `conf/` onto these dataclasses, so an unknown key or a wrong type fails while composing.
Value checks live in `__post_init__`: `OmegaConf.to_object` builds the dataclasses from the final,
overridden values, so `python -m adl_llm.run gen.beams=0` fails in about a second, naming `gen.beams`.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from adl_llm.errors import ConfigError, unknown_key

PROJECT_ROOT = Path(__file__).resolve().parent.parent

_run_stamp: list[str] = []


def run_stamp(value: str | None = None) -> str:
    """The time stamp in run and sweep folder names: fixed once per process, or set (torchrun's ranks share
    rank 0's, so they write one run folder)."""
    if value is not None:
        _run_stamp[:] = [value]
    if not _run_stamp:
        _run_stamp.append(datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f"))
    return _run_stamp[0]


# `${project_root:}` lets the shipped configs point at the vendored data wherever the command runs from.
if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
    OmegaConf.register_new_resolver("run_stamp", run_stamp)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


class Quant(enum.Enum):
    nf4 = "nf4"  # 4-bit NormalFloat with double quantisation (QLoRA), through bitsandbytes
    none = "none"  # plain weights in model.dtype


class DType(enum.Enum):
    auto = "auto"  # bfloat16 on a GPU or under NF4, float32 for plain weights on a CPU
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class ResumeMode(enum.Enum):
    auto = "auto"  # continue from the run folder's last complete checkpoint, if there is one
    never = "never"  # start over, ignoring checkpoints


class TaskName(enum.Enum):
    pipeline = "pipeline"  # train, then evaluate, then generate: the seed report's workflow
    train = "train"
    eval = "eval"
    generate = "generate"


@dataclass
class ModelConfig:
    name_or_path: str = MISSING  # hub id, local folder, or `embedded:gemma3-270m`
    quant: Quant = Quant.nf4
    dtype: DType = DType.auto
    revision: str | None = None
    trust_remote_code: bool = False  # runs code shipped with a hub model: off unless asked for
    attn_implementation: str = "sdpa"
    # PyTorch's cuDNN attention (its first choice on recent GPUs) builds an execution plan for every new input
    # shape, and batch shapes here change all the time: off unless asked (docs/BENCHMARKS.md measures both).
    cudnn_attention: bool = False

    def __post_init__(self) -> None:
        _check(bool(self.name_or_path.strip()), "model.name_or_path", "must name a hub id or a local folder")


@dataclass
class LoraConfig:
    r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    bias: str = "none"

    def __post_init__(self) -> None:
        _check(self.r > 0, "lora.r", f"must be > 0, got {self.r}")
        _check(self.lora_alpha > 0, "lora.lora_alpha", f"must be > 0, got {self.lora_alpha}")
        _check(0.0 <= self.lora_dropout < 1.0, "lora.lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        _check(len(self.target_modules) > 0, "lora.target_modules", "must name at least one module")
        _check(
            self.bias in ("none", "all", "lora_only"),
            "lora.bias",
            f"must be none, all or lora_only, got {self.bias}",
        )


@dataclass
class OptimConfig:
    _target_: str = "torch.optim.AdamW"
    lr: float = 3e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            f"must be two numbers in [0, 1), got {self.betas}",
        )
        _check(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")


class ScheduleName(enum.Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"


@dataclass
class ScheduleConfig:
    name: ScheduleName = ScheduleName.linear
    warmup_ratio: float = 0.0  # fraction of the optimiser steps spent warming up
    warmup_steps: int = 0  # absolute warm-up; wins over warmup_ratio when > 0

    def __post_init__(self) -> None:
        _check(
            0.0 <= self.warmup_ratio < 1.0,
            "schedule.warmup_ratio",
            f"must be in [0, 1), got {self.warmup_ratio}",
        )
        _check(self.warmup_steps >= 0, "schedule.warmup_steps", f"must be >= 0, got {self.warmup_steps}")


@dataclass
class GenConfig:
    beams: int = 3
    do_sample: bool = True
    top_p: float = 0.9
    top_k: int = 10
    temperature: float = 1.2
    max_new_tokens: int = 128
    stop_strings: list[str] = field(default_factory=lambda: ["USER:", "\n"])
    batch_size: int | None = None  # prompts per batch; null: as many as fit in memory_budget_gb (16 on a CPU)
    memory_budget_gb: float = 7.0  # GiB of GPU memory decoding may fill, the model included

    def __post_init__(self) -> None:
        _check(self.beams >= 1, "gen.beams", f"must be >= 1, got {self.beams}")
        _check(0.0 < self.top_p <= 1.0, "gen.top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, "gen.top_k", f"must be >= 0 (0 disables it), got {self.top_k}")
        _check(self.temperature > 0, "gen.temperature", f"must be > 0, got {self.temperature}")
        _check(self.max_new_tokens >= 1, "gen.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(
            self.batch_size is None or self.batch_size >= 1, "gen.batch_size", f"must be >= 1, got {self.batch_size}"
        )
        _check(self.memory_budget_gb > 0, "gen.memory_budget_gb", f"must be > 0, got {self.memory_budget_gb}")
        _check(all(self.stop_strings), "gen.stop_strings", "must not contain an empty string")


@dataclass
class DataConfig:
    name: str = "custom"
    train_file: str = MISSING
    eval_file: str = MISSING
    n_train: int | None = 3000  # the first N training records; null takes them all
    n_eval: int | None = None  # the first N eval records (a quick slice); null takes them all

    def __post_init__(self) -> None:
        _check(
            self.n_train is None or self.n_train > 0,
            "data.n_train",
            f"must be > 0 or null, got {self.n_train}",
        )
        _check(self.n_eval is None or self.n_eval > 0, "data.n_eval", f"must be > 0 or null, got {self.n_eval}")


@dataclass
class PromptConfig:
    name: str = "zero_shot"
    system: str = MISSING
    query_template: str = "USER: {instruction} ASSISTANT:"
    n_shots: int = 0  # >0: the last n training records become worked examples
    shots_intro: str = ""
    shot_template: str = "{n}. USER: {instruction} ASSISTANT: {output}\n"

    def __post_init__(self) -> None:
        _check(self.n_shots >= 0, "prompt.n_shots", f"must be >= 0, got {self.n_shots}")
        _check(
            "{instruction}" in self.query_template,
            "prompt.query_template",
            "must contain the placeholder {instruction}",
        )
        if self.n_shots:
            for part in ("{instruction}", "{output}"):
                _check(part in self.shot_template, "prompt.shot_template", f"must contain the placeholder {part}")


@dataclass
class TaskConfig:
    name: TaskName = TaskName.pipeline


@dataclass
class EvalConfig:
    batch_size: int = 64
    max_length: int = 2048  # tokens; longer examples are cut here, as the course metric does
    pad_to_multiple: int | None = None  # padded batch width's multiple; null: 64 on a GPU, 1 on a CPU

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.max_length >= 2, "eval.max_length", f"must be >= 2, got {self.max_length}")
        _check(
            self.pad_to_multiple is None or self.pad_to_multiple >= 1,
            "eval.pad_to_multiple",
            f"must be >= 1 or null, got {self.pad_to_multiple}",
        )


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 16  # examples per optimiser step, over all processes: the report's 2 x 8
    # How a step's examples are split into forward/backward passes changes the speed, not the update (the loss
    # is normalised over the whole step's answer tokens). Set both for a fixed split (the report: 2 and 8), or
    # leave them null: passes then group examples of similar length within a token budget (micro_batch_tokens).
    micro_batch_size: int | None = None
    grad_accum: int | None = None
    micro_batch_tokens: int | None = None  # padded tokens per pass; null: sized from memory_budget_gb on a GPU
    memory_budget_gb: float = 10.0  # GPU memory the automatic split may fill (weights included)
    max_length: int = 2048  # tokens; longer examples are cut as the course metric cuts them
    max_grad_norm: float = 1.0  # gradient clipping, as the Hugging Face Trainer does by default; 0 disables
    # Recompute activations in the backward pass: less memory a token, so larger and fewer passes, but each
    # pass slower. null: with the automatic split on a GPU, measured and on when a step then needs enough fewer
    # passes; otherwise off.
    gradient_checkpointing: bool | None = None
    pad_to_multiple: int | None = None  # padded pass width's multiple; null: 64 on a GPU, 1 on a CPU
    # Multiply by a dequantised copy of the frozen NF4 base instead of dequantising it twice a pass (bitsandbytes'
    # values); null: when the copy takes at most a quarter of memory_budget_gb (Gemma-3-270M: yes, a 7B: no).
    dequantize_base: bool | None = None
    init_from: str | None = None  # an adapter folder to start from, or `previous` (the job before, in a sweep)
    resume: ResumeMode = ResumeMode.auto
    save_every: int = 50  # optimiser steps between checkpoints; 0 saves only at the end
    keep_checkpoints: int = 2
    max_steps: int | None = None  # stop early after this many optimiser steps (smoke tests)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "keep_checkpoints"):
            _check(getattr(self, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("micro_batch_size", "grad_accum", "micro_batch_tokens", "max_steps", "pad_to_multiple"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"train.{name}", f"must be >= 1 or null, got {value}")
        if self.micro_batch_size and self.grad_accum:
            _check(
                self.micro_batch_size * self.grad_accum == self.batch_size,
                "train.grad_accum",
                f"micro_batch_size x grad_accum = {self.micro_batch_size * self.grad_accum}, but "
                f"train.batch_size is {self.batch_size}; set train.batch_size too, or only one of the two",
            )
        _check(self.memory_budget_gb > 0, "train.memory_budget_gb", f"must be > 0, got {self.memory_budget_gb}")
        _check(self.max_length >= 2, "train.max_length", f"must be >= 2, got {self.max_length}")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        _check(self.save_every >= 0, "train.save_every", f"must be >= 0, got {self.save_every}")

    def examples_per_pass(self, world_size: int) -> int | None:
        """The fixed number of examples per forward/backward pass on one process, or None for the automatic split."""
        per_rank = math.ceil(self.batch_size / world_size)
        if self.micro_batch_size:
            return min(self.micro_batch_size, per_rank)
        if self.grad_accum:
            return math.ceil(per_rank / self.grad_accum)
        return None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    gen: GenConfig = field(default_factory=GenConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adapter: str | None = None  # a PEFT adapter folder to put on the base model
    seed: int = 0
    output_dir: str = "${hydra:runtime.output_dir}"


def register() -> None:
    """Make the schema known to Hydra; `conf/config.yaml` names it first in its defaults."""
    ConfigStore.instance().store(name="adl_llm_schema", node=Config)


def to_typed(cfg: DictConfig | Any) -> Config:
    """Resolve a composed config into the dataclasses, which runs every value check."""
    _reject_added_keys(cfg, Config, "")
    typed = OmegaConf.to_object(cfg)
    assert isinstance(typed, Config)
    return typed


def _reject_added_keys(node: Any, schema: type, prefix: str) -> None:
    """`+gen.beam=3` forces a key past Hydra's checks; the dataclasses would drop it without a word."""
    fields = {f.name: f.type for f in dataclasses.fields(schema)}
    for key in node:
        if key not in fields:
            raise unknown_key(f"{prefix}{key}", list(fields))
        child = OmegaConf.get_type(node, key)
        if dataclasses.is_dataclass(child):
            _reject_added_keys(node[key], child, f"{prefix}{key}.")


register()
