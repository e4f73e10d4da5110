"""Sweep summaries: after a multirun, one row per job in summary.csv and summary.md at the sweep root.

`adl_llm.run.SweepEnd` (a Hydra callback, registered in conf/config.yaml) writes them when the last job is done;
`python -m adl_llm.report <sweep dir>` rebuilds the summary of an existing sweep.
"""

from __future__ import annotations

import csv
import io
import itertools
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from adl_llm.artifacts import read_json, write_text

# (column, key in metrics.json, format); a column appears when some job of the sweep has its key
COLUMNS = [
    ("ppl", "eval/perplexity", "{:.3f}"),
    ("ppl_median", "eval/perplexity_median", "{:.3f}"),
    ("epochs", "train/epochs", "{:g}"),
    ("cum_epochs", "train/cumulative_epochs", "{:g}"),
    ("train_loss", "train/loss", "{:.4f}"),
    ("s_per_epoch", "train/seconds_per_epoch", "{:.1f}"),
    ("train_tok_s", "train/tokens_per_s", "{:.0f}"),
    ("n", "eval/n_examples", "{}"),
    ("chrf", "gen/chrf", "{:.2f}"),
    ("bleu", "gen/bleu", "{:.2f}"),
    ("ex_s", "gen/examples_per_s", "{:.2f}"),
    ("new_tok_s", "gen/new_tokens_per_s", "{:.0f}"),
    ("decode_path", "gen/path", "{}"),
    ("warmup_s", "gen/warmup_seconds", "{:.1f}"),
    ("peak_gpu_gib", "run/peak_gpu_alloc_gib", "{:.2f}"),
    ("reserved_gib", "run/peak_gpu_reserved_gib", "{:.2f}"),
    ("peak_rss_gib", "run/peak_rss_gib", "{:.2f}"),
    ("seconds", "run/seconds", "{:.1f}"),
]


def job_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder: the overrides that vary across the sweep, its status and its metrics."""
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    overrides = {job: _overrides(job) for job in jobs}
    shared = set.intersection(*(set(o) for o in overrides.values())) if jobs else set()
    metrics = {job: read_json(job / "metrics.json") if (job / "metrics.json").is_file() else {} for job in jobs}
    columns = [
        (c, key, fmt)
        for c, key, fmt in _with_slices(COLUMNS, metrics.values())
        if any(key in m for m in metrics.values())
    ]
    rows = []
    for job in jobs:
        row = {
            "job": int(job.name),
            "overrides": " ".join(o for o in overrides[job] if o not in shared),
            "status": _status(job, metrics[job]),
        }
        for column, key, fmt in columns:
            value = metrics[job].get(key)
            row[column] = fmt.format(value) if value is not None else ""
        rows.append(row)
    return rows


def _with_slices(columns: list[tuple[str, str, str]], metrics) -> list[tuple[str, str, str]]:
    """The columns, each per-slice one (`ppl[classical_to_modern]`, from `eval/perplexity/classical_to_modern`) after
    its overall column."""
    keys = {key for m in metrics for key in m}
    out = []
    for column, key, fmt in columns:
        out.append((column, key, fmt))
        if column in ("ppl", "chrf"):
            out += [(f"{column}[{k.rsplit('/', 1)[1]}]", k, fmt) for k in sorted(keys) if k.startswith(f"{key}/")]
    return out


def failed_jobs(rows: list[dict[str, Any]]) -> list[str]:
    """`job N: <reason>` for every job of the sweep that did not finish."""
    return [f"job {row['job']}: {row['status'].removeprefix('failed: ')}" for row in rows if row["status"] != "ok"]


def _status(job: Path, metrics: dict) -> str:
    """ok; failed with the first line of error.txt; or unfinished (still running, or killed)."""
    error = job / "error.txt"
    if error.is_file():
        return "failed: " + error.read_text(encoding="utf-8").splitlines()[0][:120].replace("|", "/")
    return "ok" if metrics else "unfinished"


def write_summary(sweep_dir: Path, rows: list[dict[str, Any]] | None = None) -> str:
    """Write summary.csv and summary.md (and a chain's or a decoding sweep's plot) in `sweep_dir`; return the
    Markdown table. `rows` are the sweep's `job_rows`, read here when not given."""
    rows = job_rows(sweep_dir) if rows is None else rows
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
    if is_chain(rows):
        write_learning_curve(sweep_dir, rows)
    if sum(bool(row.get("chrf")) for row in rows) > 1:
        write_generation_plot(sweep_dir, rows)
    return table


def is_chain(rows: list[dict[str, Any]]) -> bool:
    """A stage chain: every job trained, each ending at more cumulative epochs than the one before."""
    epochs = [float(row["cum_epochs"]) for row in rows if row.get("cum_epochs")]
    return len(epochs) == len(rows) > 1 and all(a < b for a, b in itertools.pairwise(epochs))


def write_learning_curve(sweep_dir: Path, rows: list[dict[str, Any]]) -> None:
    """learning_curve.csv and .png: perplexity and train loss against cumulative epochs."""
    plt = _pyplot()
    points = [(float(r["cum_epochs"]), float(r["train_loss"]), float(r["ppl"])) for r in rows if r["ppl"]]
    write_text(
        sweep_dir / "learning_curve.csv",
        "cumulative_epochs,train_loss,perplexity\n" + "".join(f"{e:g},{loss},{ppl}\n" for e, loss, ppl in points),
    )
    epochs, losses, ppls = zip(*points)
    fig, (ax_ppl, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    ax_ppl.plot(epochs, ppls, "o-", color="tab:blue")
    ax_ppl.set(xlabel="cumulative epochs", ylabel="course perplexity (eval file)", title="Perplexity")
    ax_loss.plot(epochs, losses, "o-", color="tab:orange")
    ax_loss.set(xlabel="cumulative epochs", ylabel="mean train loss of the stage", title="Train loss")
    for ax in (ax_ppl, ax_loss):
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
    _save(fig, sweep_dir / "learning_curve.png")


def write_generation_plot(sweep_dir: Path, rows: list[dict[str, Any]]) -> None:
    """generation.png: quality, peak memory and speed of each decoding job, side by side."""
    plt = _pyplot()
    done = [r for r in rows if r.get("chrf")]
    labels = [r["overrides"].replace(" ", "\n") or f"job {r['job']}" for r in done]
    memory_key = "peak_gpu_gib" if any(r.get("peak_gpu_gib") for r in done) else "peak_rss_gib"
    panels = [
        ("chrF / BLEU", [("chrF", "chrf"), ("BLEU", "bleu")]),
        ("peak memory (GiB)", [("GPU allocated" if memory_key == "peak_gpu_gib" else "RSS", memory_key)]),
        ("examples / s", [("examples/s", "ex_s")]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), constrained_layout=True)
    for ax, (title, series) in zip(axes, panels):
        width = 0.8 / len(series)
        for k, (name, key) in enumerate(series):
            values = [float(r[key]) if r.get(key) else 0.0 for r in done]
            ax.bar([i + k * width for i in range(len(done))], values, width, label=name)
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(done))], labels, fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        if len(series) > 1:
            ax.legend()
    _save(fig, sweep_dir / "generation.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Save a figure under a temporary name and rename it into place."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    _pyplot().close(fig)
    tmp.replace(path)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]) + "\n"


def _overrides(job: Path) -> list[str]:
    path = job / ".hydra" / "overrides.yaml"
    return list(OmegaConf.load(path)) if path.is_file() else []


def main(argv: list[str] | None = None) -> None:
    """`python -m adl_llm.report <sweep dir>`: rebuild and print a sweep's summary."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m adl_llm.report <sweep folder>")
    folder = Path(args[0])
    table = write_summary(folder) if folder.is_dir() else ""
    if not table:
        reason = "no job folders (0/, 1/, ...) in it" if folder.is_dir() else "no such folder"
        print(f"adl-llm: error: {folder}: {reason}; give a multirun's sweep folder", file=sys.stderr)
        sys.exit(2)
    from adl_llm.html_report import write_html_report

    print(table, end="")
    print(write_html_report(folder, [folder], f"adl-llm sweep {folder.name}"))


if __name__ == "__main__":
    main()
