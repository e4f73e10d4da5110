"""QLoRA training: a frozen (4-bit) base, a LoRA adapter that learns, the loss on answer tokens only (loss.py).

Each optimiser step takes `train.batch_size` examples in a seeded order, cuts its share of them into micro-batches
(micro_batches.py), adds their gradients, sums them over the processes, clips and steps. Checkpoints hold the full
state (checkpoint.py); dropout masks are drawn from a generator reseeded every step from (seed, step, rank), so
`train.resume=auto` continues to the same adapter as an uninterrupted run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adl_llm import nf4_graph
from adl_llm.batching import epoch_batches
from adl_llm.checkpoint import TrainState, load_latest_checkpoint, save_checkpoint
from adl_llm.compiled_layers import compiled_layers, training_compiles
from adl_llm.config import Config, ResumeMode, TrainConfig
from adl_llm.distributed import all_reduce_sum, barrier, broadcast_object, is_main, rank, sum_gradients
from adl_llm.encode import Encoded
from adl_llm.errors import RunFailed
from adl_llm.loss import accumulate_gradients
from adl_llm.memory import memory_limit
from adl_llm.micro_batches import MicroBatchPlan, plan_micro_batches, rank_share, split_step
from adl_llm.modeling import set_gradient_checkpointing, weight_dtype
from adl_llm.nf4 import dequantized_base, restore_cpu_nf4_training_path
from adl_llm.optim import make_optimizer, make_scheduler
from adl_llm.packing import packs
from adl_llm.precision import autocast_forward

log = logging.getLogger(__name__)


def train(model, examples: Sequence[Encoded], cfg: Config, run_dir: Path, pad_id: int) -> TrainState:
    """Train the adapter of `model` on `examples`, checkpointing under `run_dir/checkpoints`.

    Under torchrun every rank calls this with the same examples; each takes its share of every step.
    """
    from peft import get_peft_model_state_dict

    tc = cfg.train
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    total = planned_steps(len(examples), cfg)
    optimizer = make_optimizer(cfg.optim, trainable)
    scheduler = make_scheduler(cfg.schedule, optimizer, total)
    checkpoints = run_dir / "checkpoints"
    state = _resume(model, cfg, checkpoints, optimizer, scheduler, device, total)
    # Before the CPU NF4 path is restored (the probe runs in eval mode); rank 0's answer, so every rank cuts alike.
    packed = broadcast_object(packs(tc.packing, model, examples, device))

    restore_cpu_nf4_training_path(model)
    model.train()
    writer = _tensorboard(run_dir)
    bar = tqdm(total=total, initial=state.global_step, desc="train", unit="step", mininterval=2, disable=not is_main())
    limit = memory_limit(tc.memory_budget_gb, device)
    compiles = training_compiles(tc.compile, device)
    if tc.compile_mode != "default" and not compiles:
        log.warning(
            "train.compile_mode=%s has no effect: the decoder layers are not compiled (train.compile=%s, on %s)",
            tc.compile_mode,
            "null" if tc.compile is None else str(tc.compile).lower(),
            device.type,
        )
    try:
        with (
            autocast_forward(model, tc.autocast, weight_dtype(cfg.model, device), device),
            dequantized_base(model, enabled=tc.dequantize_base, memory_limit=limit),
            compiled_layers(model, compiles, tc.compile_mode) as compiled,
        ):
            plan_passes = functools.partial(_plan, model, examples, tc, pad_id, device, packed)
            plan = compiled.run(plan_passes)

            def eager_plan() -> None:  # eager layers, or kept NF4 weights, may need more memory a pass
                nonlocal plan
                plan = plan_passes()

            batches = epoch_batches(len(examples), tc.batch_size, cfg.seed, state.epoch)
            while state.global_step < total:
                if state.step_in_epoch == len(batches):
                    state.next_epoch()
                    batches = epoch_batches(len(examples), tc.batch_size, cfg.seed, state.epoch)
                started = time.perf_counter()
                batch = [examples[i] for i in batches[state.step_in_epoch]]
                n_scored = sum(ex.n_scored for ex in batch)  # the whole step's answer tokens, over all ranks

                def step_gradients(batch=batch, n_scored=n_scored) -> tuple[float, int]:
                    torch.manual_seed(cfg.seed * 1_000_003 + state.global_step * 1_009 + rank())  # this step's dropout
                    share = rank_share(batch, tc, plan.packed)
                    micro_batches = split_step(share, tc, plan.tokens, plan.multiple, plan.packed)
                    return accumulate_gradients(
                        model, micro_batches, n_scored, pad_id, device, plan.multiple, rows=plan.rows
                    )

                nll, tokens = compiled.run(step_gradients, on_fallback=eager_plan)
                state.compiled_steps += compiled.count > 0
                sum_gradients(trainable)
                totals = all_reduce_sum(torch.tensor([nll, float(tokens)], dtype=torch.float64, device=device))
                loss = float(totals[0]) / max(1, n_scored)
                norm = torch.nn.utils.clip_grad_norm_(trainable, tc.max_grad_norm or math.inf)
                _refuse_non_finite(loss, norm, state.global_step + 1, cfg)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.record_step(loss, int(totals[1]), time.perf_counter() - started)

                _report_step(state, writer, bar, scheduler.get_last_lr()[0])
                if state.global_step == total or (tc.save_every and state.global_step % tc.save_every == 0):
                    if is_main():
                        adapter = get_peft_model_state_dict(model)
                        save_checkpoint(checkpoints, state, adapter, optimizer, scheduler, tc.keep_checkpoints)
                    barrier()
    finally:  # evaluation and generation follow in the same process
        set_gradient_checkpointing(model, False)
        model.eval()
        bar.close()
        if writer:
            writer.close()
    return state


def _plan(model, examples: Sequence[Encoded], tc: TrainConfig, pad_id: int, device, packed: bool) -> MicroBatchPlan:
    """The micro-batches and checkpointing of the passes to come (measured on a GPU), set on the model and logged."""
    plan = plan_micro_batches(model, examples, tc, pad_id, device, packed)
    set_gradient_checkpointing(model, plan.gradient_checkpointing)
    nf4_graph.recompute_weights(plan.recompute_nf4)
    if plan.rows is not None:
        size = f"up to {plan.tokens} tokens, in packed rows" if plan.tokens else "fixed sizes, in packed rows"
        if math.isfinite(plan.rows.break_even):  # packing.packed_rows: where more, narrower rows pay
            size += f" (attention costs a row's linear layers at {plan.rows.break_even:,.0f} tokens wide)"
    else:
        size = f"up to {plan.tokens} padded tokens" if plan.tokens else "fixed sizes"
    log.info(
        "micro-batches: %s, widths rounded up to %d, gradient checkpointing %s",
        size,
        plan.multiple,
        "on"
        if plan.gradient_checkpointing
        else "off (NF4 weights dequantised again in the backward pass)"
        if plan.recompute_nf4
        else "off",
    )
    return plan


def planned_steps(n_examples: int, cfg: Config) -> int:
    """Optimiser steps of the stage: train.epochs over the examples, capped by train.max_steps."""
    steps = math.ceil(n_examples / cfg.train.batch_size) * cfg.train.epochs
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def _refuse_non_finite(loss: float, grad_norm: torch.Tensor, step: int, cfg: Config) -> None:
    """Stop before a non-finite loss or gradient reaches the adapter: nothing after it could be trusted."""
    if math.isfinite(loss) and bool(torch.isfinite(grad_norm)):
        return
    what = "the loss" if not math.isfinite(loss) else "the gradient norm"
    raise RunFailed(
        f"{what} became {loss if what == 'the loss' else float(grad_norm)} at step {step}; nothing was saved from "
        f"this step on (optim.lr={cfg.optim.lr:g}: lower it, or check the data and train.max_grad_norm)"
    )


def fingerprint(cfg: Config) -> str:
    """A hash of the settings that shape the trained adapter (not how the step is cut or saved)."""
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


def _resume(model, cfg: Config, checkpoints: Path, optimizer, scheduler, device, total: int) -> TrainState:
    """The state of the run folder's last complete checkpoint (adapter, optimiser and scheduler restored), or a
    fresh one."""
    from peft import set_peft_model_state_dict

    fresh = TrainState(fingerprint=fingerprint(cfg))
    if cfg.train.resume is not ResumeMode.auto:
        return fresh
    found = load_latest_checkpoint(checkpoints, optimizer, scheduler, device, fresh.fingerprint)
    if found is None:
        return fresh
    state, adapter = found
    set_peft_model_state_dict(model, adapter)
    log.info("resuming from %s: step %d of %d", checkpoints, state.global_step, total)
    return state


def _report_step(state: TrainState, writer, bar, lr: float) -> None:
    """The step's loss, learning rate and speed: to TensorBoard and the progress bar."""
    if writer:
        writer.add_scalar("train/loss", state.losses[-1], state.global_step)
        writer.add_scalar("train/lr", lr, state.global_step)
        writer.add_scalar("train/tokens_per_s", state.step_tokens[-1] / state.step_seconds[-1], state.global_step)
    bar.set_postfix(epoch=state.epoch + 1, loss=f"{state.losses[-1]:.4f}", tok_s=f"{state.tokens_per_s:,.0f}")
    bar.update()


def _tensorboard(run_dir: Path):
    if not is_main():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # a hand-made environment without the tensorboard package: train all the same
        log.warning("the tensorboard package is missing: no TensorBoard logs (the loss is in metrics.json)")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
