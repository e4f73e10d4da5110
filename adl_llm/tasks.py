"""One plain function per task: read the data, load the model, do the work, write the run folder."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

from adl_llm.artifacts import provenance, write_json
from adl_llm.config import Config
from adl_llm.data import Record, few_shot_examples, load_records
from adl_llm.encode import encode_examples
from adl_llm.evaluate import perplexities
from adl_llm.modeling import load_adapter, load_model, load_tokenizer, model_source
from adl_llm.prompts import build_prompts

log = logging.getLogger(__name__)


def run_eval(cfg: Config) -> float:
    """The course perplexity of the model (and adapter) on `data.eval_file`; writes metrics.json."""
    started = time.perf_counter()
    out = _start(cfg)
    records = load_records(cfg.data.eval_file, need_outputs=True, limit=cfg.data.n_eval)
    shots = _shots(cfg)
    source = model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    model = load_model(cfg.model, source=source)
    if cfg.adapter:
        model = load_adapter(model, cfg.adapter)
    metrics = evaluate_records(cfg, model, tokenizer, records, shots)
    metrics["run/seconds"] = time.perf_counter() - started
    write_json(out / "metrics.json", metrics)
    return metrics["mean_perplexity"]


def evaluate_records(cfg: Config, model, tokenizer, records: list[Record], shots: list[Record]) -> dict:
    """Perplexity metrics of `records`, with their ids in file order."""
    prompts = build_prompts([r.instruction for r in records], cfg.prompt, shots)
    examples = encode_examples(tokenizer, prompts, [r.output for r in records], cfg.eval.max_length)
    truncated = [r.id for r, ex in zip(records, examples) if ex.truncated]
    if truncated:
        log.warning(
            "%d of %d examples are longer than eval.max_length=%d and were cut as the course metric does: %s",
            len(truncated),
            len(records),
            cfg.eval.max_length,
            ", ".join(truncated[:5]),
        )
    started = time.perf_counter()
    values = perplexities(model, examples, batch_size=cfg.eval.batch_size, pad_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - started
    unscored = [r.id for r, v in zip(records, values) if math.isnan(v)]
    if unscored:
        log.warning(
            "%d examples have no answer token left after truncation; left out of the mean", len(unscored)
        )
    finite = [v for v in values if not math.isnan(v)]
    mean = sum(finite) / len(finite) if finite else math.nan
    log.info(
        "mean perplexity %.4f over %d examples (%s, %.1f s)", mean, len(finite), cfg.prompt.name, seconds
    )
    return {
        "mean_perplexity": mean,
        "perplexities": [None if math.isnan(v) else v for v in values],
        "ids": [r.id for r in records],
        "eval/n_examples": len(records),
        "eval/n_truncated": len(truncated),
        "eval/n_unscored": len(unscored),
        "eval/seconds": seconds,
        "prompt": cfg.prompt.name,
    }


def _shots(cfg: Config) -> list[Record]:
    if not cfg.prompt.n_shots:
        return []
    return few_shot_examples(load_records(cfg.data.train_file, need_outputs=True), cfg.prompt.n_shots)


def _start(cfg: Config) -> Path:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", {"provenance": provenance(), "config": dataclasses.asdict(cfg)})
    return out
