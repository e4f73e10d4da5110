"""Where the time of one adl-llm training step goes: torch.profiler over a few steps, the top operators printed.

    python -m bench.profile_train --model-path /tmp/adl_cache/models/gemma3-270m --out $OUT/profile
    torchrun --standalone --nproc_per_node=2 -m bench.profile_train --model-path /tmp/llama7b --out $OUT/profile

A step is the forward/backward passes over the first `--examples` training records (a default step of 16), cut
into micro-batches and checkpointed as training would (the memory plan), then the gradient sum over the ranks.
Under torchrun each rank takes its share of the step, and writes its own table (profile-rank<r>.txt); the time of
the gradient all-reduce alone is measured apart. The wall time per step with and without the profiler, and the
busy time of the GPU within it, say whether the step waits on the GPU, on Python and kernel launches, or on the
other rank.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType

from adl_llm import nf4_graph
from adl_llm.compiled_layers import compiled_layers
from adl_llm.config import compose
from adl_llm.data import load_records
from adl_llm.distributed import barrier, init_from_env, rank, shutdown, sum_gradients, world_size
from adl_llm.encode import encode_examples
from adl_llm.loss import accumulate_gradients
from adl_llm.memory import memory_limit
from adl_llm.micro_batches import plan_micro_batches, rank_share, split_step
from adl_llm.modeling import (
    add_lora,
    attention_kernels,
    load_model,
    load_tokenizer,
    model_source,
    set_gradient_checkpointing,
)
from adl_llm.nf4 import dequantized_base, restore_cpu_nf4_training_path
from adl_llm.packing import packs
from adl_llm.prompts import build_prompts
from adl_llm.tasks import model_settings
from bench import measure


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default="embedded:gemma3-270m")
    parser.add_argument("--examples", type=int, default=16, help="examples in the profiled step, over all ranks")
    parser.add_argument("--passes", type=int, default=5, help="profiled steps, after as many warm-up steps")
    parser.add_argument("--out", type=Path, required=True, help="folder for the tables (and the trace)")
    parser.add_argument("--trace", action="store_true", help="also write a Chrome trace (tens of MB)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="the decoder layers compiled, as a GPU training run has them by default (train.compile); else eager",
    )
    parser.add_argument(
        "--compile-mode", help="torch.compile's mode for them (e.g. reduce-overhead: CUDA graphs); an experiment"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    init_from_env()

    cfg = compose(f"model.name_or_path={args.model_path}")
    source = model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    records = load_records(cfg.data.train_file, need_outputs=True, limit=args.examples)
    prompts = build_prompts([r.instruction for r in records], cfg.prompt)
    examples = encode_examples(tokenizer, prompts, [r.output for r in records], cfg.train.max_length)
    compile_on = args.compile or args.compile_mode is not None
    model = add_lora(load_model(model_settings(cfg, compiled=compile_on), source=source), cfg.lora)
    packed = packs(cfg.train.packing, model, examples, next(model.parameters()).device)  # as train() decides it
    restore_cpu_nf4_training_path(model)
    model.train()
    device = next(model.parameters()).device
    n_scored = sum(ex.n_scored for ex in examples)
    trainable = [p for p in model.parameters() if p.requires_grad]
    defaults = contextlib.ExitStack()  # the kernels and the base that training uses by default
    defaults.enter_context(attention_kernels(cfg.model.cudnn_attention))
    limit = memory_limit(cfg.train.memory_budget_gb, device)
    defaults.enter_context(dequantized_base(model, enabled=cfg.train.dequantize_base, memory_limit=limit))
    defaults.enter_context(compiled_layers(model, compile_on, mode=args.compile_mode))
    plan = plan_micro_batches(model, examples, cfg.train, tokenizer.pad_token_id, device, packed)
    set_gradient_checkpointing(model, plan.gradient_checkpointing)
    nf4_graph.recompute_weights(plan.recompute_nf4)
    share = rank_share(examples, cfg.train, packed)
    micro_batches = split_step(share, cfg.train, plan.tokens, plan.multiple, packed)
    accumulate = functools.partial(
        accumulate_gradients,
        model,
        micro_batches,
        n_scored,
        tokenizer.pad_token_id,
        device,
        plan.multiple,
        rows=plan.rows,
    )

    def one_pass() -> None:
        accumulate()
        sum_gradients(trainable)
        model.zero_grad(set_to_none=True)

    def all_reduce() -> float:
        accumulate()
        measure.sync()
        barrier()  # both ranks ready: the time is the all-reduce's, not a wait for the slower rank
        measure.sync()
        started = measure.now()
        for _ in range(args.passes):
            sum_gradients(trainable)
        measure.sync()
        model.zero_grad(set_to_none=True)
        return (measure.now() - started) / args.passes

    for _ in range(args.passes):  # warm-up: allocator, kernels, caches
        one_pass()
    started = measure.now()
    for _ in range(args.passes):
        one_pass()
    plain = (measure.now() - started) / args.passes

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    started = measure.now()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.passes):
            one_pass()
        measure.sync()
    profiled = (measure.now() - started) / args.passes
    if args.trace:
        prof.export_chrome_trace(str(args.out / "trace.json"))
    averages = prof.key_averages()
    kernels = [e for e in averages if e.device_type == DeviceType.CUDA]
    layers = f"compiled (mode {args.compile_mode or 'default'})" if compile_on else "eager"
    launches = sum(e.count for e in kernels) / args.passes
    gpu_busy = measure.gpu_busy_seconds(prof) / args.passes
    mine = [ex for batch in micro_batches for ex in batch]
    lines = [
        f"rank {rank()} of {world_size()}: {len(mine)} of {args.examples} examples, "
        f"{sum(len(e.input_ids) for e in mine)} tokens a step in {len(micro_batches)} micro-batch(es), gradient "
        f"checkpointing {'on' if plan.gradient_checkpointing else 'off'}, decoder layers {layers}, on {measure.card()}",
        f"wall time a step: {plain * 1000:.1f} ms without the profiler, {profiled * 1000:.1f} ms with it",
        f"GPU busy a step (some kernel running): {gpu_busy * 1000:.1f} ms, {gpu_busy / profiled:.0%} of the profiled "
        f"step; kernels launched a step: {launches:.0f}",
        f"gradient all-reduce alone ({sum(p.numel() for p in trainable):,} values): {all_reduce() * 1000:.1f} ms",
        "",
        averages.table(sort_by="self_cpu_time_total", row_limit=30),
    ]
    if device.type == "cuda":
        lines.append(averages.table(sort_by="self_device_time_total", row_limit=30))
    defaults.close()
    report = "\n".join(lines)
    name = "profile.txt" if world_size() == 1 else f"profile-rank{rank()}.txt"
    (args.out / name).write_text(report, encoding="utf-8")
    if rank() == 0:
        print(report, flush=True)
    print(f"at {time.strftime('%H:%M:%S')} wrote {args.out}/{name}", flush=True)
    shutdown()


if __name__ == "__main__":
    main()
