"""Where the time of one adl-llm training pass goes: torch.profiler over a few passes, the top operators printed.

    python -m bench.profile_train --model-path /tmp/adl_cache/models/gemma3-270m --out $OUT/profile

A pass is one forward/backward over the first `--examples` training records (a default step of 16). The
wall time per pass with and without the profiler, and the busy time of the GPU within it, say whether the
pass waits on the GPU or on Python and kernel launches.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

from adl_llm.batching import pad_multiple
from adl_llm.config import compose
from adl_llm.data import load_records
from adl_llm.encode import encode_examples
from adl_llm.loss import accumulate_gradients
from adl_llm.memory import memory_limit
from adl_llm.modeling import add_lora, attention_kernels, load_model, load_tokenizer, model_source
from adl_llm.nf4 import dequantized_base, restore_cpu_nf4_training_path
from adl_llm.prompts import build_prompts
from bench import measure


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default="embedded:gemma3-270m")
    parser.add_argument("--examples", type=int, default=16, help="examples in the profiled pass")
    parser.add_argument("--passes", type=int, default=5, help="profiled passes, after as many warm-up passes")
    parser.add_argument("--out", type=Path, required=True, help="folder for the tables (and the trace)")
    parser.add_argument("--trace", action="store_true", help="also write a Chrome trace (tens of MB)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    cfg = compose(f"model.name_or_path={args.model_path}")
    source = model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    records = load_records(cfg.data.train_file, need_outputs=True, limit=args.examples)
    prompts = build_prompts([r.instruction for r in records], cfg.prompt)
    examples = encode_examples(tokenizer, prompts, [r.output for r in records], cfg.train.max_length)
    model = add_lora(load_model(cfg.model, source=source), cfg.lora)
    restore_cpu_nf4_training_path(model)
    model.train()
    device = next(model.parameters()).device
    n_scored = sum(ex.n_scored for ex in examples)
    multiple = pad_multiple(cfg.train.pad_to_multiple, device)
    defaults = contextlib.ExitStack()  # the kernels and the base that training uses by default
    defaults.enter_context(attention_kernels(cfg.model.cudnn_attention))
    limit = memory_limit(cfg.train.memory_budget_gb, device)
    defaults.enter_context(dequantized_base(model, enabled=cfg.train.dequantize_base, memory_limit=limit))

    def one_pass() -> None:
        accumulate_gradients(model, [examples], n_scored, tokenizer.pad_token_id, device, multiple)
        model.zero_grad(set_to_none=True)

    for _ in range(args.passes):  # warm-up: allocator, kernels, caches
        one_pass()
    started = measure.now()
    for _ in range(args.passes):
        one_pass()
    plain = (measure.now() - started) / args.passes

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.passes):
            one_pass()
        measure.sync()
    if args.trace:
        prof.export_chrome_trace(str(args.out / "trace.json"))
    averages = prof.key_averages()
    gpu_busy = sum(e.self_device_time_total for e in averages) / 1e6 / args.passes
    lines = [
        f"{args.examples} examples, {sum(len(e.input_ids) for e in examples)} tokens a pass on {measure.card()}",
        f"wall time a pass: {plain * 1000:.1f} ms without the profiler",
        f"GPU busy a pass (sum of kernel times): {gpu_busy * 1000:.1f} ms",
        "",
        averages.table(sort_by="self_cpu_time_total", row_limit=30),
    ]
    if device.type == "cuda":
        lines.append(averages.table(sort_by="self_device_time_total", row_limit=30))
    defaults.close()
    report = "\n".join(lines)
    (args.out / "profile.txt").write_text(report, encoding="utf-8")
    print(report, flush=True)
    print(f"at {time.strftime('%H:%M:%S')} wrote {args.out}/profile.txt", flush=True)


if __name__ == "__main__":
    main()
