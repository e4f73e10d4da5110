"""task=export: the adapter merged into its base scores and decodes as the adapter on that base, loads with plain
transformers, carries the study's decoding and a model card, and is written whole or not at all."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from adl_llm import export, tasks
from adl_llm.decoding import cut_at_stop, generate_texts
from adl_llm.errors import ModelError, ResourceError, UserError
from adl_llm.modeling import load_adapter
from adl_llm.prompts import build_prompts
from tests.conftest import compose_config, read_json, tiny_overrides

N_EVAL = "data.n_eval=6"


def _export(tiny_model_dir, adapter, out, *extra):
    cfg = compose_config(*tiny_overrides(tiny_model_dir, "task=export", f"adapter={adapter}", *extra), output_dir=out)
    return tasks.run_export(cfg)


def _perplexity(model_dir, out, *extra) -> float:
    cfg = compose_config(*tiny_overrides(model_dir, "task=eval", N_EVAL, *extra), output_dir=out)
    return tasks.run_eval(cfg)["eval/perplexity"]


def test_the_export_scores_as_the_adapter_on_its_base(tiny_model_dir, tiny_adapter_dir, tmp_path):
    _export(tiny_model_dir, tiny_adapter_dir, tmp_path / "run", "export.dtype=float32")
    folder = tmp_path / "run" / "model"
    exported = _perplexity(folder, tmp_path / "exported")
    on_base = _perplexity(tiny_model_dir, tmp_path / "adapter", f"adapter={tiny_adapter_dir}")
    base = _perplexity(tiny_model_dir, tmp_path / "base")
    assert abs(on_base - base) / base > 1e-2  # the adapter changes the model: a merge that did nothing would fail
    assert abs(exported - on_base) / on_base < 1e-4
    metrics = read_json(tmp_path / "run" / "metrics.json")
    assert metrics["export/dir"] == str(folder) and metrics["export/weights_gib"] > 0


def test_the_export_loads_with_plain_transformers_and_decodes_as_the_study(tiny_model_dir, tiny_adapter_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    on_base = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), str(tiny_adapter_dir))
    cfg = compose_config(*tiny_overrides(tiny_model_dir, "gen=greedy", "gen.max_new_tokens=10", "gen.stop_strings=[]"))
    prompts = build_prompts(["子曰：學而時習之", "翻譯成白話文：天下大亂"], cfg.prompt)
    stop = generate_texts(on_base, tokenizer, prompts, cfg.gen, progress=False)[0][3]  # the answer ends before it
    gen = ("gen=greedy", "gen.max_new_tokens=10", f'gen.stop_strings=["{stop}"]')
    study = generate_texts(on_base, tokenizer, prompts, compose_config(*gen).gen, progress=False)
    assert len(study[0]) <= 3 and any(study)

    _export(tiny_model_dir, tiny_adapter_dir, tmp_path / "run", "export.dtype=float32", *gen)
    folder = tmp_path / "run" / "model"
    assert not (folder / "adapter_config.json").exists() and not (folder / "adapter_model.safetensors").exists()
    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert not [name for name in weights.keys() if "lora" in name]  # noqa: SIM118 (safe_open is no dict)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    plain = []  # what a user of the folder does: its own tokenizer and generation_config.json, no adl-llm
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for prompt in prompts:
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False).input_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), tokenizer=tokenizer)
        plain.append(cut_at_stop(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), [stop]))
    assert plain == study


def test_the_generation_config_holds_the_gen_settings(tiny_model_dir, tiny_adapter_dir, tmp_path):
    # model.liger=true, as a config that trains on a GPU asks: the merge on the CPU runs without Liger.
    _export(tiny_model_dir, tiny_adapter_dir, tmp_path / "run", "gen.max_new_tokens=77", "model.liger=true")
    saved = GenerationConfig.from_pretrained(tmp_path / "run" / "model")
    gen = compose_config("gen.max_new_tokens=77").gen  # the report's beam-sampling
    assert (saved.num_beams, saved.do_sample, saved.max_new_tokens) == (gen.beams, True, 77)
    assert (saved.top_p, saved.top_k, saved.temperature) == (gen.top_p, gen.top_k, gen.temperature)
    assert saved.stop_strings == gen.stop_strings == ["USER:", "\n"]


def test_adl_llm_decodes_an_export_with_the_gen_group_not_the_folders_own_settings(
    tiny_model_dir, tiny_adapter_dir, tmp_path
):
    _export(tiny_model_dir, tiny_adapter_dir, tmp_path / "run", "export.dtype=float32")  # stop strings in its config
    gen = ("gen=greedy", "gen.max_new_tokens=12", "gen.stop_strings=[]", "data.n_eval=3")
    cfg = compose_config(*tiny_overrides(tmp_path / "run" / "model", *gen), output_dir=tmp_path / "gen")
    tasks.run_generate(cfg)  # transformers would ask for a tokenizer for the folder's stop strings
    on_base = tiny_overrides(tiny_model_dir, f"adapter={tiny_adapter_dir}", *gen)
    tasks.run_generate(compose_config(*on_base, output_dir=tmp_path / "a"))
    assert read_json(tmp_path / "gen" / "predictions.json") == read_json(tmp_path / "a" / "predictions.json")


def test_the_card_names_the_base_the_lineage_the_data_and_the_study(tiny_model_dir, tiny_adapter_dir, tmp_path):
    study = tmp_path / "train-run"  # an adapter in the run folder that trained it, as task=train leaves it
    shutil.copytree(tiny_adapter_dir, study / "adapter")
    (study / "metrics.json").write_text(json.dumps({"eval/perplexity": 12.3456, "gen/chrf": 21.5}))
    data = {"name": "classical_zh", "train_file": "train.json", "n_train": 3000, "eval_file": "test.json"}
    config = {"data": data, "model": {"quant": "nf4", "dtype": "bfloat16"}, "prompt": {"name": "zero_shot"}}
    (study / "run.json").write_text(json.dumps({"config": config}))
    _export(tiny_model_dir, study / "adapter", tmp_path / "run")
    folder = tmp_path / "run" / "model"
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert f"merged into `{tiny_model_dir}`" in card
    assert "2 stage(s), 3 epochs in all" in card and f"| 2 | 2 | `{tiny_adapter_dir.parent / 'stage-2'}` |" in card
    assert "trained on the first 3000 records of `train.json`" in card
    assert "| course perplexity (mean) | 12.35 |" in card and "| chrF | 21.5 |" in card
    assert "nf4 base in bfloat16, zero_shot prompt" in card and "merging into NF4 itself is not exact" in card
    assert read_json(folder / export.MARKER)["lineage"]["cumulative_epochs"] == 3.0
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"  # export.dtype's default
    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}  # noqa: SIM118
    assert "Tuned and measured with the `zero_shot` prompt" in card

    # Exported with another prompt than the study's: the card says which one the figures are for.
    _export(tiny_model_dir, study / "adapter", tmp_path / "few", "prompt=few_shot")
    other = (tmp_path / "few" / "model" / "README.md").read_text(encoding="utf-8")
    assert "tuned and measured with the `zero_shot` prompt" in other and "export with `prompt=zero_shot`" in other


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was reported")

    monkeypatch.setattr(export, "load_model", refuse)


def test_an_export_without_an_adapter_is_refused_and_writes_nothing(tiny_model_dir, tmp_path, no_model_loads):
    cfg = compose_config(*tiny_overrides(tiny_model_dir, "task=export"), output_dir=tmp_path / "run")
    with pytest.raises(ModelError, match=r"^adapter: task=export merges an adapter into its base model and none"):
        tasks.run_export(cfg)
    assert not (tmp_path / "run").exists()


def test_an_export_dir_that_holds_something_else_is_refused_and_untouched(
    tiny_model_dir, tiny_adapter_dir, tmp_path, no_model_loads
):
    before = sorted(path.name for path in tiny_model_dir.iterdir())
    with pytest.raises(UserError, match="exists and is not an earlier export"):
        _export(tiny_model_dir, tiny_adapter_dir, tmp_path / "run", f"export.dir={tiny_model_dir}")
    assert sorted(path.name for path in tiny_model_dir.iterdir()) == before and not (tmp_path / "run").exists()


def test_a_second_export_replaces_the_first_whole_and_a_failed_one_leaves_it(
    tiny_model_dir, tiny_adapter_dir, tmp_path, monkeypatch
):
    target = tmp_path / "exports" / "tiny-tuned"
    _export(tiny_model_dir, tiny_adapter_dir, tmp_path / "run1", f"export.dir={target}", "export.dtype=float32")
    (target / "stray.txt").write_text("only in the first export")
    _export(tiny_model_dir, tiny_adapter_dir, tmp_path / "run2", f"export.dir={target}", "export.dtype=float16")
    assert not (target / "stray.txt").exists()
    assert json.loads((target / "config.json").read_text())["dtype"] == "float16"
    assert [path.name for path in target.parent.iterdir()] == ["tiny-tuned"]  # no temporary or old copy left

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "write_json", disk_full)  # the last file written into the new folder
    with pytest.raises(ResourceError, match=f"^export.dir={target}: no space left on the device"):
        _export(tiny_model_dir, tiny_adapter_dir, tmp_path / "run3", f"export.dir={target}")
    assert json.loads((target / "config.json").read_text())["dtype"] == "float16"  # the second export, whole
    assert [path.name for path in target.parent.iterdir()] == ["tiny-tuned"]
    assert (tmp_path / "run3" / "error.txt").read_text().startswith(f"export.dir={target}: no space left")
