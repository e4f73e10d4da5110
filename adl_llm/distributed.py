"""Data parallelism under `torchrun`: which process this is, and the few collectives the tasks need.

Started by torchrun (WORLD_SIZE > 1), every process holds its own copy of the (NF4) base and the adapter.
Training splits each optimiser step's examples across the ranks and sums the adapter's gradients with one
all-reduce per step, so every rank makes the same update as one process with the whole batch; perplexity and
generation split the examples and gather the results back in order. Without torchrun all of this is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Only the main process writes adapters, checkpoints, metrics and summaries."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> None:
    """Join the process group torchrun describes: NCCL between GPUs, gloo between CPU processes."""
    if not launched_by_torchrun() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    else:
        dist.init_process_group("gloo")


def shutdown() -> None:
    """Leave the process group (NCCL warns of leaked resources otherwise)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(value: T) -> T:
    """The main process's `value`, on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients over the ranks with one flat all-reduce (LoRA gradients are a few MB); a rank with none
    adds zeros, so every rank reduces the same tensor."""
    if not dist.is_initialized():
        return
    for p in params:
        if p.grad is None:  # a rank without examples this step (a last step of fewer examples than ranks)
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def map_in_order(items: Sequence[int], work: Callable[[list[int]], list[T]]) -> dict[int, T]:
    """Run `work` on this rank's share of `items` (every world_size-th, so lengths stay balanced when `items`
    is sorted); return {item: result} for all items, gathered from every rank."""
    share = list(items[rank() :: world_size()])
    mine = dict(zip(share, work(share)))
    if not dist.is_initialized():
        return mine
    parts: list[dict[int, T] | None] = [None] * world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in (part or {}).items()}
