"""The `optim` and `schedule` groups: any torch or bitsandbytes optimiser with its own arguments, and transformers'
learning-rate schedules by their own names.

`check_optim_and_schedule` runs before any model loads, so `optim._target_=torch.optim.Adamw`, `+optim.momentum=0.9`
on AdamW or a schedule without its own arguments is one line naming the key, not a traceback minutes later.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math

import torch

from adl_llm.config import OptimConfig, ScheduleConfig
from adl_llm.errors import ConfigError


def optimizer_class(cfg: OptimConfig) -> type[torch.optim.Optimizer]:
    """The class `optim._target_` names, once its arguments are known to fit its signature."""
    module_name, _, class_name = cfg.target.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ConfigError("optim._target_", f"cannot import {cfg.target} ({err})") from None
    if not (isinstance(found, type) and issubclass(found, torch.optim.Optimizer)):
        raise ConfigError("optim._target_", f"{cfg.target} is not a torch optimiser class")
    parameters = inspect.signature(found.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    known = [name for name in parameters if name not in ("self", "params")]
    for name in cfg.arguments if not takes_any else ():
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean optim.{close[0]}?)" if close else f"; it takes {', '.join(known)}"
            raise ConfigError(f"optim.{name}", f"{class_name} takes no argument {name}{hint}")
    return found


def make_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    # YAML lists become tuples (betas); every other value goes in as written.
    arguments = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.arguments.items()}
    try:
        return optimizer_class(cfg)(params, lr=cfg.lr, **arguments)
    except (TypeError, ValueError) as err:  # a value the class refuses, e.g. betas out of range
        raise ConfigError("optim", f"{cfg.target} refused its arguments: {err}") from None


def make_scheduler(cfg: ScheduleConfig, optimizer, total_steps: int):
    """transformers' schedule `schedule.name` over `total_steps` optimiser steps, after the warm-up."""
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    try:
        return get_scheduler(
            cfg.name.value,
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=total_steps,
            scheduler_specific_kwargs=dict(cfg.scheduler_specific_kwargs),
        )
    except (TypeError, ValueError) as err:  # a schedule that needs an argument, or one it does not take
        raise ConfigError("schedule.scheduler_specific_kwargs", f"{cfg.name.value}: {err}") from None


def check_optim_and_schedule(optim: OptimConfig, schedule: ScheduleConfig) -> None:
    """Refuse, before any model loads, an optimiser or schedule that training would refuse."""
    optimizer_class(optim)
    make_scheduler(schedule, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr), 100)
