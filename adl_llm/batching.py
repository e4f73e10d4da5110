"""Right-padded batches of encoded examples, and logits only where answer tokens are predicted.

With a 262k-token vocabulary (Gemma 3) the logits of every position are the largest tensor of a step;
projecting only the span of positions that predict answer tokens keeps them small, and the result per
position is the same as with full logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adl_llm.encode import IGNORE, Encoded


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L], right-padded
    attention_mask: torch.Tensor  # [B, L], 0 on pads
    labels: torch.Tensor  # [B, L], IGNORE on the prompt and pads

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) input tokens."""
        return int(self.attention_mask.sum())


def pad_right(rows: Sequence[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)


def collate(examples: Sequence[Encoded], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    return Batch(
        input_ids=pad_right([ex.input_ids for ex in examples], pad_id).to(device),
        attention_mask=pad_right([[1] * len(ex.input_ids) for ex in examples], 0).to(device),
        labels=pad_right([ex.labels for ex in examples], IGNORE).to(device),
    )


def answer_logits(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, K, V] at the positions that predict answer tokens, and those tokens [B, K] (IGNORE elsewhere).

    Position t predicts token t+1, so the kept span starts one before the batch's first scored token.
    """
    scored = batch.labels[:, 1:] != IGNORE
    columns = scored.any(dim=0).nonzero()
    first = int(columns[0]) if len(columns) else 0
    keep = torch.arange(first, batch.labels.shape[1] - 1, device=batch.labels.device)
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep, use_cache=False
    ).logits
    return logits, batch.labels[:, first + 1 :]
