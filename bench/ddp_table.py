"""The data-parallel table: training runs on one and on several GPUs, each against the one-GPU run of its batch.

    python -m bench.ddp_table $KEEP/ddp7b     # folders <n>gpu-b<batch>[-<variant>]/ with metrics.json

Speed is the run's `train/tokens_per_s` (all ranks' tokens over the run's training time, first steps included) and,
where metrics.json has every step's time, the steady rate after the first STEADY_AFTER steps (which hold a compiled
run's compiles; a resumed run compiles again later, so measure runs that were not resumed), on which "x 1 GPU" is
then based; the loss difference is the mean absolute difference of the per-step losses from the one-GPU run of the
same batch.
A variant (`-compile`: bench/gpu_session.sh ddp7b_compile) is compared with the one-GPU run of its own variant.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from adl_llm.artifacts import read_json

RUN = re.compile(r"^(\d+)gpu-b(\d+)(?:-([\w+]+))?$")
STEADY_AFTER = 10


def steady_tokens_per_s(metrics: dict) -> float | None:
    """Tokens/s over the steps after the first STEADY_AFTER, or None without per-step figures or steps after them."""
    seconds = metrics.get("train/step_seconds", [])[STEADY_AFTER:]
    tokens = metrics.get("train/step_tokens", [])[STEADY_AFTER:]
    return sum(tokens) / sum(seconds) if seconds and len(tokens) == len(seconds) and sum(seconds) > 0 else None


def rows(folder: Path) -> list[dict]:
    runs = {}
    for path in sorted(folder.glob("*/metrics.json")):
        found = RUN.match(path.parent.name)
        if found:
            runs[int(found[1]), int(found[2]), found[3] or ""] = read_json(path)
    out = []
    for (gpus, batch, variant), metrics in sorted(runs.items(), key=lambda item: (item[0][2], item[0][1], item[0][0])):
        one = runs.get((1, batch, variant))
        steady, one_steady = steady_tokens_per_s(metrics), one and steady_tokens_per_s(one)
        if one and steady and one_steady:
            speedup = steady / one_steady
        else:
            speedup = metrics["train/tokens_per_s"] / one["train/tokens_per_s"] if one else None
        row = {
            "gpus": gpus,
            "batch": batch,
            "variant": variant,
            "tokens_per_s": metrics["train/tokens_per_s"],
            "steady_tokens_per_s": steady,
            "peak_gib": metrics.get("run/peak_gpu_alloc_gib"),
            "speedup": speedup,
            "loss_diff": None,
        }
        pairs = list(zip(metrics["train/losses"], one["train/losses"])) if one and gpus > 1 else []
        if pairs:  # over the steps both ran
            row["loss_diff"] = sum(abs(a - b) for a, b in pairs) / len(pairs)
        out.append(row)
    return out


def markdown(table: list[dict]) -> str:
    def fmt(value, spec: str) -> str:
        return "" if value is None else format(value, spec)

    lines = [
        f"| GPUs | global batch | variant | tokens/s | tokens/s after step {STEADY_AFTER} | x 1 GPU "
        "| peak GiB (rank 0) | mean abs. loss difference |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in table:
        lines.append(
            f"| {r['gpus']} | {r['batch']} | {r['variant']} | {r['tokens_per_s']:,.0f} | "
            f"{fmt(r['steady_tokens_per_s'], ',.0f')} | {fmt(r['speedup'], '.2f')} | {fmt(r['peak_gib'], '.2f')} | "
            f"{fmt(r['loss_diff'], '.4f')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(rows(Path(sys.argv[1]))))
