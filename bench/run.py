"""Seed-style baselines and adl-llm side by side, in one process on one card; figures to `OUT/<model>.json`.

    python -u -m bench.run --model embedded --out $OUT
    python -u -m bench.run --model llama7b --model-path /tmp/llama7b --out $OUT --only train
    python -u -m bench.run --model-path /tmp/tiny --train-steps 2 --n-eval 4 --n-gen 2 --out /tmp/benchout  # CPU

Parts (`--only`): `train` (adl-llm with the default `train.*`; the peer, TRL's SFTTrainer with and without Liger
and checkpointing, bench/peer.py, for `--peers`; the seed-style HF Trainer baseline; and the ablations of
ABLATIONS for `--ablation-steps`), `ppl` (the course ppl.py loop against adl-llm's batched perplexity at several
batch sizes, on the same model instance; with `--precision-check`, both again on an fp32-compute instance),
`gen` (one prompt at a time on the first `--n-gen-baseline` prompts against adl-llm's batched decoding of
`--n-gen` prompts, at each of `--beams`: a rate against a rate, each over the work it is used for; with
`--gen-fast`, the default, also the fast path of a generate job with `gen.compile=true`, its warm-up apart; the
model loaded as a generate job loads it, without Liger). Every model is loaded fresh for its part and freed after
it, and the peak-memory count restarts with each measurement. The JSON
is rewritten after each part, so a run stopped by a time limit keeps what it finished; a part that fails
records its error and the next one runs. Scratch files (Trainer output, checkpoints) go to a temporary folder:
`--out` receives only the JSON; a run of some parts writes `OUT/<model>-<parts>.json` (bench.report merges them).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import tempfile
import time
import traceback
from functools import partial
from importlib import metadata
from pathlib import Path

from adl_llm.artifacts import provenance, write_json
from adl_llm.config import DType, ModelConfig, compose
from adl_llm.data import load_records
from adl_llm.encode import encode_examples
from adl_llm.modeling import load_model, load_tokenizer, model_source
from adl_llm.prompts import build_prompts
from adl_llm.tasks import model_settings
from bench import baseline, framework, measure, peer, report

DEFAULT_PATHS = {"embedded": "embedded:gemma3-270m", "llama7b": "/tmp/llama7b"}
# What each training choice contributes: adl-llm with one default turned back to the seed's.
ABLATIONS = {
    "2x8": ("train.micro_batch_size=2", "train.grad_accum=8"),  # the seed's split of the effective batch of 16
    "checkpointing": ("train.gradient_checkpointing=true",),  # the seed's gradient checkpointing
    "no_checkpointing": ("train.gradient_checkpointing=false",),  # never, even where it saves passes
    "cudnn_attention": ("model.cudnn_attention=true",),  # PyTorch's default attention kernel on an H100/H200
    "unbucketed": ("train.pad_to_multiple=1",),  # passes padded to their longest example only
    "unpacked": ("train.packing=false",),  # right-padded passes, not packed rows
    "unpacked_budget40": ("train.packing=false", "train.memory_budget_gb=40"),
    "nf4_each_pass": ("train.dequantize_base=false",),  # bitsandbytes dequantising twice a pass
    "budget40": ("train.memory_budget_gb=40",),  # memory to spare: a 7B's dequantised base, no checkpointing
    # The default compiles the decoder layers on a GPU; these are the eager path (with Liger's kernels) beside it.
    "eager": ("train.compile=false",),
    "eager_no_liger": ("train.compile=false", "model.liger=false"),  # transformers' own RMSNorm, MLP and RoPE
    "eager_budget40": ("train.compile=false", "train.memory_budget_gb=40"),
    "cudagraphs": ("train.compile_mode=reduce-overhead",),  # CUDA graphs over the passes it does not checkpoint
    "cudagraphs_budget40": ("train.compile_mode=reduce-overhead", "train.memory_budget_gb=40"),
    "autocast": ("train.autocast=true",),  # LoRA's products in bf16 (opt-in)
}
PARTS = ("train", "ppl", "gen")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(DEFAULT_PATHS), default="embedded", help="names the JSON file")
    parser.add_argument("--model-path", help="a model folder (default: embedded:gemma3-270m or /tmp/llama7b)")
    parser.add_argument("--out", type=Path, required=True, help="folder for <model>.json")
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated parts: train,ppl,gen")
    parser.add_argument("--train-steps", type=int, default=50, help="optimiser steps (effective batch 16) per run")
    parser.add_argument(
        "--ablation-steps", type=int, help="steps of each ablation run (default --train-steps; 0: none)"
    )
    parser.add_argument("--ablations", default=",".join(ABLATIONS), help="comma-separated names of ABLATIONS")
    parser.add_argument("--peers", default=",".join(peer.SIDES), help="comma-separated TRL sides (bench/peer.py)")
    parser.add_argument(
        "--baseline-steps", type=int, help="steps of the seed-style HF Trainer (default --train-steps; 0: none)"
    )
    parser.add_argument("--warmup-steps", type=int, default=5, help="first steps left out of the steady-state rate")
    parser.add_argument("--n-train", type=int, default=3000, help="first N training records, as the seed report")
    parser.add_argument("--n-eval", type=int, default=250, help="first N public-test records for perplexity")
    parser.add_argument("--n-gen", type=int, default=250, help="first N public-test prompts for adl-llm's decoding")
    parser.add_argument("--n-gen-baseline", type=int, default=16, help="the first N of them for the one-prompt loop")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=[d.value for d in DType],
        help="model.dtype of adl-llm's sides (auto: bfloat16 on a GPU or a CPU that computes it natively)",
    )
    parser.add_argument("--beams", default="1,3,5")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--eval-batch-sizes", default="1,16", help="adl-llm batch sizes timed besides the default")
    parser.add_argument("--precision-check", action="store_true", help="ppl of both sides again with fp32 compute")
    parser.add_argument("--gen-batch-size", type=int, help="adl-llm's gen.batch_size (default: the config's)")
    parser.add_argument(
        "--gen-fast",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also decode on the fast path of a generate job with gen.compile=true (its warm-up timed apart)",
    )
    args = parser.parse_args(argv)
    args.parts = [p for p in args.only.split(",") if p]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    args.ablations = [a for a in args.ablations.split(",") if a]
    unknown = set(args.ablations) - set(ABLATIONS)
    if unknown:
        parser.error(f"--ablations: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ABLATIONS)}")
    args.peers = [p for p in args.peers.split(",") if p]
    unknown = set(args.peers) - set(peer.SIDES)
    if unknown:
        parser.error(f"--peers: unknown {', '.join(sorted(unknown))}; choose from {', '.join(peer.SIDES)}")
    args.model_path = args.model_path or DEFAULT_PATHS[args.model]
    if args.ablation_steps is None:
        args.ablation_steps = args.train_steps
    if args.baseline_steps is None:
        args.baseline_steps = args.train_steps
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # adl-llm's choices, as they happen
    source = model_source(ModelConfig(name_or_path=args.model_path))  # builds the embedded model on first use
    cfg = compose(f"model.name_or_path={source}")
    tokenizer = load_tokenizer(cfg.model, source)
    result = {
        "model": args.model,
        "model_path": args.model_path,
        "card": measure.card(),
        "provenance": provenance(),
        "accelerate": metadata.version("accelerate"),  # the Trainer's engine; provenance() lists the rest
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    # A partial run gets its own name, so two calls that split the parts never overwrite each other.
    name = args.model if args.parts == list(PARTS) else "-".join([args.model, *args.parts])
    path = args.out / f"{name}.json"
    measure.warm_up()
    with tempfile.TemporaryDirectory(prefix="adl-bench-") as scratch:
        if "train" in args.parts:
            result["train"] = {}  # filled run by run, and saved after each: a time limit keeps what finished

            def save(key: str, value) -> None:
                result["train"][key] = value
                write_json(path, result)

            failure = _part("train", lambda: bench_train(args, source, tokenizer, Path(scratch), save))
            if failure:  # the data or the set-up failed, before any run
                save("error", failure["error"])
        if "ppl" in args.parts or "gen" in args.parts:
            bench_inference(args, source, tokenizer, result, path)
    print(report.render([result]), flush=True)
    print(f"wrote {path}", flush=True)


def bench_train(args, source: str, tokenizer, scratch: Path, save) -> None:
    """The Trainer baseline, adl-llm with its defaults, and adl-llm with each ablation, on the same data.

    `save(key, figures)` records each run as it finishes.
    """
    cfg = compose(f"model.name_or_path={source}")
    records = load_records(cfg.data.train_file, need_outputs=True, limit=args.n_train)
    prompts = build_prompts([r.instruction for r in records], cfg.prompt)
    examples = encode_examples(tokenizer, prompts, [r.output for r in records], cfg.train.max_length)
    pad_id = tokenizer.pad_token_id
    save("n_examples", len(examples))
    save("mean_example_tokens", sum(len(e.input_ids) for e in examples) / len(examples))
    save("warmup_steps", args.warmup_steps)
    run = partial(framework.train_framework, source, examples, pad_id=pad_id, warmup=args.warmup_steps)
    dtype = f"model.dtype={args.dtype}"
    save("framework", _part("train adl-llm", lambda: run(args.train_steps, dtype, work_dir=scratch / "default")))
    for name in args.peers:
        liger, checkpointing = peer.SIDES[name]
        trl = partial(peer.train_peer, source, examples, args.train_steps, liger=liger, checkpointing=checkpointing)
        save(
            f"peer_{name}",
            _part(f"train {name}", lambda t=trl, n=name: t(work_dir=scratch / n, warmup=args.warmup_steps)),
        )
    if args.baseline_steps:
        hf = partial(baseline.train_baseline, source, examples, args.baseline_steps, warmup=args.warmup_steps)
        save("baseline", _part("train baseline", lambda: hf(work_dir=scratch / "hf")))
    if not args.ablation_steps:
        return
    defaults = compose()
    for name in args.ablations:
        overrides = ABLATIONS[name]
        if compose(*overrides) == defaults:
            save(f"ablation_{name}", {"same_as": "framework"})  # the defaults already are the seed's choice
            continue
        work = scratch / name
        save(
            f"ablation_{name}",
            _part(f"train adl-llm {name}", lambda o=overrides, w=work: run(args.ablation_steps, dtype, *o, work_dir=w)),
        )


def bench_inference(args, source: str, tokenizer, result: dict, path: Path) -> None:
    """Generation and perplexity, each on an NF4 model (adl-llm's loader) loaded as its task loads it; within a
    part, every side decodes or scores the same weights."""
    cfg = compose(f"model.name_or_path={source}", f"model.dtype={args.dtype}")
    records = load_records(cfg.data.eval_file, need_outputs=True)
    if "gen" in args.parts:  # as a generate job loads it (without Liger unless asked), then as eval does
        model = load_model(model_settings(cfg, compiled=False, decoding=True), source=source)
        result["gen"] = _part("gen", partial(bench_gen, args, cfg, model, tokenizer, records[: args.n_gen]))
        write_json(path, result)
        del model
        measure.free()
    if "ppl" in args.parts:
        model = load_model(cfg.model, source=source)
        result["ppl"] = _part("ppl", partial(bench_ppl, args, cfg, model, tokenizer, records[: args.n_eval]))
        write_json(path, result)
        del model
        measure.free()


def bench_ppl(args, cfg, model, tokenizer, records) -> dict:
    prompts = build_prompts([r.instruction for r in records], cfg.prompt)
    examples = encode_examples(tokenizer, prompts, [r.output for r in records], cfg.eval.max_length)
    pad_id = tokenizer.pad_token_id
    batch_sizes = sorted({cfg.eval.batch_size, *(int(b) for b in args.eval_batch_sizes.split(",") if b)})
    out = {
        "n_examples": len(examples),
        "mean_example_tokens": sum(len(e.input_ids) for e in examples) / len(examples),
        **compare_ppl(model, examples, pad_id, batch_sizes, cfg=cfg),
    }
    if args.precision_check:
        del model
        measure.free()
        exact = load_model(compose(f"model.name_or_path={cfg.model.name_or_path}", "model.dtype=float32").model)
        out["fp32"] = compare_ppl(exact, examples, pad_id, [cfg.eval.batch_size], cfg=cfg)
    return out


def compare_ppl(model, examples, pad_id: int, batch_sizes: list[int], *, cfg) -> dict:
    """The one-example loop against adl-llm at each batch size; the differences are those at eval.batch_size."""
    default = cfg.eval.batch_size
    ours = partial(framework.ppl_framework, model, pad_id=pad_id, cfg=cfg)
    baseline.ppl_baseline(model, examples[:2])  # warm-up of both paths at every batch size, untimed
    for batch_size in batch_sizes:
        ours(examples[: 2 * batch_size], batch_size=batch_size)
    measure.reset_peak()
    base_values, base_seconds = baseline.ppl_baseline(model, examples)
    out = {"baseline": {"seconds": base_seconds, "ppl": _clean(base_values), **measure.peak()}, "framework": {}}
    for batch_size in batch_sizes:
        measure.reset_peak()
        values, seconds = ours(examples, batch_size=batch_size)
        out["framework"][str(batch_size)] = {"seconds": seconds, "ppl": _clean(values), **measure.peak()}
    fw_values = out["framework"][str(default)]["ppl"]
    pairs = [(b, f) for b, f in zip(out["baseline"]["ppl"], fw_values) if b is not None and f is not None]
    base_mean, fw_mean = (sum(side) / len(pairs) for side in zip(*pairs))
    out["baseline"]["mean_ppl"], out["framework_mean_ppl"] = base_mean, fw_mean
    out["default_batch_size"] = default
    out["max_rel_diff"] = max(abs(f - b) / abs(b) for b, f in pairs)
    out["mean_rel_diff"] = abs(fw_mean - base_mean) / abs(base_mean)
    return out


def bench_gen(args, cfg, model, tokenizer, records) -> dict:
    """Deterministic decoding (greedy, or beam search without sampling), so both sides should give one text.

    The loop decodes the first `--n-gen-baseline` prompts, adl-llm all `--n-gen`: examples/s against examples/s.
    """
    prompts = build_prompts([r.instruction for r in records], cfg.prompt)
    n_base = min(args.n_gen_baseline, len(prompts))
    out = {"n_prompts": len(prompts), "n_prompts_baseline": n_base}
    for beams in (int(b) for b in args.beams.split(",")):
        gen = dataclasses.replace(
            cfg.gen,
            beams=beams,
            do_sample=False,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.gen_batch_size or cfg.gen.batch_size,
        )
        warm = dataclasses.replace(gen, max_new_tokens=2)
        baseline.generate_baseline(model, tokenizer, prompts[:1], warm)  # warm-up, untimed
        framework.generate_framework(model, tokenizer, prompts[:1], warm, cudnn=cfg.model.cudnn_attention)
        base = baseline.generate_baseline(model, tokenizer, prompts[:n_base], gen)
        fw = framework.generate_framework(model, tokenizer, prompts, gen, cudnn=cfg.model.cudnn_attention)
        same = sum(b == f for b, f in zip(base["texts"], fw["texts"]))
        settings = dataclasses.asdict(gen)
        out[f"beams{beams}"] = {"settings": settings, "baseline": base, "framework": fw, "same_text": same}
        line = f"gen beams {beams}: {base['examples_per_s']:.2f} vs {fw['examples_per_s']:.2f} ex/s"
        if args.gen_fast:
            out[f"beams{beams}"]["fast"] = fast = _fast_gen(cfg, model, tokenizer, prompts, gen, fw["texts"])
            if "error" not in fast:
                speed, warmup = fast["examples_per_s"], fast["warmup_seconds"]
                line += f", fast path ({fast['path']}) {speed:.2f} ex/s after {warmup:.1f} s of warm-up"
        print(line, flush=True)
    return out


def _fast_gen(cfg, model, tokenizer, prompts, gen, batched_texts: list[str]) -> dict:
    """The fast path of a generate job (gen.compile=true); its failure (an out-of-memory, a crash the fallback
    does not take) is recorded as this side's, so the loop's and the batched path's figures are kept."""
    try:
        fast_gen = dataclasses.replace(gen, compile=True)
        cudnn = cfg.model.cudnn_attention
        fast = framework.generate_framework(model, tokenizer, prompts, fast_gen, cudnn=cudnn, fast=True)
    except Exception as err:
        traceback.print_exc()
        measure.free()
        return {"error": f"{type(err).__name__}: {err}"}
    fast["same_text_as_batched"] = sum(a == b for a, b in zip(batched_texts, fast["texts"]))
    return fast


def _part(name: str, work):
    """Run one measurement; on failure keep its error and go on, so one out-of-memory costs one figure only."""
    print(f"== {name}", flush=True)
    started = time.perf_counter()
    try:
        value = work()
    except Exception as err:
        traceback.print_exc()
        value = {"error": f"{type(err).__name__}: {err}"}
    measure.free()
    print(f"== {name}: {time.perf_counter() - started:.1f} s", flush=True)
    return value


def _clean(values: list[float]) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values]


if __name__ == "__main__":
    main()
