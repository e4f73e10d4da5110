"""The schemas of the evaluation and decoding groups: `eval` (the course perplexity) and `gen`."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from adl_llm.conf_files import defaults_from, require, require_at_least


class LongPrompts(enum.Enum):
    cut_left = "cut_left"  # keep the prompt's end, where the question is, as far as gen.max_prompt_tokens allows
    refuse = "refuse"  # stop the run, naming the record


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
    max_prompt_tokens: int | None
    long_prompts: LongPrompts
    dequantize: bool | None
    static_cache: bool | None
    compile: bool
    fused_sampling: bool | None
    nf4_graph: bool | None
    defer_syncs: bool | None

    def __post_init__(self) -> None:
        require_at_least("gen", self, 1, "beams", "max_new_tokens")
        require_at_least("gen", self, 1, "batch_size", null=True)
        require_at_least("gen", self, 2, "max_prompt_tokens", null=True)
        require_at_least("gen", self, 0, "top_k")  # 0 disables it
        require_at_least("gen", self, 0, "temperature", "memory_budget_gb", strict=True)
        require(0.0 < self.top_p <= 1.0, "gen.top_p", f"must be in (0, 1], got {self.top_p}")
        require(all(self.stop_strings), "gen.stop_strings", "must not contain an empty string")


@dataclass
@defaults_from("eval/default")
class EvalConfig:
    batch_size: int
    max_length: int
    pad_to_multiple: int | None
    share_prefix: bool

    def __post_init__(self) -> None:
        require_at_least("eval", self, 1, "batch_size")
        require_at_least("eval", self, 2, "max_length")
        require_at_least("eval", self, 1, "pad_to_multiple", null=True)
