"""QLoRA training: a frozen (4-bit) base, a LoRA adapter that learns, the loss on answer tokens only.

The loss of an optimiser step is the mean NLL over the answer tokens of the whole step (`train.batch_size`
examples): each forward/backward pass adds its summed NLL divided by the step's answer-token count, so how the
step is split into passes (2 x 8, 16 x 1, groups of similar length, shares of several processes) changes the
speed and not the update. By default the passes group examples of similar length under a token budget sized
from GPU memory, so short examples are not padded to long ones and no memory sits idle.

Checkpoints hold the full state (checkpoint.py); dropout masks are drawn from a generator reseeded every step
from (seed, step, rank), so `train.resume=auto` continues to the same adapter as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adl_llm.batching import answer_nll, collate, pad_multiple, padded_width
from adl_llm.checkpoint import TrainState, complete_checkpoints, load_checkpoint, save_checkpoint
from adl_llm.config import Config, LoraConfig, OptimConfig, ResumeMode, ScheduleConfig, TrainConfig
from adl_llm.dequantize import dequantized_base
from adl_llm.distributed import all_reduce_sum, barrier, is_main, rank, sum_gradients, world_size
from adl_llm.encode import Encoded

log = logging.getLogger(__name__)
CPU_PASS_TOKENS = 4096  # padded tokens per pass on a CPU, where memory is rarely what limits
SAFETY = 0.85  # of the measured room: allocator fragmentation and lengths the probe did not see
RECOMPUTE_COST = 1.5  # a checkpointed pass's time over a plain one's (Gemma-3-270M on an H200: 1.5)
_GIB = 1024**3


def add_lora(model, cfg: LoraConfig):
    """A fresh, trainable LoRA adapter on `model`; every base weight stays frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = "all-linear" if list(cfg.target_modules) == ["all-linear"] else list(cfg.target_modules)
    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        bias=cfg.bias,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def make_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    return instantiate(OmegaConf.structured(cfg), params=params, betas=tuple(cfg.betas))


def make_scheduler(cfg: ScheduleConfig, optimizer, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.name.value]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def epoch_batches(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The example indices of each optimiser step of `epoch`: a seeded shuffle, so any position is replayable."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n_examples, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]


def fingerprint(cfg: Config) -> str:
    """A hash of the settings that shape the trained adapter (not how the batch is split or saved)."""
    shaping = {
        "model": asdict(cfg.model),
        "lora": asdict(cfg.lora),
        "optim": asdict(cfg.optim),
        "schedule": asdict(cfg.schedule),
        "data": asdict(cfg.data),
        "prompt": asdict(cfg.prompt),
        "seed": cfg.seed,
        "train": {
            k: getattr(cfg.train, k)
            for k in ("epochs", "batch_size", "max_length", "max_grad_norm", "init_from", "max_steps")
        },
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train(model, examples: Sequence[Encoded], cfg: Config, run_dir: Path, pad_id: int) -> TrainState:
    """Train the adapter of `model` on `examples`, checkpointing under `run_dir/checkpoints`.

    Under torchrun every rank calls this with the same examples; each takes its share of every step.
    """
    from peft import set_peft_model_state_dict

    tc = cfg.train
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    per_epoch = math.ceil(len(examples) / tc.batch_size)
    total = tc.max_steps or per_epoch * tc.epochs
    optimizer = make_optimizer(cfg.optim, trainable)
    scheduler = make_scheduler(cfg.schedule, optimizer, total)
    checkpoints = run_dir / "checkpoints"

    state = TrainState(fingerprint=fingerprint(cfg))
    found = complete_checkpoints(checkpoints) if tc.resume is ResumeMode.auto else []
    if found:
        state, adapter = load_checkpoint(found[-1], optimizer, scheduler, device, state.fingerprint)
        set_peft_model_state_dict(model, adapter)
        log.info("resuming from %s: step %d of %d", found[-1], state.global_step, total)

    restore_cpu_nf4_training_path(model)
    model.train()
    if tc.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    try:
        with dequantized_base(model, enabled=tc.dequantize_base, memory_limit=memory_limit(tc, device)):
            multiple = pad_multiple(tc.pad_to_multiple, device)
            layout = PassLayout(pass_token_budget(model, examples, tc, pad_id, device, multiple), multiple, pad_id)
            _train_steps(model, examples, cfg, state, optimizer, scheduler, total, checkpoints, layout)
    finally:  # evaluation and generation follow in the same process
        disable_gradient_checkpointing(model)
        model.eval()
    return state


def memory_limit(tc: TrainConfig, device) -> float:
    """Bytes training may fill: train.memory_budget_gb, at most 90% of the GPU's memory."""
    if device.type != "cuda":
        return tc.memory_budget_gb * _GIB
    return min(tc.memory_budget_gb * _GIB, 0.9 * torch.cuda.get_device_properties(device).total_memory)


@dataclass(frozen=True)
class PassLayout:
    """How a step's examples become forward/backward passes: padded tokens per pass, width multiple, pad id."""

    token_budget: int
    multiple: int
    pad_id: int


def _train_steps(model, examples, cfg: Config, state, optimizer, scheduler, total, checkpoints, layout: PassLayout):
    """The optimiser steps from `state` to `total`, with progress, TensorBoard scalars and checkpoints."""
    from peft import get_peft_model_state_dict

    tc = cfg.train
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    writer = _tensorboard(checkpoints.parent)
    bar = tqdm(total=total, initial=state.global_step, desc="train", unit="step", mininterval=2, disable=not is_main())
    batches = epoch_batches(len(examples), tc.batch_size, cfg.seed, state.epoch)
    while state.global_step < total:
        if state.step_in_epoch == len(batches):
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
            batches = epoch_batches(len(examples), tc.batch_size, cfg.seed, state.epoch)
            continue
        started = time.perf_counter()
        torch.manual_seed(cfg.seed * 1_000_003 + state.global_step * 1_009 + rank())  # dropout masks of this step
        batch = [examples[i] for i in batches[state.step_in_epoch]]
        n_scored = sum(ex.n_scored for ex in batch)  # the whole step's answer tokens, over all ranks
        passes = split_step(batch[rank() :: world_size()], tc, layout.token_budget, layout.multiple)
        nll, tokens = accumulate_gradients(model, passes, n_scored, layout.pad_id, device, layout.multiple)
        sum_gradients(trainable)
        totals = all_reduce_sum(torch.tensor([nll, float(tokens)], dtype=torch.float64, device=device))
        loss, tokens = float(totals[0]) / max(1, n_scored), int(totals[1])
        if tc.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, tc.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        state.global_step += 1
        state.step_in_epoch += 1
        state.losses.append(loss)
        state.step_seconds.append(seconds)
        state.step_tokens.append(tokens)
        state.tokens += tokens
        state.seconds += seconds
        if writer:
            writer.add_scalar("train/loss", loss, state.global_step)
            writer.add_scalar("train/lr", scheduler.get_last_lr()[0], state.global_step)
            writer.add_scalar("train/tokens_per_s", tokens / seconds, state.global_step)
        bar.set_postfix(epoch=state.epoch + 1, loss=f"{loss:.4f}", tok_s=f"{state.tokens / state.seconds:,.0f}")
        bar.update()
        if state.global_step == total or (tc.save_every and state.global_step % tc.save_every == 0):
            if is_main():
                adapter = get_peft_model_state_dict(model)
                save_checkpoint(checkpoints, state, adapter, optimizer, scheduler, tc.keep_checkpoints)
            barrier()
    bar.close()
    if writer:
        writer.close()


def split_step(batch: Sequence[Encoded], tc: TrainConfig, token_budget: int, multiple: int = 1) -> list[list[Encoded]]:
    """The forward/backward passes of one process's share of a step.

    A fixed split (train.micro_batch_size or train.grad_accum) keeps the data order, as the report's loop did;
    the automatic one sorts by length and fills each pass up to `token_budget` padded tokens.
    """
    fixed = tc.examples_per_pass(world_size())
    if fixed:
        return [list(batch[i : i + fixed]) for i in range(0, len(batch), fixed)]
    passes: list[list[Encoded]] = []
    for ex in sorted(batch, key=lambda ex: -len(ex.input_ids)):
        # Sorted longest first, so a pass's padded size is its first example's padded length times its size.
        if passes and padded_width(len(passes[-1][0].input_ids), multiple) * (len(passes[-1]) + 1) <= token_budget:
            passes[-1].append(ex)
        else:
            passes.append([ex])
    return passes


def pass_token_budget(
    model, examples: Sequence[Encoded], tc: TrainConfig, pad_id: int, device, multiple: int = 1
) -> int:
    """Padded tokens per pass: given, a CPU default, or measured on the GPU against train.memory_budget_gb.

    On a GPU, two passes of the longest example (once and twice) measure the memory of a pass as a fixed part
    plus a part per token; the budget is the pass that fits in memory_budget_gb next to the weights, the
    gradients and the optimiser state. With train.gradient_checkpointing left null, checkpointing is measured
    too and turned on when the first steps of an epoch, split as split_step splits them, take enough fewer passes
    to pay for recomputing the forward: a pass costs mostly the CPU's issuing of its kernels (docs/BENCHMARKS.md),
    so fewer, larger passes win.
    """
    if tc.micro_batch_tokens or tc.examples_per_pass(world_size()):
        return tc.micro_batch_tokens or 0
    if device.type != "cuda":
        return CPU_PASS_TOKENS
    longest = max(examples, key=lambda ex: len(ex.input_ids))
    length = padded_width(len(longest.input_ids), multiple)
    # This process's share of the first steps of an epoch, as split_step will cut them into passes.
    shares = [
        [examples[i] for i in step[rank() :: world_size()]]
        for step in epoch_batches(len(examples), tc.batch_size, 0, 0)[:32]
    ]

    def passes(budget: int | None) -> float:
        """Mean passes a step under `budget`, or infinity where the longest example does not fit."""
        if not budget or budget < length:
            return math.inf
        return sum(len(split_step(share, tc, budget, multiple)) for share in shares) / len(shares)

    plain = None if tc.gradient_checkpointing else _measured_budget(model, longest, tc, pad_id, device, multiple)
    plain_passes = passes(plain)
    if tc.gradient_checkpointing is False or plain_passes == 1:
        return max(plain or 0, length)
    enable_gradient_checkpointing(model)
    checkpointed = _measured_budget(model, longest, tc, pad_id, device, multiple)
    if tc.gradient_checkpointing is None:
        checkpointed_passes = passes(checkpointed)
        if plain_passes < math.inf and plain_passes <= RECOMPUTE_COST * checkpointed_passes:
            disable_gradient_checkpointing(model)
            return max(plain, length)
        log.info(
            "gradient checkpointing on: %.1f passes a step without it, %.1f with it", plain_passes, checkpointed_passes
        )
    if checkpointed is None:
        raise torch.OutOfMemoryError("a pass of the longest example does not fit, even with gradient checkpointing")
    return max(checkpointed, length)


def _measured_budget(model, longest: Encoded, tc: TrainConfig, pad_id: int, device, multiple: int) -> int | None:
    """Padded tokens per pass that fit train.memory_budget_gb as the model is now; None if the probe runs out."""
    length = padded_width(len(longest.input_ids), multiple)
    limit = memory_limit(tc, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device) + 16 * trainable  # + fp32 gradients and two Adam moments
    try:
        one, two = (_pass_peak(model, [longest] * n, pad_id, device, multiple) - base for n in (1, 2))
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return None
    per_token = max((two - one) / length, 1.0)
    fixed = max(one - per_token * length, 0.0)
    budget = int(SAFETY * (limit - base - fixed) / per_token)
    log.info(
        "%s: passes of up to %d padded tokens (%.0f KiB per token + %.0f MiB, budget %.1f GiB)",
        "checkpointing" if checkpointing_on(model) else "no checkpointing",
        budget,
        per_token / 1024,
        fixed / 2**20,
        limit / _GIB,
    )
    return budget


def _pass_peak(model, examples: Sequence[Encoded], pad_id: int, device, multiple: int) -> int:
    """Peak allocated bytes of one forward/backward pass over `examples` (its gradient is dropped)."""
    torch.cuda.reset_peak_memory_stats(device)
    accumulate_gradients(model, [examples], 1, pad_id, device, multiple)
    model.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated(device)


def enable_gradient_checkpointing(model) -> None:
    if not checkpointing_on(model):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def disable_gradient_checkpointing(model) -> None:
    """Off again, with the hook that enabling put on the input embeddings (transformers leaves it on a PEFT model)."""
    if not checkpointing_on(model):
        return
    model.gradient_checkpointing_disable()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "_require_grads_hook"):
        base.disable_input_require_grads()


def checkpointing_on(model) -> bool:
    """Whether any layer recomputes its activations (transformers' flag, read the same way in 4.x and 5.x)."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def accumulate_gradients(
    model, passes: Sequence[Sequence[Encoded]], n_scored: int, pad_id: int, device, multiple: int = 1
) -> tuple[float, int]:
    """Add the gradient of (summed answer-token NLL of `passes`) / `n_scored`, the step's answer-token count.

    Returns the summed NLL and the input tokens of these passes.
    """
    total_nll = torch.zeros((), device=device)
    tokens = 0
    for examples in passes:
        batch = collate(examples, pad_id, device, multiple=multiple)
        nll = answer_nll(model, batch).nll.sum()
        (nll / max(1, n_scored)).backward()
        total_nll += nll.detach()
        tokens += batch.n_tokens
    return float(total_nll), tokens


def _tensorboard(run_dir: Path):
    if not is_main():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # a hand-made environment without the tensorboard package: train all the same
        log.warning("the tensorboard package is missing: no TensorBoard logs (the loss is in metrics.json)")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def restore_cpu_nf4_training_path(model) -> None:
    """Undo bitsandbytes' CPU inference packing of NF4 weights, under which LoRA gets no gradients.

    On a CPU with AVX512-BF16, a 4-bit layer run in eval mode without grad repacks its weight for a fast
    inference kernel; a model evaluated before training (in the same process) then trains nothing, silently.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit) and getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            weight = module.weight
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
