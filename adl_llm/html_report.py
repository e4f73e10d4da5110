"""The study as one web page, `report.html`: self-contained (data, plots, style and code inline), so it opens from
disk, offline, with no server.

    python -m adl_llm.report <sweep dir>        a sweep's page, beside its summary (every multirun writes one)
    python -m adl_llm.reproduce                 the whole study's page, beside report.md

It holds each sweep's summary table and plots; every job's figures per slice of the eval file (data.slices:
Classical -> Modern and Modern -> Classical for the shipped data); and an output browser with one row per eval
record: instruction, reference, the output of every generate job (with its sentence chrF) and the record's
perplexity under every eval job, side by side, filtered by slice, searched, and sorted by any column, or by how
much one eval job's perplexity differs from another's (say, what QLoRA changed).
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
from pathlib import Path
from typing import Any

from adl_llm.artifacts import read_json, write_text
from adl_llm.config import OTHER_SLICE
from adl_llm.data import load_records, slice_names
from adl_llm.errors import DataError
from adl_llm.scores import perplexity_summary, sentence_chrf, translation_scores

PAGE = Path(__file__).with_name("report_page.html")  # the page's style and code; the data goes in its placeholder
PLOTS = ("learning_curve.png", "generation.png")


def write_html_report(root: Path, sweeps: list[Path], title: str) -> Path:
    """Write `root/report.html` from the job folders of `sweeps` (each a multirun's folder); return its path."""
    jobs = [job for sweep in sweeps for job in _jobs(sweep, root, prefix=sweep.name if len(sweeps) > 1 else "")]
    records, slices, note = _records(jobs)
    data = {
        "title": title,
        "made": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "provenance": next((job["provenance"] for job in jobs if job["provenance"]), {}),
        "note": note,
        "sections": [_section(sweep, root) for sweep in sweeps],
        "slices": slices,
        "slice_table": _slice_table(jobs, records),
        "eval_jobs": [{"key": j["key"], "label": j["label"]} for j in jobs if j["ppl"]],
        "delta": _delta_pair([j for j in jobs if j["ppl"]]),
        "gen_jobs": [{"key": j["key"], "label": j["label"]} for j in jobs if j["outputs"]],
        "records": records,
    }
    payload = json.dumps(data, ensure_ascii=False, allow_nan=False).replace("</", "<\\/")
    page = PAGE.read_text(encoding="utf-8").replace("/*DATA*/null", payload).replace("{{TITLE}}", html.escape(title))
    write_text(root / "report.html", page)
    return root / "report.html"


def _jobs(sweep: Path, root: Path, prefix: str) -> list[dict[str, Any]]:
    """The finished jobs of a sweep: label, config, per-record perplexities and outputs."""
    from adl_llm.report import job_rows

    rows = {row["job"]: row for row in job_rows(sweep)}
    jobs = []
    for number, row in sorted(rows.items()):
        folder = sweep / str(number)
        if row["status"] != "ok":
            continue
        metrics = read_json(folder / "metrics.json")
        run = read_json(folder / "run.json") if (folder / "run.json").is_file() else {}
        predictions = read_json(folder / "predictions.json") if (folder / "predictions.json").is_file() else []
        label = " ".join(_short(override, root) for override in row["overrides"].split()) or f"job {number}"
        jobs.append(
            {
                "key": f"{prefix}/{number}" if prefix else str(number),
                "label": f"{prefix}: {label}" if prefix else label,
                "config": run.get("config", {}),
                "provenance": run.get("provenance", {}),
                "ppl": dict(zip(metrics.get("eval/ids", []), metrics.get("eval/perplexities", []))),
                "outputs": {p["id"]: p["output"] for p in predictions},
            }
        )
    return jobs


def _short(override: str, root: Path) -> str:
    """`adapter=/long/path/to/study/chain/2/adapter` as `adapter=chain/2/adapter` (relative to the report)."""
    key, sep, value = override.partition("=")
    path = Path(value)
    if not sep or not path.is_absolute():
        return override
    shown = path.relative_to(root) if path.is_relative_to(root) else Path(*path.parts[-3:])
    return f"{key}={shown}"


def _delta_pair(jobs: list[dict[str, Any]]) -> list[str]:
    """The two eval jobs the page's perplexity difference starts from: a base model's and the same job with an
    adapter (what tuning changed), else the first two."""

    def rest(job) -> set[str]:  # the job's overrides but the adapter
        return {token for token in job["label"].split() if not token.startswith("adapter=")}

    for base in (j for j in jobs if "adapter=null" in j["label"].split()):
        tuned = [j for j in jobs if rest(j) == rest(base) and "adapter=" in j["label"] and j is not base]
        if tuned:
            return [base["key"], tuned[0]["key"]]
    return [j["key"] for j in jobs[:2]]


def _records(jobs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str], str]:
    """One row per eval record (file order), with each job's perplexity and output; the slices; a note."""
    from adl_llm.config import compose

    data = next((job["config"]["data"] for job in jobs if job["config"]), None)
    rules = (data or {}).get("slices")
    note = ""
    if data is not None and "slices" not in data:  # a run made before slices existed: the shipped rules
        rules, note = compose().data.slices, "slices: the shipped data.slices rules (the runs predate them)"
    try:
        records = load_records(data["eval_file"], need_outputs=False, limit=data.get("n_eval")) if data else []
    except DataError as err:
        records, note = [], f"the eval file could not be read ({err}): instructions and references are missing"
    known = {r.id for r in records}
    ids = [r.id for r in records] + sorted({i for job in jobs for i in [*job["ppl"], *job["outputs"]]} - known)
    by_id = {r.id: r for r in records}
    names = slice_names(records, rules) if rules else [OTHER_SLICE] * len(records)
    slice_of = dict(zip([r.id for r in records], names))
    rows = []
    for record_id in ids:
        record = by_id.get(record_id)
        reference = record.output if record else None
        outputs = {j["key"]: j["outputs"][record_id] for j in jobs if record_id in j["outputs"]}
        rows.append(
            {
                "id": record_id,
                "slice": slice_of.get(record_id, OTHER_SLICE),
                "instruction": record.instruction if record else "",
                "reference": reference or "",
                "ppl": {j["key"]: j["ppl"][record_id] for j in jobs if j["ppl"].get(record_id) is not None},
                "output": outputs,
                "chrf": {k: sentence_chrf(v, reference) for k, v in outputs.items()} if reference else {},
            }
        )
    return rows, list(dict.fromkeys(row["slice"] for row in rows)), note


def _slice_table(jobs: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Every job's figures overall and per slice: mean and median perplexity, chrF and BLEU, and the count."""
    slices = ["all", *dict.fromkeys(r["slice"] for r in records)]
    rows = []
    for job in jobs:
        cells = {}
        for name in slices:
            chosen = [r for r in records if name == "all" or r["slice"] == name]
            row = {"n": len(chosen)}
            if job["ppl"]:
                row |= _finite(perplexity_summary([job["ppl"].get(r["id"]) for r in chosen]))
            scored = [(job["outputs"][r["id"]], r["reference"]) for r in chosen if r["id"] in job["outputs"]]
            if scored and all(ref for _, ref in scored):
                row |= translation_scores(*(list(side) for side in zip(*scored)))
            cells[name] = row
        rows.append({"label": job["label"], "cells": cells})
    return {"slices": slices, "rows": rows}


def _finite(values: dict[str, float]) -> dict[str, float | None]:
    return {k: (v if math.isfinite(v) else None) for k, v in values.items()}


def _section(sweep: Path, root: Path) -> dict[str, Any]:
    """A sweep's summary table (summary.csv) and its plots, inline."""
    from adl_llm.report import job_rows

    rows = job_rows(sweep)
    plots = [
        {"name": name, "src": "data:image/png;base64," + base64.b64encode((sweep / name).read_bytes()).decode()}
        for name in PLOTS
        if (sweep / name).is_file()
    ]
    title = sweep.name if sweep != root else "sweep"
    return {"title": title, "header": list(rows[0]) if rows else [], "rows": rows, "plots": plots}
