"""One plain function per task: read the data, load the model, do the work, write the run folder."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

from adl_llm.artifacts import provenance, read_json, write_json
from adl_llm.config import Config
from adl_llm.data import Record, few_shot_examples, load_records
from adl_llm.distributed import barrier, is_main, world_size
from adl_llm.encode import encode_examples
from adl_llm.errors import UserError
from adl_llm.evaluate import perplexities
from adl_llm.memory import out_of_memory_advice, peak_memory, reset_peak_memory
from adl_llm.modeling import default_device, load_adapter, load_model, load_tokenizer, model_source, save_adapter
from adl_llm.prompts import build_prompts

log = logging.getLogger(__name__)


def run_eval(cfg: Config) -> float:
    """The course perplexity of the model (and adapter) on `data.eval_file`; writes metrics.json."""
    started, out = time.perf_counter(), _start(cfg)
    records = load_records(cfg.data.eval_file, need_outputs=True, limit=cfg.data.n_eval)
    shots = _shots(cfg)
    model, tokenizer = _load(cfg)
    metrics = evaluate_records(cfg, model, tokenizer, records, shots)
    _finish(out, model, metrics, started)
    return metrics["mean_perplexity"]


def run_generate(cfg: Config) -> float:
    """Decode `data.eval_file` with the gen group's setting; writes predictions.json and metrics.json."""
    started, out = time.perf_counter(), _start(cfg)
    records = load_records(cfg.data.eval_file, need_outputs=False, limit=cfg.data.n_eval)
    shots = _shots(cfg)
    model, tokenizer = _load(cfg)
    metrics = generate_records(cfg, model, tokenizer, records, shots, out)
    _finish(out, model, metrics, started)
    return metrics.get("gen/chrf", metrics["gen/examples_per_s"])


def run_train(cfg: Config) -> float:
    """QLoRA training on the first `data.n_train` records, then the course perplexity; writes adapter/."""
    started, out = time.perf_counter(), _start(cfg)
    eval_records = load_records(cfg.data.eval_file, need_outputs=True, limit=cfg.data.n_eval)
    model, _, metrics = _train_and_evaluate(cfg, out, eval_records, _shots(cfg))
    _finish(out, model, metrics, started)
    return metrics["mean_perplexity"]


def run_pipeline(cfg: Config) -> float:
    """The seed report's workflow in one job: train, evaluate the course perplexity, then generate."""
    started, out = time.perf_counter(), _start(cfg)
    eval_records = load_records(cfg.data.eval_file, need_outputs=True, limit=cfg.data.n_eval)
    shots = _shots(cfg)
    model, tokenizer, metrics = _train_and_evaluate(cfg, out, eval_records, shots)
    metrics.update(generate_records(cfg, model, tokenizer, eval_records, shots, out))
    _finish(out, model, metrics, started)
    return metrics["mean_perplexity"]


def _train_and_evaluate(cfg: Config, out: Path, eval_records: list[Record], shots: list[Record]):
    """Train an adapter (saved to out/adapter), then score `eval_records`; the model, tokenizer and metrics."""
    from transformers import set_seed

    from adl_llm.train import add_lora, train

    train_records = load_records(cfg.data.train_file, need_outputs=True, limit=cfg.data.n_train)
    init_dir = _init_from(cfg)
    previous = read_json(init_dir / "training.json") if init_dir and (init_dir / "training.json").is_file() else {}
    source = model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    prompts = build_prompts([r.instruction for r in train_records], cfg.prompt, shots)
    examples = encode_examples(tokenizer, prompts, [r.output for r in train_records], cfg.train.max_length)
    set_seed(cfg.seed)
    model = load_model(cfg.model, source=source)
    model = load_adapter(model, str(init_dir), trainable=True) if init_dir else add_lora(model, cfg.lora)
    if init_dir:
        log.info("stage starts from %s (%s epochs before)", init_dir, previous.get("cumulative_epochs", "?"))

    advice = "train.memory_budget_gb or train.micro_batch_tokens (or set train.micro_batch_size), or set "
    with out_of_memory_advice("training", advice + "train.gradient_checkpointing=true"):
        state = train(model, examples, cfg, out, tokenizer.pad_token_id)
    epochs_done = state.global_step / math.ceil(len(examples) / cfg.train.batch_size)
    cumulative = previous.get("cumulative_epochs", 0) + epochs_done
    if is_main():
        save_adapter(
            model,
            out / "adapter",
            {
                "base_model": cfg.model.name_or_path,
                "cumulative_epochs": cumulative,
                "stages": [*previous.get("stages", []), {"run_dir": str(out), "epochs": epochs_done}],
            },
        )
    barrier()
    metrics = evaluate_records(cfg, model, tokenizer, eval_records, shots)
    metrics.update(
        {
            "train/loss": sum(state.losses) / len(state.losses),
            "train/losses": state.losses,
            "train/steps": state.global_step,
            "train/epochs": epochs_done,
            "train/cumulative_epochs": cumulative,
            "train/n_examples": len(examples),
            "train/n_truncated": sum(ex.truncated for ex in examples),
            "train/tokens": state.tokens,
            "train/seconds": state.seconds,
            "train/seconds_per_epoch": state.seconds / epochs_done,
            "train/tokens_per_s": state.tokens / state.seconds,
        }
    )
    return model, tokenizer, metrics


def generate_records(cfg: Config, model, tokenizer, records: list[Record], shots: list[Record], out: Path) -> dict:
    """Decode `records`, write predictions.json ({id, output} in file order) and return the gen/ metrics."""
    from adl_llm.generate import count_new_tokens, generate_texts

    prompts = build_prompts([r.instruction for r in records], cfg.prompt, shots)
    started = time.perf_counter()
    if cfg.gen.batch_size:
        settings = f"gen.batch_size (now {cfg.gen.batch_size}) or gen.beams"
    else:
        settings = "gen.memory_budget_gb or set gen.batch_size, or lower gen.beams"
    with out_of_memory_advice("generation", settings):
        texts = generate_texts(model, tokenizer, prompts, cfg.gen)
    seconds = time.perf_counter() - started
    if is_main():
        write_json(out / "predictions.json", [{"id": r.id, "output": text} for r, text in zip(records, texts)])
    metrics = {
        "gen/n_examples": len(records),
        "gen/seconds": seconds,
        "gen/examples_per_s": len(records) / seconds,
        "gen/new_tokens_per_s": count_new_tokens(tokenizer, texts) / seconds,
        "gen/setting": dataclasses.asdict(cfg.gen),
    }
    references = [r.output for r in records]
    if all(ref is not None for ref in references):
        metrics.update(translation_scores(texts, references))
    log.info("generated %d answers in %.1f s (%.2f examples/s)", len(records), seconds, len(records) / seconds)
    return metrics


def translation_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """chrF and BLEU (sacrebleu, BLEU with its Chinese tokenizer) of the predictions against the references."""
    import sacrebleu

    return {
        "gen/chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
        "gen/bleu": sacrebleu.corpus_bleu(hypotheses, [references], tokenize="zh").score,
    }


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
    with out_of_memory_advice("perplexity", f"eval.batch_size (now {cfg.eval.batch_size}) or eval.max_length"):
        values = perplexities(
            model,
            examples,
            batch_size=cfg.eval.batch_size,
            pad_id=tokenizer.pad_token_id,
            pad_to_multiple=cfg.eval.pad_to_multiple,
        )
    seconds = time.perf_counter() - started
    unscored = [r.id for r, v in zip(records, values) if math.isnan(v)]
    if unscored:
        log.warning("%d examples have no answer token left after truncation; left out of the mean", len(unscored))
    finite = [v for v in values if not math.isnan(v)]
    mean = sum(finite) / len(finite) if finite else math.nan
    log.info("mean perplexity %.4f over %d examples (%s, %.1f s)", mean, len(finite), cfg.prompt.name, seconds)
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


def _init_from(cfg: Config) -> Path | None:
    """The adapter a stage starts from: none, a folder, or `previous`, the adapter of the job before in a sweep."""
    if cfg.train.init_from is None:
        return None
    if cfg.train.init_from != "previous":
        path = Path(cfg.train.init_from)
        if not (path / "adapter_config.json").is_file():
            raise UserError(f"train.init_from={cfg.train.init_from}: not a PEFT adapter folder")
        return path
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode is not RunMode.MULTIRUN:
        raise UserError("train.init_from=previous chains the jobs of a multirun (-m); give an adapter folder")
    launcher = str(hydra_cfg.launcher.get("_target_", ""))
    if not launcher.endswith("BasicLauncher"):
        raise UserError(
            f"train.init_from=previous: the stages of a chain run one after another, but hydra/launcher "
            f"({launcher.rsplit('.', 1)[-1]}) may run them at once; run the chain with the default launcher, "
            "inside one cluster job (README: From one GPU to a cluster)"
        )
    job = hydra_cfg.job.num
    if job == 0:
        return None  # the chain's first stage starts from scratch
    previous = Path(cfg.output_dir).parent / str(job - 1) / "adapter"
    if not (previous / "adapter_config.json").is_file():
        raise UserError(
            f"train.init_from=previous: job {job - 1} left no adapter at {previous}; a chain's stages must run "
            "one after another (the basic launcher), each after the one before succeeded"
        )
    return previous


def _shots(cfg: Config) -> list[Record]:
    if not cfg.prompt.n_shots:
        return []
    return few_shot_examples(load_records(cfg.data.train_file, need_outputs=True), cfg.prompt.n_shots)


def _load(cfg: Config):
    source = model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    model = load_model(cfg.model, source=source)
    if cfg.adapter:
        model = load_adapter(model, cfg.adapter)
    return model, tokenizer


def _start(cfg: Config) -> Path:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_main():
        write_json(out / "run.json", {"provenance": provenance(), "config": dataclasses.asdict(cfg)})
    reset_peak_memory(default_device())  # a multirun's jobs share one process: each job's peak is its own
    return out


def _finish(out: Path, model, metrics: dict, started: float) -> None:
    metrics.update(peak_memory(next(model.parameters()).device))
    metrics["run/seconds"] = time.perf_counter() - started
    metrics["run/world_size"] = world_size()
    if is_main():  # under torchrun every rank holds the same gathered results
        write_json(out / "metrics.json", metrics)
