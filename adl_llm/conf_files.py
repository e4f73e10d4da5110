"""Where the configuration lives: `conf/`, each schema's defaults read from it, and the run stamp of folder names.

`@defaults_from("lora/report")` gives a dataclass the values of its group's default option, so a dataclass built in
code (`LoraConfig()`) and a composed config agree, a key's default has one place to change, and another option
(`gen=greedy`) lists only what it changes. A key in code that `conf/` does not show is an error at import.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import enum
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from adl_llm.errors import ConfigError

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


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def require_at_least(
    group: str, obj: Any, minimum: float, *names: str, strict: bool = False, null: bool = False
) -> None:
    """`group.name: must be >= minimum (or null), got value` for the first of `names` out of range."""
    for name in names:
        value = getattr(obj, name)
        if value is None and null:
            continue
        bound = f"{'>' if strict else '>='} {minimum:g}{' or null' if null else ''}"
        require(value > minimum if strict else value >= minimum, f"{group}.{name}", f"must be {bound}, got {value}")
