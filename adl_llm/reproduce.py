"""The whole seed-report study in one command, with one report.md at the end.

    python -m adl_llm.reproduce [overrides...]      (make reproduce ARGS="...")

Five sweeps, each an ordinary multirun of the entrypoint in a subprocess, under outputs/reproduce/<time>/:
chain (1+1+3 stages), curve (1+1+1+1+1), compare (zero-shot and 3-shot, without and with the chain's final
adapter), beams (beams 1, 3 and 5 with the chain's adapter, the report's sampling otherwise) and outputs (greedy
answers of the compare's four settings, for the page's side-by-side reading). The overrides given are passed to
every sweep, so `model=taiwan_llama_7b` runs the study on the report's model. It ends with report.md and
report.html (adl_llm/html_report.py: every table, plot and output on one self-contained page).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from adl_llm.artifacts import write_text
from adl_llm.config import PROJECT_ROOT
from adl_llm.html_report import write_html_report

STEPS = [
    ("chain", "The 1+1+3 stage chain", ["experiment=chain"]),
    ("curve", "Learning curve (1+1+1+1+1)", ["experiment=curve"]),
    ("compare", "Prompting baselines and QLoRA", ["task=eval", "prompt=zero_shot,few_shot", "adapter=null,{adapter}"]),
    ("beams", "Decoding: beams 1, 3, 5", ["task=generate", "gen.beams=1,3,5", "adapter={adapter}"]),
    (
        "outputs",
        "Outputs: zero-shot and 3-shot, base and QLoRA (greedy)",
        ["task=generate", "prompt=zero_shot,few_shot", "adapter=null,{adapter}", "gen=greedy"],
    ),
]
PLOTS = {"curve": "learning_curve.png", "beams": "generation.png"}


def reproduce(root: Path, overrides: list[str]) -> list[str]:
    """Run the four sweeps under `root` and write root/report.md; return the names of the sweeps that failed."""
    adapter = root / "chain" / "2" / "adapter"
    sections, failed = [], []
    for name, title, args in STEPS:
        sweep = root / name
        command = [sys.executable, "-m", "adl_llm.run", "-m", *(a.format(adapter=adapter) for a in args), *overrides]
        command.append(f"hydra.sweep.dir={sweep}")
        print(f"\n== {title}: {' '.join(command[2:])}", flush=True)
        started = time.perf_counter()
        code = subprocess.run(command, cwd=PROJECT_ROOT).returncode
        summary = sweep / "summary.md"  # written by the sweep itself when it ended
        table = summary.read_text(encoding="utf-8") if summary.is_file() else ""
        plot = PLOTS.get(name) if (sweep / PLOTS.get(name, "-")).is_file() else None
        sections.append(_section(title, command, table, plot and f"{name}/{plot}", time.perf_counter() - started))
        write_text(root / "report.md", _report(overrides, sections))
        if code != 0:
            failed.append(name)
            if name == "chain":
                print(f"adl-llm: error: the chain failed (exit {code}); the steps that need its adapter are skipped")
                break
    sweeps = [root / name for name, _, _ in STEPS if (root / name).is_dir()]
    print(write_html_report(root, sweeps, "adl-llm: the seed report's study"), flush=True)
    return failed


def _section(title: str, command: list[str], table: str, plot: str | None, seconds: float) -> str:
    lines = [f"## {title}", "", f"`{' '.join(['python', *command[1:]])}` ({seconds / 60:.1f} min)", "", table]
    if plot:
        lines += [f"![{title}]({plot})", ""]
    return "\n".join(lines)


def _report(overrides: list[str], sections: list[str]) -> str:
    head = ["# adl-llm: the seed report's study", "", f"Overrides: `{' '.join(overrides) or '(none)'}`", ""]
    return "\n".join(head + sections)


def main() -> None:
    root = PROJECT_ROOT / "outputs" / "reproduce" / time.strftime("%Y-%m-%d_%H-%M-%S")
    failed = reproduce(root, sys.argv[1:])
    print(f"\n{root / 'report.md'}")
    if failed:
        print(f"adl-llm: error: failed sweeps: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
