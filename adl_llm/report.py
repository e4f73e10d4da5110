"""Sweep summaries: after a multirun, one row per job in summary.csv and summary.md at the sweep root.

Hydra calls `SweepSummary.on_multirun_end` (registered in conf/config.yaml) when the last job is done;
`python -m adl_llm.report <sweep dir>` rebuilds the summary of an existing sweep.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from adl_llm.artifacts import read_json, write_text

# (column, key in metrics.json, format)
COLUMNS = [
    ("ppl", "mean_perplexity", "{:.3f}"),
    ("n", "eval/n_examples", "{}"),
    ("seconds", "run/seconds", "{:.1f}"),
]


def job_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder: the overrides that vary across the sweep, its status and its metrics."""
    jobs = sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )
    overrides = {job: _overrides(job) for job in jobs}
    shared = set.intersection(*(set(o) for o in overrides.values())) if jobs else set()
    rows = []
    for job in jobs:
        metrics_file = job / "metrics.json"
        metrics = read_json(metrics_file) if metrics_file.is_file() else {}
        row = {
            "job": int(job.name),
            "overrides": " ".join(o for o in overrides[job] if o not in shared),
            "status": "ok" if metrics else "failed",
        }
        for column, key, fmt in COLUMNS:
            value = metrics.get(key)
            row[column] = fmt.format(value) if value is not None else ""
        rows.append(row)
    return rows


def write_summary(sweep_dir: Path) -> str:
    """Write summary.csv and summary.md in `sweep_dir`; return the Markdown table."""
    rows = job_rows(sweep_dir)
    if not rows:
        return ""
    header = list(rows[0])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(sweep_dir / "summary.csv", buffer.getvalue())
    table = markdown_table(header, [[str(row[h]) for h in header] for row in rows])
    write_text(sweep_dir / "summary.md", table)
    return table


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]) + "\n"


def _overrides(job: Path) -> list[str]:
    path = job / ".hydra" / "overrides.yaml"
    return list(OmegaConf.load(path)) if path.is_file() else []


class SweepSummary(Callback):
    """Writes and prints the sweep's summary when a multirun ends."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = write_summary(sweep_dir)
        if table:
            print(f"\n{sweep_dir}/summary.md\n{table}", flush=True)


if __name__ == "__main__":
    print(write_summary(Path(sys.argv[1])), end="")
