"""The schemas of the training groups: `optim` (open: any optimiser's own keys), `schedule` and `train`."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

from adl_llm.conf_files import defaults_from, require, require_at_least

# torch.compile's modes (torch._inductor.list_mode_options), named here so a typo stops the run before the model loads
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class ResumeMode(enum.Enum):
    auto = "auto"  # continue from the run folder's last complete checkpoint, if there is one
    never = "never"  # start over, ignoring checkpoints


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
        require(isinstance(target, str) and "." in target, "optim._target_", f"must name a class, got {target!r}")
        lr = arguments.pop("lr", None)
        require(isinstance(lr, (int, float)) and not isinstance(lr, bool), "optim.lr", f"must be a number, got {lr!r}")
        require(math.isfinite(lr) and lr > 0, "optim.lr", f"must be a finite number > 0, got {lr}")
        return cls(target=target, lr=float(lr), arguments=arguments)


@dataclass
@defaults_from("schedule/linear")
class ScheduleConfig:
    name: ScheduleName
    warmup_ratio: float
    warmup_steps: int
    scheduler_specific_kwargs: dict[str, Any]

    def __post_init__(self) -> None:
        require(0.0 <= self.warmup_ratio < 1.0, "schedule.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        require_at_least("schedule", self, 0, "warmup_steps")
        warms_up = self.warmup_ratio > 0 or self.warmup_steps > 0
        require(
            not (warms_up and self.name is ScheduleName.constant),
            "schedule.name",
            "constant takes no warm-up (transformers ignores it); use constant_with_warmup",
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
    packing: bool | None
    dequantize_base: bool | None
    compile: bool | None
    compile_mode: str
    autocast: bool
    init_from: str | None
    resume: ResumeMode
    save_every: int
    keep_checkpoints: int
    max_steps: int | None

    def __post_init__(self) -> None:
        require_at_least("train", self, 1, "epochs", "batch_size", "keep_checkpoints")
        require_at_least(
            "train", self, 1, "micro_batch_size", "grad_accum", "micro_batch_tokens", "max_steps", null=True
        )
        require_at_least("train", self, 1, "pad_to_multiple", null=True)
        require_at_least("train", self, 2, "max_length")
        require_at_least("train", self, 0, "memory_budget_gb", strict=True)
        require_at_least("train", self, 0, "max_grad_norm", "save_every")
        require(
            self.compile_mode in COMPILE_MODES,
            "train.compile_mode",
            f"must be one of {', '.join(COMPILE_MODES)} (torch.compile's modes), got {self.compile_mode!r}",
        )
        if self.micro_batch_size and self.grad_accum:
            require(
                self.micro_batch_size * self.grad_accum == self.batch_size,
                "train.grad_accum",
                f"micro_batch_size x grad_accum = {self.micro_batch_size * self.grad_accum}, but "
                f"train.batch_size is {self.batch_size}; set train.batch_size too, or only one of the two",
            )

    def examples_per_micro_batch(self, world_size: int) -> int | None:
        """The fixed examples per micro-batch on one process, or None for micro-batches sized by tokens."""
        per_rank = math.ceil(self.batch_size / world_size)
        if self.micro_batch_size:
            return min(self.micro_batch_size, per_rank)
        if self.grad_accum:
            return math.ceil(per_rank / self.grad_accum)
        return None
