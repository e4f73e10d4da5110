"""Typed schemas of every config group, registered in Hydra's ConfigStore, and `compose()` for code.

The values live in `conf/` only: each schema reads its defaults from its group's default option (conf_files.py);
the training groups' schemas are in train_config.py.

Hydra merges `conf/` onto these dataclasses, so an unknown key or a wrong type fails while composing. Value checks
live in `__post_init__`: `OmegaConf.to_object` builds the dataclasses from the final, overridden values, so
`python -m adl_llm.run gen.beams=0` fails in about a second, naming `gen.beams`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from adl_llm.conf_files import CONF_DIR, PROJECT_ROOT, defaults_from, require, require_at_least, run_stamp
from adl_llm.errors import ConfigError, unknown_key
from adl_llm.eval_config import EvalConfig, GenConfig, LongPrompts
from adl_llm.train_config import OptimConfig, ResumeMode, ScheduleConfig, ScheduleName, TrainConfig

# Re-exported: the whole schema can be imported from here.
__all__ = [
    "CONF_DIR",
    "PROJECT_ROOT",
    "Config",
    "DType",
    "DataConfig",
    "EvalConfig",
    "ExportConfig",
    "GenConfig",
    "LongPrompts",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "PromptConfig",
    "Quant",
    "ResumeMode",
    "ScheduleConfig",
    "ScheduleName",
    "TaskConfig",
    "TaskName",
    "TrainConfig",
    "as_plain",
    "compose",
    "run_stamp",
    "to_typed",
]


class Quant(enum.Enum):
    nf4 = "nf4"  # 4-bit NormalFloat with double quantisation (QLoRA), through bitsandbytes
    none = "none"  # plain weights in model.dtype


class DType(enum.Enum):
    auto = "auto"  # bfloat16 on a GPU or under NF4, float32 for plain weights on a CPU
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class TaskName(enum.Enum):
    pipeline = "pipeline"  # train, then evaluate, then generate: the seed report's workflow
    train = "train"
    eval = "eval"
    generate = "generate"
    export = "export"  # the adapter merged into its base, saved as a standalone model folder


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
    liger: bool | None

    def __post_init__(self) -> None:
        require(bool(self.name_or_path.strip()), "model.name_or_path", "must name a hub id or a local folder")


@dataclass
@defaults_from("lora/report")
class LoraConfig:
    r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: list[str]
    bias: str

    def __post_init__(self) -> None:
        require_at_least("lora", self, 0, "r", "lora_alpha", strict=True)
        require(0.0 <= self.lora_dropout < 1.0, "lora.lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        require(len(self.target_modules) > 0, "lora.target_modules", "must name at least one module")
        require(
            self.bias in ("none", "all", "lora_only"), "lora.bias", f"must be none, all or lora_only, got {self.bias}"
        )


@dataclass
@defaults_from("data/classical_zh")
class DataConfig:
    name: str
    train_file: str
    eval_file: str
    n_train: int | None
    n_eval: int | None
    slices: dict[str, str] | None

    def __post_init__(self) -> None:
        require_at_least("data", self, 0, "n_train", "n_eval", strict=True, null=True)
        for name, pattern in (self.slices or {}).items():
            require(name != OTHER_SLICE, f"data.slices.{name}", "is the name of the slice of unmatched records")
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"data.slices.{name}", f"is not a regular expression ({err})") from None


OTHER_SLICE = "other"  # the records that no rule of data.slices matches


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
        require_at_least("prompt", self, 0, "n_shots")
        require(
            "{instruction}" in self.query_template,
            "prompt.query_template",
            "must contain the placeholder {instruction}",
        )
        _placeholders(self.query_template, "prompt.query_template", {"instruction"})
        _placeholders(self.shot_template, "prompt.shot_template", {"n", "instruction", "output"})
        require(
            self.n_shots > 0 or not self.shots_intro,
            "prompt.n_shots",
            f"is 0, but the {self.name} prompt introduces worked examples (prompt.shots_intro); set n_shots >= 1, "
            "or use prompt=zero_shot",
        )
        if self.n_shots:
            for part in ("{instruction}", "{output}"):
                require(part in self.shot_template, "prompt.shot_template", f"must contain the placeholder {part}")


def _placeholders(template: str, key: str, allowed: set[str]) -> None:
    """Refuse a template that str.format would fail on, naming the placeholder."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ConfigError(key, f"is not a valid template ({err}); write a literal brace as {{{{ or }}}}") from None
    unknown = sorted(fields - allowed)
    names = ", ".join("{" + name + "}" for name in sorted(allowed))
    require(not unknown, key, f"unknown placeholder {{{unknown[0] if unknown else ''}}}; it may use {names}")


@dataclass
@defaults_from("task/pipeline")
class TaskConfig:
    name: TaskName


@dataclass
@defaults_from("export/default")
class ExportConfig:
    dtype: DType
    dir: str | None

    def __post_init__(self) -> None:
        require(self.dtype is not DType.auto, "export.dtype", "must be bfloat16, float16 or float32, not auto")
        require(self.dir is None or bool(self.dir.strip()), "export.dir", "is empty; give a folder, or null")


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
    export: ExportConfig
    adapter: str | None
    seed: int
    output_dir: str

    def __post_init__(self) -> None:
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        # An unset shell variable (`adapter=$ADAPTER`) gives an empty string, which would mean the base model.
        for key, value in (("adapter", self.adapter), ("train.init_from", self.train.init_from)):
            require(value is None or bool(value.strip()), key, "is empty; give a folder, or null for none")
        for key in ("train_file", "eval_file"):
            require(bool(getattr(self.data, key).strip()), f"data.{key}", "is empty; give a data file")


def as_plain(cfg: Config) -> dict[str, Any]:
    """The config as the user writes it (enum values, the optim group's own keys), for run.json and .hydra/."""
    plain = json.loads(json.dumps(dataclasses.asdict(cfg), default=lambda v: v.value))
    optim = plain["optim"]
    plain["optim"] = {"_target_": optim["target"], "lr": optim["lr"], **optim["arguments"]}
    return plain


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
