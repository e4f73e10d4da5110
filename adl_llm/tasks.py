"""One plain function per task: read the data, load the model, do the work, write the run folder.

Each returns its metrics; `OBJECTIVES` names the one a sweeper optimises, the same for every run of a task.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

from adl_llm.artifacts import provenance, write_json
from adl_llm.config import Config, TaskName
from adl_llm.data import Record, few_shot_examples, load_records
from adl_llm.distributed import barrier, is_main, world_size
from adl_llm.encode import encode_examples
from adl_llm.evaluate import evaluate_records
from adl_llm.generate import generate_records
from adl_llm.memory import out_of_memory_advice, peak_memory, reset_peak_memory
from adl_llm.modeling import (
    add_lora,
    default_device,
    load_adapter,
    load_model,
    load_tokenizer,
    model_source,
    save_adapter,
    tokenizer_fingerprint,
)
from adl_llm.optim import check_optim_and_schedule
from adl_llm.prompts import build_prompts
from adl_llm.stages import init_adapter_dir, lineage, stage_record

log = logging.getLogger(__name__)

# (metric, direction) that a task's run returns to Hydra: a sweeper optimises it.
OBJECTIVES = {
    TaskName.eval: ("eval/perplexity", "minimize"),
    TaskName.train: ("eval/perplexity", "minimize"),
    TaskName.pipeline: ("eval/perplexity", "minimize"),
    TaskName.generate: ("gen/chrf", "maximize"),  # absent, so None, when the eval file has no references
}


def run_task(cfg: Config) -> float | None:
    """Run `cfg.task` and return its objective."""
    runner = {
        TaskName.eval: run_eval,
        TaskName.train: run_train,
        TaskName.generate: run_generate,
        TaskName.pipeline: run_pipeline,
    }[cfg.task.name]
    return runner(cfg).get(OBJECTIVES[cfg.task.name][0])


def run_eval(cfg: Config) -> dict:
    """The course perplexity of the model (and adapter) on `data.eval_file`; writes metrics.json."""
    started, out = time.perf_counter(), _start(cfg)
    records = load_records(cfg.data.eval_file, need_outputs=True, limit=cfg.data.n_eval)
    shots = _shots(cfg)
    model, tokenizer = _load(cfg, out, adapter=cfg.adapter)
    metrics = evaluate_records(cfg, model, tokenizer, records, shots)
    return _finish(out, model, metrics, started)


def run_generate(cfg: Config) -> dict:
    """Decode `data.eval_file` with the gen group's setting; writes predictions.json and metrics.json."""
    started, out = time.perf_counter(), _start(cfg)
    records = load_records(cfg.data.eval_file, need_outputs=False, limit=cfg.data.n_eval)
    shots = _shots(cfg)
    model, tokenizer = _load(cfg, out, adapter=cfg.adapter)
    metrics = generate_records(cfg, model, tokenizer, records, shots, out)
    return _finish(out, model, metrics, started)


def run_train(cfg: Config) -> dict:
    """QLoRA training on the first `data.n_train` records, then the course perplexity; writes adapter/."""
    started, out = time.perf_counter(), _start(cfg)
    eval_records = load_records(cfg.data.eval_file, need_outputs=True, limit=cfg.data.n_eval)
    shots = _shots(cfg)
    model, tokenizer, metrics = _train(cfg, out, shots)
    metrics.update(evaluate_records(cfg, model, tokenizer, eval_records, shots))
    return _finish(out, model, metrics, started)


def run_pipeline(cfg: Config) -> dict:
    """The seed report's workflow in one job: train, evaluate the course perplexity, then generate."""
    started, out = time.perf_counter(), _start(cfg)
    eval_records = load_records(cfg.data.eval_file, need_outputs=True, limit=cfg.data.n_eval)
    shots = _shots(cfg)
    model, tokenizer, metrics = _train(cfg, out, shots)
    metrics.update(evaluate_records(cfg, model, tokenizer, eval_records, shots))
    metrics.update(generate_records(cfg, model, tokenizer, eval_records, shots, out))
    return _finish(out, model, metrics, started)


def _train(cfg: Config, out: Path, shots: list[Record]):
    """Train an adapter from `train.init_from` or from scratch, save it to out/adapter; the model, tokenizer and
    `train/` metrics."""
    from transformers import set_seed

    from adl_llm.train import train

    train_records = load_records(cfg.data.train_file, need_outputs=True, limit=cfg.data.n_train)
    check_optim_and_schedule(cfg.optim, cfg.schedule)  # before the model loads
    init_dir = init_adapter_dir(cfg)
    before = lineage(init_dir)
    set_seed(cfg.seed)
    model, tokenizer = _load(cfg, out, adapter=init_dir, trainable=True)
    if init_dir:
        log.info("stage starts from %s (%s epochs before)", init_dir, before.get("cumulative_epochs", "?"))
    else:
        model = add_lora(model, cfg.lora)
    prompts = build_prompts([r.instruction for r in train_records], cfg.prompt, shots)
    examples = encode_examples(tokenizer, prompts, [r.output for r in train_records], cfg.train.max_length)

    advice = "train.memory_budget_gb or train.micro_batch_tokens (or set train.micro_batch_size), or set "
    with out_of_memory_advice("training", advice + "train.gradient_checkpointing=true"):
        state = train(model, examples, cfg, out, tokenizer.pad_token_id)
    epochs = state.global_step / math.ceil(len(examples) / cfg.train.batch_size)
    record = stage_record(cfg, before, out, epochs)
    if is_main():
        save_adapter(model, out / "adapter", record)
    barrier()
    metrics = {
        "train/loss": sum(state.losses) / len(state.losses),
        "train/losses": state.losses,
        "train/steps": state.global_step,
        "train/epochs": epochs,
        "train/cumulative_epochs": record["cumulative_epochs"],
        "train/n_examples": len(examples),
        "train/n_truncated": sum(ex.truncated for ex in examples),
        "train/tokens": state.tokens,
        "train/seconds": state.seconds,
        "train/seconds_per_epoch": state.seconds / epochs,
        "train/tokens_per_s": state.tokens_per_s,
    }
    return model, tokenizer, metrics


def _shots(cfg: Config) -> list[Record]:
    if not cfg.prompt.n_shots:
        return []
    return few_shot_examples(load_records(cfg.data.train_file, need_outputs=True), cfg.prompt.n_shots)


def _load(cfg: Config, out: Path, *, adapter: str | Path | None, trainable: bool = False):
    """The tokenizer (recorded in run.json), then the model with `adapter` on it."""
    source = model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    if is_main():
        record = {"provenance": provenance(), "tokenizer": tokenizer_fingerprint(tokenizer)}
        write_json(out / "run.json", {**record, "config": dataclasses.asdict(cfg)})
    model = load_model(cfg.model, source=source)
    if adapter:
        model = load_adapter(model, str(adapter), trainable=trainable)
    return model, tokenizer


def _start(cfg: Config) -> Path:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    reset_peak_memory(default_device())  # a multirun's jobs share one process: each job's peak is its own
    return out


def _finish(out: Path, model, metrics: dict, started: float) -> dict:
    metrics.update(peak_memory(next(model.parameters()).device))
    metrics["run/seconds"] = time.perf_counter() - started
    metrics["run/world_size"] = world_size()
    if is_main():  # under torchrun every rank holds the same gathered results
        write_json(out / "metrics.json", metrics)
    return metrics
