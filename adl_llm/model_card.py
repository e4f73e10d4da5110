"""The model card (README.md) of an exported model: its base, the adapter and the stages behind it, the data and the
study's metrics where the adapter's run folders still hold them, how to prompt and decode it, and how its weights
differ from the NF4 base + adapter that the study measured."""

from __future__ import annotations

from pathlib import Path

from adl_llm.artifacts import read_json
from adl_llm.config import Config
from adl_llm.embedded import EMBEDDED, PREFIX, is_embedded
from adl_llm.prompts import build_prompts, load_shots

# The study's figures a card shows, when the adapter's run folder holds them.
METRICS = {
    "eval/perplexity": "course perplexity (mean)",
    "eval/perplexity_median": "course perplexity (median)",
    "gen/chrf": "chrF",
    "gen/bleu": "BLEU",
    "train/loss": "mean training loss of the last stage",
}


def model_card(cfg: Config, record: dict, folder: Path) -> str:
    """The card's Markdown; `record` is what the export writes to adl_llm_export.json."""
    adapter = Path(cfg.adapter).expanduser()
    run = _read(adapter.parent / "run.json").get("config", {})  # the run that saved the adapter, if it is there
    metrics = _read(adapter.parent / "metrics.json")
    sections = [
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n- adl-llm\n- lora\n- merged\n---",
        f"# {_base_name(cfg.model.name_or_path)} with a merged LoRA adapter\n\n"
        f"The LoRA adapter `{record['adapter']}` merged into {_base(cfg)}, saved by adl-llm's `task=export` in "
        f"{record['dtype']}. A standalone model: it loads with plain transformers, without peft.",
        _usage(cfg, folder),
        _lineage(record["lineage"]),
        _data(cfg, run),
        _metrics(metrics, run),
        _decoding(cfg, run),
        _precision(record["dtype"]),
        _provenance(record["provenance"]),
    ]
    return "\n\n".join(sections) + "\n"


def _read(path: Path) -> dict:
    """A JSON record of the study, or {} where it is missing or unreadable: the card says what it does not know."""
    try:
        return read_json(path) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _base_name(name: str) -> str:
    return name.removeprefix(PREFIX) if is_embedded(name) else Path(name).name or name


def _base(cfg: Config) -> str:
    name = cfg.model.name_or_path
    if is_embedded(name):
        package = EMBEDDED[name.removeprefix(PREFIX)].package
        return f"`{name}` (Gemma-3-270M base, the GGUF of the PyPI package `{package}`, dequantised)"
    return f"`{name}`" + (f" (revision `{cfg.model.revision}`)" if cfg.model.revision else "")


def _usage(cfg: Config, folder: Path) -> str:
    example = build_prompts(["<instruction>"], cfg.prompt, load_shots(cfg))[0]
    return (
        "## Use\n\n```python\nimport torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'folder = "{folder}"\ntokenizer = AutoTokenizer.from_pretrained(folder)\n'
        "model = AutoModelForCausalLM.from_pretrained(folder)\n"
        f"prompt = {example!r}.replace('<instruction>', 'your question')\n"
        "ids = tokenizer(prompt, return_tensors='pt', add_special_tokens=False).input_ids\n"
        "ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)  # [BOS] + prompt, as tuned\n"
        "out = model.generate(ids, tokenizer=tokenizer)  # generation_config.json: the study's decoding\n"
        "answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)\n```\n\n"
        "Or talk to it: `python -m adl_llm.chat model.name_or_path=<this folder> "
        "model.quant=none`, which cuts each answer at the stop strings."
    )


def _lineage(record: dict) -> str:
    stages = record.get("stages", [])
    if not stages:
        return "## Training\n\nThe adapter folder holds no `training.json`: its stages are unknown."
    rows = []
    for n, stage in enumerate(stages, 1):
        figure = _read(Path(stage["run_dir"]) / "metrics.json").get("eval/perplexity")
        rows.append(f"| {n} | {stage['epochs']:g} | `{stage['run_dir']}` | {_number(figure)} |")
    return (
        f"## Training\n\n{len(stages)} stage(s), {record.get('cumulative_epochs', 0):g} epochs in all, on the base "
        f"`{record.get('base_model', '?')}` (the adapter's `training.json`):\n\n"
        "| stage | epochs | run folder | course perplexity after it |\n| --- | --- | --- | --- |\n" + "\n".join(rows)
    )


def _data(cfg: Config, run: dict) -> str:
    data = run.get("data")
    if not data:
        return (
            "## Data\n\nNot recorded beside the adapter (no `run.json` in its run folder). This export's config "
            f"names the data `{cfg.data.name}`: `{cfg.data.train_file}`."
        )
    first = f"the first {data['n_train']} records of " if data.get("n_train") else ""
    scored = f"the first {data['n_eval']} records of " if data.get("n_eval") else ""
    return (
        f"## Data\n\n`{data['name']}`: trained on {first}`{data['train_file']}`, scored on {scored}"
        f"`{data['eval_file']}` (the last stage's `run.json`)."
    )


def _metrics(metrics: dict, run: dict) -> str:
    rows = [f"| {label} | {_number(metrics[key])} |" for key, label in METRICS.items() if metrics.get(key) is not None]
    if not rows:
        return "## Results\n\nNo `metrics.json` beside the adapter: the study's figures are not known here."
    model, prompt = run.get("model", {}), run.get("prompt", {})
    setting = f"{model.get('quant', '?')} base in {model.get('dtype', '?')}, {prompt.get('name', '?')} prompt"
    table = "| metric | value |\n| --- | --- |\n" + "\n".join(rows)
    return f"## Results\n\nThe study's, with the adapter ({setting}), from its run folder:\n\n{table}"


def _decoding(cfg: Config, run: dict) -> str:
    gen = cfg.gen
    sampling = f", top_p {gen.top_p}, top_k {gen.top_k}, temperature {gen.temperature}" if gen.do_sample else ""
    stops = ", ".join(repr(s) for s in gen.stop_strings) or "none"
    measured = run.get("prompt", {}).get("name")
    if measured and measured != cfg.prompt.name:  # the export was asked for another prompt than the study's
        prompt = (
            f"Use above shows the `{cfg.prompt.name}` prompt (this export's `prompt=`), but the adapter was tuned and "
            f"measured with the `{measured}` prompt (its run's `run.json`): export with `prompt={measured}` to show "
            "that one. The prompt is `[BOS]` + that text, the answer after it."
        )
    else:
        prompt = (
            f"Tuned and measured with the `{cfg.prompt.name}` prompt: `[BOS]` + the text in Use above, the answer "
            "after it."
        )
    return (
        f"## Prompt and decoding\n\n{prompt} `generation_config.json` holds the decoding: {gen.beams} beam(s), "
        f"{'sampling' if gen.do_sample else 'no sampling'}{sampling}, at most {gen.max_new_tokens} new tokens, "
        f"stop strings {stops}. transformers stops at a stop string when `generate` is given the tokenizer, but "
        "keeps it in the output: cut the answer before it and strip the spaces around it, as adl-llm does."
    )


def _precision(dtype: str) -> str:
    cast = "" if dtype == "float32" else f", then cast to {dtype}"
    return (
        f"## Precision\n\nThe adapter was merged into the base model's full-precision weights in float32{cast}. A "
        "QLoRA adapter is trained, and the study measured it, on the base quantised to NF4; merging into NF4 itself "
        "is not exact (the merged weights would have to be quantised again, rounding every weight anew), so this "
        "model is the adapter on the full-precision base, whose perplexity and answers differ slightly from those of "
        "NF4 + adapter. With a full-precision base (`model.quant=none`) and `export.dtype=float32`, its course "
        "perplexity is the adapter's (adl-llm's tests: within a relative 1e-4)."
    )


def _provenance(record: dict) -> str:
    dirty = " with uncommitted changes" if record["git_dirty"] else ""
    packages = ", ".join(f"{name} {version}" for name, version in record["packages"].items() if version)
    return (
        f"## Provenance\n\nExported by adl-llm at commit `{record['git_commit']}`{dirty}, with {packages}. "
        "`adl_llm_export.json` holds the whole record (adapter, lineage, decoding, prompt, versions)."
    )


def _number(value) -> str:
    return "not known" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
