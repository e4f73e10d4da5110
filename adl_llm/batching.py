"""Batches: which examples form each optimiser step, and tensors of them: right-padded rows, their widths rounded up to
a few sizes on a GPU, or rows of several examples end to end (`train.packing`, packing.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adl_llm.encode import IGNORE, Encoded

# On a GPU every new batch shape costs once (kernel plans, allocator blocks) and lengths vary from batch to batch,
# so widths are rounded up to a few buckets; on a CPU the padding would be paid for in compute instead.
GPU_PAD_MULTIPLE = 64
# A CPU computes near its peak even on small batches, and every pad token costs it as much as a real one, so there
# batches are cut by padded tokens: Gemma-3-270M on 2 AVX2 cores trains 1.26x and scores 1.66x faster at 1024 than
# with a step or a batch of 64 in one piece (README, "On CPU").
CPU_BATCH_TOKENS = 1024


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L], right-padded
    attention_mask: torch.Tensor  # [B, L], 0 on pads
    labels: torch.Tensor  # [B, L], IGNORE on the prompt and pads
    # Packed rows: each example's positions from 0, so the model keeps the examples of a row apart (the model gets
    # these instead of the attention mask, which then only marks the padding at the rows' ends).
    position_ids: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) input tokens."""
        return int(self.attention_mask.sum())


def pad_multiple(setting: int | None, device: torch.device) -> int:
    """The padded width's multiple: `setting`, or by default GPU_PAD_MULTIPLE on a GPU and 1 on a CPU."""
    return setting or (GPU_PAD_MULTIPLE if device.type == "cuda" else 1)


def padded_width(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def pad_right(rows: Sequence[list[int]], value: int, multiple: int = 1) -> torch.Tensor:
    width = padded_width(max(len(row) for row in rows), multiple)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)


def collate(
    examples: Sequence[Encoded], pad_id: int, device: torch.device | str = "cpu", *, multiple: int = 1
) -> Batch:
    """Right-padded to the longest example, rounded up to `multiple` columns."""
    return Batch(
        input_ids=pad_right([ex.input_ids for ex in examples], pad_id, multiple).to(device),
        attention_mask=pad_right([[1] * len(ex.input_ids) for ex in examples], 0, multiple).to(device),
        labels=pad_right([ex.labels for ex in examples], IGNORE, multiple).to(device),
    )


def epoch_batches(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The example indices of each optimiser step of `epoch`: a seeded shuffle, so any position is replayable."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n_examples, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]
