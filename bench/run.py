"""Seed-style baselines and adl-llm side by side, in one process on one card; figures to `OUT/<model>.json`.

    python -u -m bench.run --model embedded --out $OUT
    python -u -m bench.run --model llama7b --model-path /tmp/llama7b --out $OUT --only train
    python -u -m bench.run --model-path /tmp/tiny --train-steps 2 --n-eval 4 --n-gen 2 --out /tmp/benchout  # CPU

Parts (`--only`): `train` (the HF Trainer baseline, adl-llm with the default `train.*`, and adl-llm with micro-batch
2 x accumulation 8), `ppl` (the course ppl.py loop against adl-llm's batched perplexity, on the same model
instance), `gen` (one prompt at a time against adl-llm's batched decoding, at each of `--beams`). Every model is
loaded fresh for its part and freed after it, and the peak-memory count restarts with each measurement. The JSON
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
from adl_llm.config import ModelConfig
from adl_llm.data import load_records
from adl_llm.encode import encode_examples
from adl_llm.modeling import load_model, load_tokenizer, model_source
from adl_llm.prompts import build_prompts
from bench import baseline, framework, measure, report

DEFAULT_PATHS = {"embedded": "embedded:gemma3-270m", "llama7b": "/tmp/llama7b"}
ABLATION = ("train.micro_batch_size=2", "train.grad_accum=8")  # the seed's split of the effective batch of 16
PARTS = ("train", "ppl", "gen")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(DEFAULT_PATHS), default="embedded", help="names the JSON file")
    parser.add_argument("--model-path", help="a model folder (default: embedded:gemma3-270m or /tmp/llama7b)")
    parser.add_argument("--out", type=Path, required=True, help="folder for <model>.json")
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated parts: train,ppl,gen")
    parser.add_argument("--train-steps", type=int, default=20, help="optimiser steps (effective batch 16) per run")
    parser.add_argument("--n-train", type=int, default=3000, help="first N training records, as the seed report")
    parser.add_argument("--n-eval", type=int, default=250, help="first N public-test records for perplexity")
    parser.add_argument("--n-gen", type=int, default=16, help="first N public-test prompts for generation")
    parser.add_argument("--beams", default="1,3,5")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--eval-batch-size", type=int, help="adl-llm's eval.batch_size (default: the config's)")
    parser.add_argument("--gen-batch-size", type=int, help="adl-llm's gen.batch_size (default: the config's)")
    args = parser.parse_args(argv)
    args.parts = [p for p in args.only.split(",") if p]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    args.model_path = args.model_path or DEFAULT_PATHS[args.model]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # adl-llm's choices, as they happen
    source = model_source(ModelConfig(name_or_path=args.model_path))  # builds the embedded model on first use
    cfg = framework.compose(f"model.name_or_path={source}")
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
            result["train"] = _part("train", lambda: bench_train(args, source, tokenizer, Path(scratch)))
            write_json(path, result)
        if "ppl" in args.parts or "gen" in args.parts:
            bench_inference(args, source, tokenizer, result, path)
    print(report.render([result]), flush=True)
    print(f"wrote {path}", flush=True)


def bench_train(args, source: str, tokenizer, scratch: Path) -> dict:
    """The Trainer baseline, adl-llm with its defaults, and adl-llm at the seed's 2 x 8 split, same data."""
    cfg = framework.compose(f"model.name_or_path={source}")
    records = load_records(cfg.data.train_file, need_outputs=True, limit=args.n_train)
    prompts = build_prompts([r.instruction for r in records], cfg.prompt)
    examples = encode_examples(tokenizer, prompts, [r.output for r in records], cfg.train.max_length)
    pad_id = tokenizer.pad_token_id
    out = {"n_examples": len(examples), "mean_example_tokens": sum(len(e.input_ids) for e in examples) / len(examples)}
    out["baseline"] = _part(
        "train baseline", lambda: baseline.train_baseline(source, examples, args.train_steps, work_dir=scratch / "hf")
    )
    out["framework"] = _part(
        "train adl-llm",
        lambda: framework.train_framework(
            source, examples, args.train_steps, work_dir=scratch / "default", pad_id=pad_id
        ),
    )
    if framework.compose(*ABLATION).train == framework.compose().train:
        out["framework_2x8"] = {"same_as": "framework"}  # the defaults already are the seed's split
    else:
        out["framework_2x8"] = _part(
            "train adl-llm 2x8",
            lambda: framework.train_framework(
                source, examples, args.train_steps, *ABLATION, work_dir=scratch / "2x8", pad_id=pad_id
            ),
        )
    return out


def bench_inference(args, source: str, tokenizer, result: dict, path: Path) -> None:
    """Perplexity and generation on one NF4 model instance (adl-llm's loader), both sides on the same weights."""
    cfg = framework.compose(f"model.name_or_path={source}")
    records = load_records(cfg.data.eval_file, need_outputs=True)
    model = load_model(cfg.model, source=source)
    if "ppl" in args.parts:
        result["ppl"] = _part("ppl", partial(bench_ppl, args, cfg, model, tokenizer, records[: args.n_eval]))
        write_json(path, result)
    if "gen" in args.parts:
        result["gen"] = _part("gen", partial(bench_gen, args, cfg, model, tokenizer, records[: args.n_gen]))
        write_json(path, result)
    del model
    measure.free()


def bench_ppl(args, cfg, model, tokenizer, records) -> dict:
    prompts = build_prompts([r.instruction for r in records], cfg.prompt)
    examples = encode_examples(tokenizer, prompts, [r.output for r in records], cfg.eval.max_length)
    batch_size = args.eval_batch_size or cfg.eval.batch_size
    pad_id = tokenizer.pad_token_id
    baseline.ppl_baseline(model, examples[:2])  # warm-up of both paths, untimed
    framework.ppl_framework(model, examples[:2], batch_size=batch_size, pad_id=pad_id)
    measure.reset_peak()
    base_values, base_seconds = baseline.ppl_baseline(model, examples)
    base_memory = measure.peak()
    measure.reset_peak()
    fw_values, fw_seconds = framework.ppl_framework(model, examples, batch_size=batch_size, pad_id=pad_id)
    fw_memory = measure.peak()
    pairs = [(b, f) for b, f in zip(base_values, fw_values) if not (math.isnan(b) or math.isnan(f))]
    base_mean = sum(b for b, _ in pairs) / len(pairs)
    fw_mean = sum(f for _, f in pairs) / len(pairs)
    return {
        "n_examples": len(examples),
        "mean_example_tokens": sum(len(e.input_ids) for e in examples) / len(examples),
        "baseline": {"seconds": base_seconds, "mean_ppl": base_mean, "ppl": _clean(base_values), **base_memory},
        "framework": {
            "seconds": fw_seconds,
            "batch_size": batch_size,
            "mean_ppl": fw_mean,
            "ppl": _clean(fw_values),
            **fw_memory,
        },
        "max_rel_diff": max(abs(f - b) / abs(b) for b, f in pairs),
        "mean_rel_diff": abs(fw_mean - base_mean) / abs(base_mean),
    }


def bench_gen(args, cfg, model, tokenizer, records) -> dict:
    """Deterministic decoding (greedy, or beam search without sampling) so both sides should give one text."""
    try:
        import adl_llm.generate  # noqa: F401
    except ImportError:
        return {"skipped": "adl_llm.generate is not there yet"}
    prompts = build_prompts([r.instruction for r in records], cfg.prompt)
    out = {"n_prompts": len(prompts)}
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
        framework.generate_framework(model, tokenizer, prompts[:1], warm)
        base = baseline.generate_baseline(model, tokenizer, prompts, gen)
        fw = framework.generate_framework(model, tokenizer, prompts, gen)
        same = sum(b == f for b, f in zip(base["texts"], fw["texts"]))
        settings = dataclasses.asdict(gen)
        out[f"beams{beams}"] = {"settings": settings, "baseline": base, "framework": fw, "same_text": same}
        print(f"gen beams {beams}: {base['examples_per_s']:.2f} vs {fw['examples_per_s']:.2f} ex/s", flush=True)
    return out


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
