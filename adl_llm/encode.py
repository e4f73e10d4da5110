"""Example -> token ids and labels, exactly as the course metric builds them.

    ids    = [BOS] + tok(prompt) + tok(answer) + [EOS], then cut to max_length
    labels = -100 on BOS and the prompt, the ids themselves on the answer and EOS

Prompt and answer are tokenised apart (no special tokens), so no token straddles the boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

IGNORE = -100  # label of a position that is not scored


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool  # the example was longer than max_length and lost its tail

    @property
    def n_scored(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def encode_examples(tokenizer, prompts: Sequence[str], answers: Sequence[str], max_length: int) -> list[Encoded]:
    """Encode prompt/answer pairs in one batched tokenizer call per side."""
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    encoded = []
    for prompt, answer in zip(prompt_ids, answer_ids, strict=True):
        head, tail = bos + prompt, answer + eos
        ids = head + tail
        labels = [IGNORE] * len(head) + tail
        encoded.append(Encoded(ids[:max_length], labels[:max_length], truncated=len(ids) > max_length))
    return encoded
