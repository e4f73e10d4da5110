"""One plain function per task: check everything that can be checked, then write the run folder and do the work.

Each task first reads and checks its inputs (config, data, adapter folders, the checkpoint it would resume, the
tokenized examples) without writing anything and before any model loads; only then does the run folder get its
`.hydra/` and `run.json`. So a mistake costs seconds, and a refused run leaves an earlier run's files untouched.
Each returns its metrics; `OBJECTIVES` names the one a sweeper optimises, the same for every run of a task.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import torch

from adl_llm.artifacts import write_json
from adl_llm.checkpoint import check_resumable
from adl_llm.compiled_layers import training_compiles
from adl_llm.config import Config, ModelConfig, ResumeMode, TaskName
from adl_llm.data import Record, load_records
from adl_llm.devices import default_device
from adl_llm.distributed import barrier, is_main, world_size
from adl_llm.encode import encode_examples
from adl_llm.errors import ModelError, RunFailed
from adl_llm.evaluate import encode_for_eval, evaluate_examples
from adl_llm.export import check_export_dir, export_dir, export_model
from adl_llm.folders import check_adapter_folder
from adl_llm.generate import encode_for_generation, generate_records
from adl_llm.memory import out_of_memory_advice, peak_memory
from adl_llm.modeling import (
    add_lora,
    load_adapter,
    load_model,
    load_tokenizer,
    model_source,
    save_adapter,
)
from adl_llm.optim import check_optim_and_schedule
from adl_llm.prompts import build_prompts, load_shots
from adl_llm.run_folder import record_run, run_folder
from adl_llm.stages import init_adapter_dir, lineage, stage_record

log = logging.getLogger(__name__)

# (metric, direction) that a task's run returns to Hydra: a sweeper optimises it.
OBJECTIVES = {
    TaskName.eval: ("eval/perplexity", "minimize"),
    TaskName.train: ("eval/perplexity", "minimize"),
    TaskName.pipeline: ("eval/perplexity", "minimize"),
    TaskName.generate: ("gen/chrf", "maximize"),  # absent, so None, when the eval file has no references
    TaskName.export: None,  # a model folder, nothing to optimise
}


def run_task(cfg: Config) -> float | None:
    """Run `cfg.task` and return its objective."""
    runner = {
        TaskName.eval: run_eval,
        TaskName.train: run_train,
        TaskName.generate: run_generate,
        TaskName.pipeline: run_pipeline,
        TaskName.export: run_export,
    }[cfg.task.name]
    metrics, objective = runner(cfg), OBJECTIVES[cfg.task.name]
    return metrics.get(objective[0]) if objective else None


def run_eval(cfg: Config) -> dict:
    """The course perplexity of the model (and adapter) on `data.eval_file`; writes metrics.json."""
    return _over_eval_file(
        cfg,
        need_outputs=True,
        prepare=encode_for_eval,
        work=lambda model, tokenizer, records, examples, _out: evaluate_examples(
            cfg, model, tokenizer, records, examples
        ),
    )


def run_generate(cfg: Config) -> dict:
    """Decode `data.eval_file` with the gen group's setting; writes predictions.json and metrics.json."""
    return _over_eval_file(
        cfg,
        need_outputs=False,
        prepare=encode_for_generation,
        work=lambda model, tokenizer, records, prepared, out: generate_records(
            cfg, model, tokenizer, records, prepared, out
        ),
        decoding=True,
    )


def _over_eval_file(cfg: Config, *, need_outputs: bool, prepare, work, decoding: bool = False) -> dict:
    """What eval and generate share, in the order of the module's docstring: read and check the eval records, the
    shots, the adapter folder and the `prepare`d examples; record the run; only then load the model and `work`."""
    started = time.perf_counter()
    with run_folder(cfg) as run:
        records = load_records(cfg.data.eval_file, need_outputs=need_outputs, limit=cfg.data.n_eval)
        shots = load_shots(cfg)
        if cfg.adapter:
            check_adapter_folder(cfg.adapter, "adapter")
        tokenizer = load_tokenizer(cfg.model, model_source(cfg.model))
        prepared = prepare(cfg, tokenizer, records, shots)
        record_run(cfg, run, tokenizer)
        model = _model(cfg, adapter=cfg.adapter, compiled=decoding and cfg.gen.compile, decoding=decoding)
        return _finish(run.path, model.device, work(model, tokenizer, records, prepared, run.path), started)


def run_export(cfg: Config) -> dict:
    """The adapter merged into its base model, saved as a standalone model folder (export.dir, by default model/
    in the run folder); writes metrics.json."""
    if not cfg.adapter:
        raise ModelError(
            "adapter: task=export merges an adapter into its base model and none was given; pass adapter=<folder> "
            "(a training run's adapter/)"
        )
    started = time.perf_counter()
    with run_folder(cfg) as run:
        check_adapter_folder(cfg.adapter, "adapter")
        final = export_dir(cfg)
        check_export_dir(final, run.path)
        source = model_source(cfg.model)
        tokenizer = load_tokenizer(cfg.model, source)
        record_run(cfg, run, tokenizer)
        metrics = export_model(cfg, tokenizer, source, final)
        return _finish(run.path, torch.device("cpu"), metrics, started)


def run_train(cfg: Config) -> dict:
    """QLoRA training on the first `data.n_train` records, then the course perplexity; writes adapter/."""
    return _train_then(cfg, generate=False)


def run_pipeline(cfg: Config) -> dict:
    """The seed report's workflow in one job: train, evaluate the course perplexity, then generate."""
    return _train_then(cfg, generate=True)


def _train_then(cfg: Config, *, generate: bool) -> dict:
    """Train an adapter (from train.init_from or from scratch), save it, score the eval file, and decode it."""
    from transformers import set_seed

    from adl_llm.train import fingerprint, train

    started = time.perf_counter()
    with run_folder(cfg) as run:
        out = run.path
        eval_records = load_records(cfg.data.eval_file, need_outputs=True, limit=cfg.data.n_eval)
        train_records = load_records(cfg.data.train_file, need_outputs=True, limit=cfg.data.n_train)
        shots = load_shots(cfg)
        check_optim_and_schedule(cfg.optim, cfg.schedule)
        init_dir = init_adapter_dir(cfg)
        if init_dir:
            check_adapter_folder(init_dir, "train.init_from")
        if cfg.train.resume is ResumeMode.auto:
            check_resumable(out / "checkpoints", fingerprint(cfg))
        tokenizer = load_tokenizer(cfg.model, model_source(cfg.model))
        examples = _training_examples(cfg, tokenizer, train_records, shots)
        eval_examples = encode_for_eval(cfg, tokenizer, eval_records, shots)
        prepared = encode_for_generation(cfg, tokenizer, eval_records, shots) if generate else None
        record_run(cfg, run, tokenizer)

        before = lineage(init_dir)
        set_seed(cfg.seed)
        compiled = training_compiles(cfg.train.compile, default_device())
        model = _model(cfg, adapter=init_dir, trainable=True, compiled=compiled)
        if init_dir:
            log.info("stage starts from %s (%s epochs before)", init_dir, before.get("cumulative_epochs", "?"))
        else:
            model = add_lora(model, cfg.lora)
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
            "train/step_seconds": state.step_seconds,  # the first steps hold compiles and the memory probe
            "train/step_tokens": state.step_tokens,
            "train/compiled_steps": state.compiled_steps,  # this rank's; fewer than the steps after a failed compile
        }
        metrics.update(evaluate_examples(cfg, model, tokenizer, eval_records, eval_examples))
        if generate:  # what training and scoring gave stays on disk if decoding fails
            write_json(out / "metrics.partial.json", metrics)
            metrics.update(generate_records(cfg, model, tokenizer, eval_records, prepared, out))
        (out / "metrics.partial.json").unlink(missing_ok=True)
        return _finish(out, model.device, metrics, started)


def _training_examples(cfg: Config, tokenizer, records: list[Record], shots: list[Record]):
    """The encoded training examples; refused when train.max_length leaves none with an answer token."""
    prompts = build_prompts([r.instruction for r in records], cfg.prompt, shots)
    examples = encode_examples(tokenizer, prompts, [r.output for r in records], cfg.train.max_length)
    empty = sum(not ex.n_scored for ex in examples)
    if empty == len(examples):
        raise RunFailed(
            f"train.max_length={cfg.train.max_length} leaves no answer token in any of the {len(examples)} training "
            "examples: nothing to learn from; raise train.max_length"
        )
    cut = sum(ex.truncated for ex in examples)
    if cut:
        log.warning(
            "%d of %d training examples are longer than train.max_length=%d and were cut (%d with no answer token "
            "left, which teach nothing)",
            cut,
            len(examples),
            cfg.train.max_length,
            empty,
        )
    return examples


def model_settings(cfg: Config, *, compiled: bool, decoding: bool = False) -> ModelConfig:
    """cfg.model, with Liger off where model.liger is null and the work is `compiled` (gen.compile, train.compile):
    inductor fuses what Liger's kernels would, and those would break the compiled graph at every layer. Also off
    for a job that only decodes: its steps are one token a row, where Liger's RoPE needs a guard (kernels.py), and
    decoding with Liger has not been measured against the plain kernels; model.liger=true still asks for them."""
    off = compiled or decoding
    return dataclasses.replace(cfg.model, liger=False) if off and cfg.model.liger is None else cfg.model


def _model(
    cfg: Config,
    *,
    adapter: str | Path | None,
    trainable: bool = False,
    compiled: bool = False,
    decoding: bool = False,
):
    model = load_model(model_settings(cfg, compiled=compiled, decoding=decoding))
    return load_adapter(model, str(adapter), trainable=trainable) if adapter else model


def _finish(out: Path, device: torch.device, metrics: dict, started: float) -> dict:
    metrics.update(peak_memory(device))
    metrics["run/seconds"] = time.perf_counter() - started
    metrics["run/world_size"] = world_size()
    if is_main():  # under torchrun every rank holds the same gathered results
        write_json(out / "metrics.json", metrics)
    return metrics
