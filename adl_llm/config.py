"""Typed schemas of every config group, registered in Hydra's ConfigStore, and `compose()` for code.

The values live in `conf/` only: each schema reads its defaults from its group's default option
(`@defaults_from("lora/report")`), so a dataclass built in code (`LoraConfig()`) and a composed config agree, a
key's default has one place to change, and another option (`gen=greedy`) lists only what it changes.

Hydra merges `conf/` onto these dataclasses, so an unknown key or a wrong type fails while composing. Value checks
live in `__post_init__`: `OmegaConf.to_object` builds the dataclasses from the final, overridden values, so
`python -m adl_llm.run gen.beams=0` fails in about a second, naming `gen.beams`.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import enum
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from adl_llm.errors import ConfigError, unknown_key

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"

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


def defaults_from(option: str):
    """Class decorator, under `@dataclass`: every field's default is its value in `conf/<option>.yaml`.

    Fields typed as another schema default to that schema; any other field missing from the file is an error at
    import, so a key cannot exist in code without being visible (and documented) in conf/.
    """

    def apply(cls):
        values = option_values(option)
        for name, hint in typing.get_type_hints(cls).items():
            if name in vars(cls):  # a default given in the class body
                continue
            if dataclasses.is_dataclass(hint):
                setattr(cls, name, field(default_factory=hint))
            elif name not in values:
                raise KeyError(f"conf/{option}.yaml: no value for {name}, a key of {cls.__name__}")
            elif isinstance(values[name], (list, dict)):
                setattr(cls, name, field(default_factory=lambda value=values[name]: copy.deepcopy(value)))
            else:
                setattr(cls, name, hint(values[name]) if _is_enum(hint) else values[name])
        return cls

    return apply


def option_values(option: str) -> dict[str, Any]:
    """The keys of `conf/<option>.yaml` (interpolations unresolved), without its defaults list."""
    values = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{option}.yaml"), resolve=False)
    values.pop("defaults", None)
    return values


def _is_enum(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, enum.Enum)


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


class ScheduleName(enum.Enum):
    """transformers' scheduler names (`transformers.SchedulerType`), but reduce_lr_on_plateau and greedy, which
    follow a metric; a test keeps this list equal to transformers' own."""

    linear = "linear"
    cosine = "cosine"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    inverse_sqrt = "inverse_sqrt"
    cosine_with_min_lr = "cosine_with_min_lr"
    cosine_warmup_with_min_lr = "cosine_warmup_with_min_lr"
    warmup_stable_decay = "warmup_stable_decay"


@dataclass
@defaults_from("model/gemma3_270m")
class ModelConfig:
    name_or_path: str
    quant: Quant
    dtype: DType
    revision: str | None
    trust_remote_code: bool
    attn_implementation: str
    cudnn_attention: bool

    def __post_init__(self) -> None:
        _check(bool(self.name_or_path.strip()), "model.name_or_path", "must name a hub id or a local folder")


@dataclass
@defaults_from("lora/report")
class LoraConfig:
    r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: list[str]
    bias: str

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
    """The `optim` group: an optimiser class (`_target_`) and the keyword arguments it takes.

    The group is open, so its keys are the class's own; `adl_llm.optim` checks them against the class's
    signature before any model loads."""

    target: str
    lr: float
    arguments: dict[str, Any]

    @classmethod
    def from_node(cls, node: dict[str, Any]) -> OptimConfig:
        arguments = dict(node)
        target = arguments.pop("_target_", None)
        _check(isinstance(target, str) and "." in target, "optim._target_", f"must name a class, got {target!r}")
        lr = arguments.pop("lr", None)
        _check(isinstance(lr, (int, float)) and not isinstance(lr, bool), "optim.lr", f"must be a number, got {lr!r}")
        _check(math.isfinite(lr) and lr > 0, "optim.lr", f"must be a finite number > 0, got {lr}")
        return cls(target=target, lr=float(lr), arguments=arguments)


@dataclass
@defaults_from("schedule/linear")
class ScheduleConfig:
    name: ScheduleName
    warmup_ratio: float
    warmup_steps: int
    scheduler_specific_kwargs: dict[str, Any]

    def __post_init__(self) -> None:
        _check(
            0.0 <= self.warmup_ratio < 1.0,
            "schedule.warmup_ratio",
            f"must be in [0, 1), got {self.warmup_ratio}",
        )
        _check(self.warmup_steps >= 0, "schedule.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        warms_up = self.warmup_ratio > 0 or self.warmup_steps > 0
        _check(
            not (warms_up and self.name is ScheduleName.constant),
            "schedule.name",
            "constant takes no warm-up (transformers ignores it); use constant_with_warmup",
        )


@dataclass
@defaults_from("gen/report")
class GenConfig:
    beams: int
    do_sample: bool
    top_p: float
    top_k: int
    temperature: float
    max_new_tokens: int
    stop_strings: list[str]
    batch_size: int | None
    memory_budget_gb: float

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
@defaults_from("data/classical_zh")
class DataConfig:
    name: str
    train_file: str
    eval_file: str
    n_train: int | None
    n_eval: int | None

    def __post_init__(self) -> None:
        _check(
            self.n_train is None or self.n_train > 0,
            "data.n_train",
            f"must be > 0 or null, got {self.n_train}",
        )
        _check(self.n_eval is None or self.n_eval > 0, "data.n_eval", f"must be > 0 or null, got {self.n_eval}")


@dataclass
@defaults_from("prompt/zero_shot")
class PromptConfig:
    name: str
    system: str
    query_template: str
    n_shots: int
    shots_intro: str
    shot_template: str

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
@defaults_from("task/pipeline")
class TaskConfig:
    name: TaskName


@dataclass
@defaults_from("eval/default")
class EvalConfig:
    batch_size: int
    max_length: int
    pad_to_multiple: int | None

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.max_length >= 2, "eval.max_length", f"must be >= 2, got {self.max_length}")
        _check(
            self.pad_to_multiple is None or self.pad_to_multiple >= 1,
            "eval.pad_to_multiple",
            f"must be >= 1 or null, got {self.pad_to_multiple}",
        )


@dataclass
@defaults_from("train/default")
class TrainConfig:
    epochs: int
    batch_size: int
    micro_batch_size: int | None
    grad_accum: int | None
    micro_batch_tokens: int | None
    memory_budget_gb: float
    max_length: int
    max_grad_norm: float
    gradient_checkpointing: bool | None
    pad_to_multiple: int | None
    dequantize_base: bool | None
    init_from: str | None
    resume: ResumeMode
    save_every: int
    keep_checkpoints: int
    max_steps: int | None

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
        """The fixed examples per micro-batch on one process, or None for micro-batches sized by tokens."""
        per_rank = math.ceil(self.batch_size / world_size)
        if self.micro_batch_size:
            return min(self.micro_batch_size, per_rank)
        if self.grad_accum:
            return math.ceil(per_rank / self.grad_accum)
        return None


@dataclass
@defaults_from("config")
class Config:
    model: ModelConfig
    lora: LoraConfig
    # A dict while composing (the group is open: any optimiser's own keys, none by default, so that another
    # option's keys are not mixed with adamw's); an OptimConfig once typed.
    optim: Any = field(default_factory=dict)
    schedule: ScheduleConfig
    gen: GenConfig
    data: DataConfig
    prompt: PromptConfig
    task: TaskConfig
    eval: EvalConfig
    train: TrainConfig
    adapter: str | None
    seed: int
    output_dir: str

    def __post_init__(self) -> None:
        _check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")


def register() -> None:
    """Make the schema known to Hydra; `conf/config.yaml` names it first in its defaults."""
    ConfigStore.instance().store(name="adl_llm_schema", node=Config)


def to_typed(cfg: DictConfig | Any) -> Config:
    """Resolve a composed config into the dataclasses, which runs every value check."""
    _reject_added_keys(cfg, Config, "")
    typed = OmegaConf.to_object(cfg)
    assert isinstance(typed, Config)
    if not isinstance(typed.optim, OptimConfig):
        typed.optim = OptimConfig.from_node(typed.optim)
    return typed


def compose(*overrides: str, output_dir: Path | str = "unused") -> Config:
    """The real conf/ with `overrides`, checked and typed as the entrypoint does: for tests, the bench, notebooks."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = hydra_compose("config", overrides=[*overrides, f"output_dir={output_dir}"])
    return to_typed(raw)


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
