"""Markdown tables for docs/BENCHMARKS.md from the JSON files of `bench.run`, printed to stdout.

    python -m bench.report results/embedded.json results/llama7b.json
    python -m bench.report results/            # every *.json there; parts of one model from several runs merge

Training leads with the peer, TRL's SFTTrainer (with and without Liger and checkpointing): each adl-llm row's
ratio is to the fastest TRL side measured in the same run. The seed-style tables follow; there "ratio" is
adl-llm / baseline, so above 1 is better for speeds and below 1 is better for times and memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

PARTS = ("train", "ppl", "gen")


LEGEND = (
    "ratio = adl-llm / the other side (the fastest TRL side for training, else the seed-style loop): above 1 is "
    "better for speeds, below 1 is better for times and memory."
)


def load(paths: list[Path]) -> list[dict]:
    """Results per model and card, in first-seen order; a later file's parts replace an earlier file's.

    Figures from different cards never merge: each (model, card) pair is its own block.
    """
    files = [f for p in paths for f in (sorted(p.glob("*.json")) if p.is_dir() else [p])]
    merged: dict[tuple[str, str], dict] = {}
    for file in files:
        result = json.loads(file.read_text(encoding="utf-8"))
        merged.setdefault((result["model"], result.get("card", "?")), {}).update(result)
    return list(merged.values())


def render(results: list[dict]) -> str:
    blocks = [LEGEND, _summary(results)]
    for result in results:
        head = f"### {result['model']} ({result.get('model_path')}) on {result.get('card')}"
        blocks.append("\n\n".join([head, *(_section(part, result[part]) for part in PARTS if part in result)]))
    return "\n\n".join(blocks) + "\n"


def _summary(results: list[dict]) -> str:
    """One row per model and card: the headline figure of each part as `other -> adl-llm (ratio)`."""
    header = [
        "model",
        "card",
        "training tokens/s: best TRL -> adl-llm",
        "seed-style -> adl-llm",
        "training peak GiB",
        "ppl seconds",
        "generation ex/s by beams",
    ]
    rows = []
    for result in results:
        train, ppl, gen = (_ok(result.get(part)) for part in PARTS)
        base, fw = train.get("baseline", {}), train.get("framework", {})
        best = _best_peer(train)[1]
        beams = [(k.removeprefix("beams"), v) for k, v in gen.items() if k.startswith("beams") and "error" not in v]
        rows.append(
            [
                result["model"],
                str(result.get("card")),
                _arrow(best.get("steady_tokens_per_s"), fw.get("steady_tokens_per_s"), "{:,.0f}"),
                _arrow(base.get("tokens_per_s"), fw.get("tokens_per_s"), "{:,.0f}"),
                _arrow(base.get("peak_alloc_gib"), fw.get("peak_alloc_gib"), "{:.1f}"),
                _arrow(ppl.get("baseline", {}).get("seconds"), _ppl_default(ppl).get("seconds"), "{:.1f}"),
                "; ".join(
                    f"{b}: " + _arrow(v["baseline"]["examples_per_s"], v["framework"]["examples_per_s"], "{:.2f}")
                    for b, v in beams
                ),
            ]
        )
    return _table(header, rows)


def _ok(data: dict | None) -> dict:
    return data if data and "error" not in data and "skipped" not in data else {}


def _arrow(base, fw, fmt: str) -> str:
    if base is None or fw is None:
        return "n/a"
    return f"{fmt.format(base)} -> {fmt.format(fw)} ({_ratio(fw, base)})"


def _section(part: str, data: dict) -> str:
    if "error" in data:
        return f"{part}: failed ({data['error']})"
    if "skipped" in data:
        return f"{part}: skipped ({data['skipped']})"
    return {"train": _train, "ppl": _ppl, "gen": _gen}[part](data)


def _best_peer(data: dict) -> tuple[str, dict]:
    """The fastest TRL side that ran (steady-state tokens/s), or ("", {})."""
    ran = [(k, v) for k, v in data.items() if k.startswith("peer_") and isinstance(v, dict) and "steps" in v]
    return max(ran, key=lambda kv: kv[1]["steady_tokens_per_s"], default=("", {}))


def _train(data: dict) -> str:
    return "\n\n".join(part for part in (_train_peer(data), _train_seed(data)) if part)


def _train_peer(data: dict) -> str:
    """One row per side: adl-llm (default and ablations) and every TRL side, ratios to the fastest TRL side."""
    peers = [(k, v) for k, v in data.items() if k.startswith("peer_")]
    if not peers:
        return ""
    best_name, best = _best_peer(data)
    ours = [("adl-llm default", data.get("framework", {}))] + [
        (f"adl-llm, {k.removeprefix('ablation_')}", v)
        for k, v in data.items()
        if k.startswith("ablation_") and "same_as" not in v
    ]
    warmup = data.get("warmup_steps", 0)
    header = ["side", "steps", f"tokens/s after step {warmup}", f"ratio to {best_name.removeprefix('peer_')}"]
    header += ["median step's tokens/s", "peak allocated GiB", "mean abs. loss diff. from adl-llm"]
    reference = data.get("framework", {}).get("losses") or []
    rows = []
    for name, run in ours + [(k.removeprefix("peer_").replace("_", " + "), v) for k, v in peers]:
        if "steps" not in run:
            reason = run.get("skipped") or run.get("error") or "not run"
            rows.append([name, "", f"not measured: {reason}", "", "", "", ""])
            continue
        diffs = [abs(a - b) for a, b in zip(run.get("losses") or [], reference)]
        rows.append(
            [
                name,
                str(run["steps"]),
                _fmt(run.get("steady_tokens_per_s"), "{:,.0f}"),
                _ratio(run.get("steady_tokens_per_s"), best.get("steady_tokens_per_s")),
                _fmt(median_step_rate(run, warmup), "{:,.0f}"),
                _fmt(run.get("peak_alloc_gib"), "{:.2f}"),
                _fmt(_mean(diffs) if diffs else None, "{:.4f}"),
            ]
        )
    tokens = data.get("mean_example_tokens", 0)
    note = f"Training against the peer, TRL's SFTTrainer: batches of 16 examples (mean {tokens:.0f} tokens each)"
    return note + "\n\n" + _table(header, rows)


def median_step_rate(run: dict, warmup: int) -> float | None:
    """Tokens/s of the median step after the first `warmup`: beside the window's rate, which one slow step (a new
    shape compiling, a peer's kernel autotuning) can halve, what a step takes once every shape has been seen."""
    rates = [t / s for t, s in zip(run.get("step_tokens", [])[warmup:], run.get("step_seconds", [])[warmup:]) if s > 0]
    return statistics.median(rates) if rates else None


def _train_seed(data: dict) -> str:
    if "baseline" not in data:
        return ""
    runs = [("HF Trainer (seed)", data.get("baseline", {})), ("adl-llm default", data.get("framework", {}))]
    runs += [
        (f"adl-llm, {key.removeprefix('ablation_')}", run)
        for key, run in data.items()
        if key.startswith("ablation_") and "same_as" not in run
    ]
    base = runs[0][1]
    header = ["figure", runs[0][0]]
    for name, _ in runs[1:]:
        header += [name, "ratio"]
    rows = []
    warmup = data.get("warmup_steps", 0)
    for label, key, fmt in (
        ("optimiser steps", "steps", "{:d}"),
        ("tokens/s, all steps", "tokens_per_s", "{:,.0f}"),
        (f"tokens/s, after step {warmup}", "steady_tokens_per_s", "{:,.0f}"),
        ("s / optimiser step", "seconds_per_step", "{:.2f}"),
        ("peak allocated GiB", "peak_alloc_gib", "{:.2f}"),
        ("peak reserved GiB", "peak_reserved_gib", "{:.2f}"),
    ):
        row = [label, _fmt(base.get(key), fmt)]
        for _, run in runs[1:]:
            row += [_fmt(run.get(key), fmt), "" if key == "steps" else _ratio(run.get(key), base.get(key))]
        rows.append(row)
    rows.append(["split, checkpointing", _split(base), *[x for _, r in runs[1:] for x in (_split(r), "")]])
    errors = [f"{name}: failed ({run['error']})" for name, run in runs if "error" in run]
    note = f"batches of 16 examples (mean {data.get('mean_example_tokens', 0):.0f} tokens each)"
    return "\n\n".join(["Training against the seed-style loop: " + note, _table(header, rows), _losses(runs), *errors])


def _losses(runs: list[tuple[str, dict]]) -> str:
    """The loss of sampled steps, and how far each curve is from the baseline's over the steps both ran."""
    curves = [(name, run.get("losses") or []) for name, run in runs]
    n = max(len(c) for _, c in curves)
    if not n:
        return "(no losses)"
    every = max(1, n // 10)
    steps = sorted({1, n, *range(every, n + 1, every)})
    rows = [[str(s), *(_fmt(c[s - 1] if s <= len(c) else None, "{:.4f}") for _, c in curves)] for s in steps]
    base = curves[0][1]
    for label, pick in (("mean abs. diff. from the baseline", _mean), ("largest abs. diff.", max)):
        diffs = [[abs(a - b) for a, b in zip(c, base)] for _, c in curves[1:]]
        rows.append([label, "", *(_fmt(pick(d) if d else None, "{:.4f}") for d in diffs)])
    return _table(["step", *(f"loss, {name}" for name, _ in curves)], rows)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _split(run: dict) -> str:
    settings = run.get("settings") or {}
    train = settings.get("train") or settings
    if "micro_batch_size" not in train:
        return ""
    checkpointing = {True: "on", False: "off"}.get(train.get("gradient_checkpointing"), "auto")
    if train["micro_batch_size"] or train["grad_accum"]:
        return f"{train['micro_batch_size'] or '?'} x {train['grad_accum'] or '?'}, {checkpointing}"
    return f"by length, {train.get('micro_batch_tokens') or 'auto'} tokens a micro-batch, {checkpointing}"


def _ppl_default(data: dict) -> dict:
    return data.get("framework", {}).get(str(data.get("default_batch_size")), {})


def _ppl(data: dict) -> str:
    n = data["n_examples"]
    blocks = [
        f"Perplexity of {n} public-test examples (mean {data['mean_example_tokens']:.0f} tokens), bf16 compute",
        _ppl_table(data, n),
    ]
    if "fp32" in data:
        blocks += ["The same NF4 weights with fp32 compute (the precision check)", _ppl_table(data["fp32"], n)]
    return "\n\n".join(blocks)


def _ppl_table(data: dict, n: int) -> str:
    base, runs = data["baseline"], data["framework"]
    header = ["figure", "course ppl.py (batch 1)"]
    for batch_size in runs:
        header += [f"adl-llm batch {batch_size}", "ratio"]
    rows = []
    for label, key, fmt in (
        ("seconds", "seconds", "{:.2f}"),
        ("peak allocated GiB", "peak_alloc_gib", "{:.2f}"),
    ):
        row = [label, _fmt(base.get(key), fmt)]
        for run in runs.values():
            row += [_fmt(run.get(key), fmt), _ratio(run.get(key), base.get(key))]
        rows.append(row)
    speed = ["examples/s", f"{n / base['seconds']:.1f}"]
    for run in runs.values():
        speed += [f"{n / run['seconds']:.1f}", _ratio(base["seconds"], run["seconds"])]
    rows.insert(1, speed)
    default = str(data["default_batch_size"])
    agreement = ["vs the loop", f"mean ppl {base['mean_ppl']:.4f}"] + [""] * (len(header) - 2)
    column = 2 + 2 * list(runs).index(default)  # under the batch size the differences are measured at
    agreement[column] = f"mean ppl {data['framework_mean_ppl']:.4f}"
    agreement[column + 1] = f"per example {data['max_rel_diff']:.1e} at most, mean {data['mean_rel_diff']:.1e}"
    rows.append(agreement)
    return _table(header, rows)


def _pair_row(label: str, base: dict, fw: dict, key: str, fmt: str) -> list[str]:
    return [label, _fmt(base.get(key), fmt), _fmt(fw.get(key), fmt), _ratio(fw.get(key), base.get(key))]


def _gen(data: dict) -> str:
    runs = {key: run for key, run in data.items() if key.startswith("beams")}
    with_fast = any("fast" in run for run in runs.values())
    header = ["beams", "batch-1 ex/s", "adl-llm ex/s", "ratio", "batch-1 peak GiB", "adl-llm peak GiB", "same text"]
    if with_fast:
        header += ["fast path ex/s", "fast / adl-llm", "warm-up s", "fast peak GiB", "fast: same text as adl-llm"]
    rows, settings = [], {}
    for key, run in runs.items():
        if "error" in run:
            rows.append([key.removeprefix("beams"), f"failed: {run['error']}"] + [""] * (len(header) - 2))
            continue
        base, fw, settings = run["baseline"], run["framework"], run["settings"]
        row = [
            str(settings["beams"]),
            _fmt(base["examples_per_s"], "{:.2f}"),
            _fmt(fw["examples_per_s"], "{:.2f}"),
            _ratio(fw["examples_per_s"], base["examples_per_s"]),
            _fmt(base.get("peak_alloc_gib"), "{:.2f}"),
            _fmt(fw.get("peak_alloc_gib"), "{:.2f}"),
            f"{run['same_text']}/{data.get('n_prompts_baseline', data['n_prompts'])}",
        ]
        if with_fast:
            fast = run.get("fast", {})
            if "error" in fast:
                row += [f"failed: {fast['error']}"] + [""] * 4
                rows.append(row)
                continue
            row += [
                f"{_fmt(fast.get('examples_per_s'), '{:.2f}')} ({fast.get('path', 'n/a')})",
                _ratio(fast.get("examples_per_s"), fw["examples_per_s"]),
                _fmt(fast.get("warmup_seconds"), "{:.1f}"),
                _fmt(fast.get("peak_alloc_gib"), "{:.2f}"),
                f"{fast.get('same_text_as_batched', 'n/a')}/{data['n_prompts']}",
            ]
        rows.append(row)
    n_base = data.get("n_prompts_baseline", data.get("n_prompts"))
    batch = settings.get("batch_size") or f"sized from gen.memory_budget_gb={settings.get('memory_budget_gb')}"
    note = (
        f"Generation, up to {settings.get('max_new_tokens')} new tokens, no sampling: the one-prompt loop over the "
        f"first {n_base} public-test prompts, adl-llm over {data.get('n_prompts')} (batch {batch}); 'same text' "
        f"counts the first {n_base}"
    )
    if with_fast:
        note += "; the fast path's examples/s leave out its warm-up (compiling), given apart"
    return note + "\n\n" + _table(header, rows)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def _ratio(value, base) -> str:
    return "" if value is None or not base else f"{value / base:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="JSON files of bench.run, or folders holding them")
    print(render(load(parser.parse_args().paths)), end="")


if __name__ == "__main__":
    main()
