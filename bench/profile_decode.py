"""Where the time of a decoding step goes: one batch of prompts decoded on each path, under torch.profiler.

    python -m bench.profile_decode --model-path /tmp/adl_cache/models/gemma3-270m --adapter /tmp/stage/adapter \
        --out $OUT/profile-decode
    python -m bench.profile_decode --model-path /tmp/tiny --prompts 4 --out /tmp/pd     # a CPU check

Each path (plain: bitsandbytes' layers and a dynamic cache; default: what a generate job takes on this device;
dequantize: gen.dequantize=true; compiled: gen.compile=true; warpers: transformers' sampling warpers instead of the
fused sampling; compiled_undeferred: compiled, with the stop and fallback tests read at every step) decodes the first
`--prompts` public-test prompts in one batch, greedily (or `--gen report --beams N`), `--new-tokens` tokens with no
stop strings (unless `--stops`), so every step runs. After a warm-up, the wall time of that decoding is timed without
the profiler, then profiled once: the kernels launched and the time the GPU is busy a step against the wall time a
step say whether the step waits on the card or on Python and launches. The host's waits for the card a step are
counted, and with `--sync-sources` each wait is traced to the line of adl_llm or transformers that asked for it
(torch.cuda.set_sync_debug_mode).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from unittest import mock

import torch
from torch.autograd import DeviceType

from adl_llm.config import compose
from adl_llm.data import load_records
from adl_llm.decoding import encode_prompts, generate_from_ids
from adl_llm.modeling import attention_kernels, load_adapter, load_model, load_tokenizer, model_source
from adl_llm.prompts import build_prompts
from bench import measure

PATHS = {
    "plain": {"dequantize": False, "static_cache": False, "compile": False, "defer_syncs": False},
    "default": {},
    "dequantize": {"dequantize": True},
    "compiled": {"compile": True},
    "warpers": {"fused_sampling": False},  # the default path with transformers' sampling warpers
    "compiled_warpers": {"compile": True, "fused_sampling": False},
    "compiled_bnb": {"compile": True, "nf4_graph": False},  # NF4 weights through bitsandbytes' operator, compiled
    "compiled_undeferred": {"compile": True, "defer_syncs": False},  # the host waits for each step's stop test
}
WAITS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize")  # the host waits for the card


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default="embedded:gemma3-270m")
    parser.add_argument("--adapter", help="an adapter folder to decode with (default: the base model)")
    parser.add_argument("--prompts", type=int, default=250, help="the first N public-test prompts, one batch")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--paths", default="plain,default,compiled", help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--gen", default="greedy", help="the gen option decoded (report: the report's sampling)")
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--stops", action="store_true", help="keep the stop strings (a batch may end early)")
    parser.add_argument("--sync-sources", action="store_true", help="trace each wait for the card to its line")
    parser.add_argument("--out", type=Path, required=True, help="folder for the tables")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    settings = (f"gen={args.gen}", f"gen.beams={args.beams}", "model.liger=false")
    cfg = compose(f"model.name_or_path={args.model_path}", *settings)
    source = model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    records = load_records(cfg.data.eval_file, need_outputs=False, limit=args.prompts)
    encoded = encode_prompts(tokenizer, build_prompts([r.instruction for r in records], cfg.prompt))
    model = load_model(cfg.model, source=source)
    if args.adapter:
        model = load_adapter(model, args.adapter)
    device = next(model.parameters()).device
    base = dataclasses.replace(
        cfg.gen,
        max_new_tokens=args.new_tokens,
        stop_strings=cfg.gen.stop_strings if args.stops else [],
        batch_size=len(encoded),
    )  # one batch of every prompt, every step decoded (unless the stop strings end every row first)

    setting = f"gen={args.gen} beams={args.beams}"
    lines = [f"{len(encoded)} prompts in one batch, {args.new_tokens} new tokens, {setting}, on {measure.card()}", ""]
    for name in args.paths.split(","):
        gen = dataclasses.replace(base, **PATHS[name])
        stats: dict = {}

        def decode(gen=gen, stats=stats) -> None:
            with attention_kernels(cfg.model.cudnn_attention):
                generate_from_ids(model, tokenizer, encoded, gen, progress=False, fast=True, stats=stats)
            measure.sync()

        decode()  # warm-up: compiling, kernel plans, the allocator
        started = measure.now()
        decode()
        wall = measure.now() - started
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        started = measure.now()
        with torch.profiler.profile(activities=activities) as prof:
            decode()
        profiled = measure.now() - started
        averages = prof.key_averages()
        kernels = [e for e in averages if e.device_type == DeviceType.CUDA]
        launches = sum(e.count for e in kernels)
        waits = sum(e.count for e in averages if e.key in WAITS)
        gpu_busy = measure.gpu_busy_seconds(prof)
        steps = args.new_tokens
        said = [
            f"== {name} (path {stats['path']})",
            f"wall time a step: {wall / steps * 1000:.2f} ms without the profiler ({wall:.2f} s for {steps} steps), "
            f"{profiled / steps * 1000:.2f} ms with it",
            f"GPU busy a step (some kernel running): {gpu_busy / steps * 1000:.2f} ms, "
            f"{gpu_busy / profiled:.0%} of the profiled time; kernels launched a step: {launches / steps:.0f}; "
            f"host waits for the card a step: {waits / steps:.1f}",
            *(sync_sources(decode) if args.sync_sources and device.type == "cuda" else []),
        ]
        lines += [*said, averages.table(sort_by="self_cpu_time_total", row_limit=20), *heaviest_kernels(kernels, steps)]
        print("\n".join(lines[-1 - len(said) : -1]), flush=True)
    report = "\n".join(lines)
    (args.out / "profile-decode.txt").write_text(report, encoding="utf-8")
    print(f"at {time.strftime('%H:%M:%S')} wrote {args.out}/profile-decode.txt", flush=True)


def heaviest_kernels(kernels, steps: int, count: int = 25) -> list[str]:
    """The kernels that kept the GPU busiest, a step each: where a GPU-bound step's time goes (the operator table
    above is sorted by the host's time, and names operators, not kernels)."""
    heaviest = sorted(kernels, key=lambda kernel: -kernel.self_device_time_total)[:count]
    return ["the heaviest kernels (ms a step, launches a step, kernel):"] + [
        f"  {kernel.self_device_time_total / 1000 / steps:7.3f} {kernel.count / steps:6.1f}  {kernel.key[:110]}"
        for kernel in heaviest
    ]


def sync_sources(decode) -> list[str]:
    """The lines of adl_llm and transformers whose calls made the host wait for the card in one decoding, counted."""
    sources: Counter = Counter()

    def trace(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):  # torch.cuda.set_sync_debug_mode's warnings only
            return
        ours = [f for f in traceback.extract_stack() if "adl_llm" in f.filename or "transformers" in f.filename]
        sources[f"{ours[-1].filename.split('/site-packages/')[-1]}:{ours[-1].lineno}" if ours else filename] += 1

    with warnings.catch_warnings(), mock.patch.object(warnings, "showwarning", trace):
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            decode()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return ["waits for the card, by the line that asked (one decoding):"] + [
        f"  {count:6d}  {where}" for where, count in sources.most_common(12)
    ]


if __name__ == "__main__":
    main()
