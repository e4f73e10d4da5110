"""The promises of docs/RELIABILITY.md that no other test file covers: clear errors for bad models, adapters,
output folders and out-of-memory; reproducible results; safe file formats."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from adl_llm.config import PROJECT_ROOT
from adl_llm.errors import ResourceError
from adl_llm.tasks import run_eval, run_generate, run_train
from tests.conftest import compose_config, read_json, run_entrypoint, tiny_overrides

TIMING = re.compile(r"seconds|per_s|peak_|examples_per_s")


def _one_line(result, needle: str) -> None:
    """Exit status 2 and the error as the last line, no traceback (progress bars may come before it)."""
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("adl-llm: error: ") and needle in last and "Traceback" not in result.stderr, result.stderr


@pytest.mark.slow
def test_hub_id_while_offline_asks_for_a_local_folder(tmp_path):
    result = run_entrypoint(
        "task=eval", "model.name_or_path=some-org/some-model", f"hydra.run.dir={tmp_path}", env={"HF_HUB_OFFLINE": "1"}
    )
    _one_line(result, "cannot be fetched from the Hugging Face hub")
    assert "local model folder" in result.stderr and not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_adapter_of_another_base_model_is_refused(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    other = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    peft = get_peft_model(LlamaForCausalLM(other), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(tmp_path / "foreign")
    result = run_entrypoint(
        *tiny_overrides(tiny_model_dir, "task=eval"), f"adapter={tmp_path}/foreign", f"hydra.run.dir={tmp_path}/run"
    )
    _one_line(result, "does not fit this base model")
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_output_folder_that_cannot_be_written(tmp_path):
    (tmp_path / "a-file").write_text("in the way")
    result = run_entrypoint("task=eval", f"hydra.run.dir={tmp_path}/a-file/run")
    _one_line(result, "cannot write there")


@pytest.mark.parametrize(
    "task,needle",
    [
        (run_train, "out of GPU memory during training; lower train.memory_budget_gb"),
        (run_generate, "out of GPU memory during generation; lower gen.memory_budget_gb or set gen.batch_size, or"),
        (run_eval, "out of GPU memory during perplexity; lower eval.batch_size"),
    ],
)
def test_out_of_memory_names_the_setting_to_lower(tiny_model_dir, tmp_path, monkeypatch, task, needle):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(LlamaModel, "forward", no_memory)  # the decoder, under the loss and under generate
    cfg = compose_config(*tiny_overrides(tiny_model_dir, "data.n_train=4", "data.n_eval=2"), output_dir=tmp_path)
    with pytest.raises(ResourceError, match=re.escape(needle)):
        task(cfg)
    assert not (tmp_path / "metrics.json").exists()


def test_long_records_are_cut_counted_and_kept(tiny_model_dir, tmp_path):
    cfg = compose_config(*tiny_overrides(tiny_model_dir, "eval.max_length=100"), output_dir=tmp_path)
    run_eval(cfg)
    metrics = read_json(tmp_path / "metrics.json")
    assert metrics["eval/n_truncated"] > 0 and len(metrics["eval/perplexities"]) == len(metrics["eval/ids"]) == 12
    assert metrics["eval/n_unscored"] == sum(v is None for v in metrics["eval/perplexities"])


def test_same_config_and_seed_give_identical_metrics(tiny_model_dir, tmp_path):
    overrides = tiny_overrides(tiny_model_dir, "data.n_train=8", "train.batch_size=4", "train.epochs=2", "gen=sampling")
    overrides += ["gen.max_new_tokens=6", "data.n_eval=4"]
    from adl_llm.tasks import run_pipeline

    for run in ("a", "b"):
        run_pipeline(compose_config(*overrides, output_dir=tmp_path / run))
    a, b = (read_json(tmp_path / run / "metrics.json") for run in ("a", "b"))
    assert a.keys() == b.keys()
    assert {k: v for k, v in a.items() if not TIMING.search(k)} == {k: v for k, v in b.items() if not TIMING.search(k)}
    assert read_json(tmp_path / "a" / "predictions.json") == read_json(tmp_path / "b" / "predictions.json")
    record = read_json(tmp_path / "a" / "run.json")
    assert record["config"]["seed"] == 0 and record["provenance"]["packages"]["transformers"]
    assert "git_commit" in record["provenance"]

    # Safe formats: weights and states are safetensors, everything else JSON or text; nothing to unpickle.
    written = [p for p in (tmp_path / "a").rglob("*") if p.is_file() and "tensorboard" not in p.parts]
    assert {p.suffix for p in written} <= {".safetensors", ".json", ".yaml", ".log", ".md"}, written


def test_nothing_is_unpickled_and_remote_code_is_opt_in():
    source = "\n".join(p.read_text(encoding="utf-8") for p in (PROJECT_ROOT / "adl_llm").glob("*.py"))
    assert not re.search(r"torch\.load\(|import pickle|pickle\.load", source)
    for option in (PROJECT_ROOT / "conf" / "model").glob("*.yaml"):
        assert compose_config(f"model={option.stem}").model.trust_remote_code is False
