"""The decoding table: generate runs of one prompt set on the fast path and on today's (plain) path, side by side.

    python -m bench.decode_table $KEEP/decode    # folders NAME/ of single runs or multiruns (bench/gpu_session.sh)

Each folder holds one run (metrics.json) or a multirun (numbered job folders) and `wall_ms.txt`, the wall time of
its command, process start and model loads included. A folder `SET-anything` is compared with `SET-plain` job by
job: the speed-up of examples/s, and for deterministic decoding how many outputs are the same text.
"""

from __future__ import annotations

import sys
from pathlib import Path

from adl_llm.artifacts import read_json


def jobs(folder: Path) -> list[Path]:
    """The run folders of a command's folder: itself, or its numbered multirun jobs in order."""
    numbered = sorted((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return numbered or [folder]


def rows(root: Path) -> list[dict]:
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        wall = folder / "wall_ms.txt"
        for index, job in enumerate(jobs(folder)):
            if not (job / "metrics.json").exists():  # the run failed or was stopped: said, not skipped
                out.append({"run": folder.name, "failed": True, "command_s": _seconds(wall) if index == 0 else None})
                continue
            metrics = read_json(job / "metrics.json")
            setting = metrics["gen/setting"]
            row = {
                "run": folder.name,
                "beams": setting["beams"],
                "sampling": setting["do_sample"],
                "path": metrics.get("gen/path", "plain"),
                "examples_per_s": metrics["gen/examples_per_s"],
                "new_tokens_per_s": metrics["gen/new_tokens_per_s"],
                "warmup_s": metrics.get("gen/warmup_seconds", 0.0),
                "peak_gib": metrics.get("run/peak_gpu_alloc_gib"),
                "chrf": metrics.get("gen/chrf"),
                "bleu": metrics.get("gen/bleu"),
                "command_s": _seconds(wall) if index == 0 else None,
                "speedup": None,
                "same_text": None,
            }
            twin = root / f"{folder.name.split('-')[0]}-plain"
            twin_jobs = jobs(twin) if twin != folder and twin.is_dir() else []
            if index < len(twin_jobs) and (twin_jobs[index] / "metrics.json").exists():
                plain_job = twin_jobs[index]
                plain = read_json(plain_job / "metrics.json")
                row["speedup"] = row["examples_per_s"] / plain["gen/examples_per_s"]
                if not setting["do_sample"]:
                    ours = read_json(job / "predictions.json")
                    theirs = read_json(plain_job / "predictions.json")
                    row["same_text"] = f"{sum(a == b for a, b in zip(ours, theirs))}/{len(ours)}"
            out.append(row)
    return out


def _seconds(wall: Path) -> float | None:
    return int(wall.read_text()) / 1000 if wall.exists() else None


def markdown(table: list[dict]) -> str:
    def fmt(value, spec: str) -> str:
        return "" if value is None else format(value, spec)

    lines = [
        "| run | beams | sampling | path | examples/s | x plain | new tokens/s | warm-up s | command s | peak GiB | "
        "chrF | BLEU | same text as plain |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in table:
        if r.get("failed"):
            seconds = fmt(r["command_s"], ".0f")
            lines.append(f"| {r['run']} | failed: no metrics.json (see its log) | | | | | | | {seconds} | | | | |")
            continue
        lines.append(
            f"| {r['run']} | {r['beams']} | {'yes' if r['sampling'] else 'no'} | {r['path']} | "
            f"{r['examples_per_s']:.1f} | {fmt(r['speedup'], '.2f')} | {r['new_tokens_per_s']:,.0f} | "
            f"{r['warmup_s']:.1f} | {fmt(r['command_s'], '.0f')} | {fmt(r['peak_gib'], '.2f')} | "
            f"{fmt(r['chrf'], '.2f')} | {fmt(r['bleu'], '.2f')} | {r['same_text'] or ''} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(rows(Path(sys.argv[1]))))
