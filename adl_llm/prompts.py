"""Prompt builders: the seed report's zero-shot prompt and its numbered few-shot variant.

zero-shot: {system}USER: {instruction} ASSISTANT:
few-shot:  {system}以下是範例：\\n1. USER: … ASSISTANT: …\\n…請作答： USER: {instruction} ASSISTANT:
"""

from __future__ import annotations

from collections.abc import Sequence

from adl_llm.config import Config, PromptConfig
from adl_llm.data import Record, few_shot_examples, load_records


def shots_block(cfg: PromptConfig, shots: Sequence[Record]) -> str:
    """The fixed worked-examples part of a few-shot prompt ('' when there are no shots)."""
    if not shots:
        return ""
    examples = (
        cfg.shot_template.format(n=n, instruction=shot.instruction, output=shot.output)
        for n, shot in enumerate(shots, 1)
    )
    return cfg.shots_intro + "".join(examples)


def build_prompts(instructions: Sequence[str], cfg: PromptConfig, shots: Sequence[Record] = ()) -> list[str]:
    """The full prompt of each instruction; an answer is appended to its prompt unchanged."""
    prefix = cfg.system + shots_block(cfg, shots)
    return [prefix + cfg.query_template.format(instruction=instruction) for instruction in instructions]


def load_shots(cfg: Config) -> list[Record]:
    """The few-shot examples the prompt group asks for (none for zero-shot), from the training file."""
    if not cfg.prompt.n_shots:
        return []
    return few_shot_examples(load_records(cfg.data.train_file, need_outputs=True), cfg.prompt.n_shots)
