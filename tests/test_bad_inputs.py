"""Ordinary mistakes get one line naming the key, file or record, before any model loads where that is possible
(docs/RELIABILITY.md, 'Bad input gets a clear error')."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from adl_llm import tasks
from adl_llm.config import PROJECT_ROOT
from adl_llm.data import OFFLINE_FLAGS, load_records
from adl_llm.errors import ConfigError, DataError, ModelError, ResourceError, RunFailed
from adl_llm.folders import check_adapter_folder, damaged_safetensors
from tests.conftest import compose_config, tiny_overrides

GOOD = [{"id": "a", "instruction": "翻譯：天", "output": "天空"}]


@pytest.fixture()
def no_model_loads(monkeypatch):
    """A model load fails the test: what is checked here must be refused before one."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was reported")

    monkeypatch.setattr(tasks, "load_model", refuse)


@pytest.mark.parametrize(
    "encoding,needle",
    [("utf-16", "the file is UTF-16; save it as UTF-8"), ("gb18030", "not UTF-8 text (byte ")],
)
def test_a_data_file_that_is_not_utf8_is_named(tmp_path, encoding, needle):
    path = tmp_path / "data.json"
    path.write_bytes(json.dumps(GOOD, ensure_ascii=False).encode(encoding))
    with pytest.raises(DataError, match=re.escape(needle)):
        load_records(str(path), need_outputs=True)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD, ensure_ascii=False).encode())
    assert load_records(str(path), need_outputs=True)[0].output == "天空"


def test_deeply_nested_json_is_named(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested too deeply"):
        load_records(str(path), need_outputs=True)


def test_a_hub_dataset_while_offline_fails_at_once(monkeypatch):
    """Also where the process imported Hugging Face's libraries before (they read the environment at import)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)  # load_records sets it: put back after the test
    for module, name in [(huggingface_hub.constants, "HF_HUB_OFFLINE")] + [(datasets.config, n) for n in OFFLINE_FLAGS]:
        monkeypatch.setattr(module, name, getattr(module, name))  # put back after the test
    started = time.monotonic()
    with pytest.raises(DataError, match=r"cannot be reached .* not in the local cache"):
        load_records("hf:someone/not-cached", need_outputs=True)
    assert time.monotonic() - started < 15  # not half a minute of retries


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["adapter="], "adapter: is empty"),
        (["train.init_from="], "train.init_from: is empty"),
        (["prompt=few_shot", "prompt.n_shots=0"], "prompt.n_shots: is 0, but the few_shot prompt"),
        (["prompt.query_template='Q:{instruction}{foo}'"], "prompt.query_template: unknown placeholder {foo}"),
        (["prompt.query_template='{instruction}}'"], "prompt.query_template: is not a valid template"),
        (["seed=-1"], "seed: must be >= 0"),
        (["optim.lr=inf"], "optim.lr: must be a finite number"),
        (["gen.max_prompt_tokens=1"], "gen.max_prompt_tokens: must be >= 2"),
    ],
)
def test_config_mistakes_name_their_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        compose_config(*overrides)
    assert str(info.value).startswith(key)


def _adapter(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "adapter"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "damage,needle",
    [
        ("truncate", "adapter_model.safetensors is damaged ("),
        ("garbage config", "adapter_config.json is not valid JSON"),
        ("not a peft config", "not a PEFT adapter config (no peft_type)"),
        ("no weights", "no adapter_model.safetensors"),
        ("pickle only", "holds only adapter_model.bin, a pickle"),
        ("missing", "no such adapter folder"),
    ],
)
def test_a_damaged_adapter_folder_is_named_before_the_model_loads(
    tiny_model_dir, tmp_path, no_model_loads, damage, needle
):
    folder = _adapter(tiny_model_dir, tmp_path)
    weights = folder / "adapter_model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "garbage config":
        (folder / "adapter_config.json").write_text("{not json")
    elif damage == "not a peft config":
        (folder / "adapter_config.json").write_text("[1, 2]")
    elif damage == "no weights":
        weights.unlink()
    elif damage == "pickle only":
        weights.rename(folder / "adapter_model.bin")
    elif damage == "missing":
        shutil.rmtree(folder)
    with pytest.raises(ModelError, match=re.escape(needle)):
        check_adapter_folder(folder, "adapter")
    for task, key in ((tasks.run_eval, "adapter"), (tasks.run_train, "train.init_from")):
        cfg = compose_config(*tiny_overrides(tiny_model_dir, f"{key}={folder}"), output_dir=tmp_path / "run")
        with pytest.raises(ModelError, match=re.escape(f"{key}={folder}: ") + ".*" + re.escape(needle)):
            task(cfg)


@pytest.mark.parametrize(
    "damage,needle",
    [("truncated weights", "model.safetensors is damaged"), ("no tokenizer", "no tokenizer files")],
)
def test_a_damaged_model_folder_is_named(tiny_model_dir, tmp_path, damage, needle):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    if damage == "truncated weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        assert "truncated" in damaged_safetensors(weights)
    else:
        (folder / "tokenizer.json").unlink()
    cfg = compose_config(*tiny_overrides(folder, "task=eval"), output_dir=tmp_path / "run")
    with pytest.raises(ModelError, match=re.escape(f"model.name_or_path={folder}: ") + ".*" + re.escape(needle)):
        tasks.run_eval(cfg)


def test_lora_target_modules_that_match_nothing_list_the_linear_layers(tiny_model_dir, tmp_path):
    cfg = compose_config(*tiny_overrides(tiny_model_dir, "lora.target_modules=[nope]"), output_dir=tmp_path)
    with pytest.raises(ModelError, match=r"lora.target_modules=\['nope'\]: no module .* q_proj"):
        tasks.run_train(cfg)


def test_an_unknown_attention_implementation_is_named(tiny_model_dir, tmp_path):
    cfg = compose_config(*tiny_overrides(tiny_model_dir, "model.attn_implementation=nope"), output_dir=tmp_path)
    with pytest.raises(ModelError, match=re.escape("model.attn_implementation=nope: ")):
        tasks.run_eval(cfg)


def test_an_optimiser_that_is_not_one_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, no_model_loads):
    overrides = tiny_overrides(tiny_model_dir, "optim._target_=collections.OrderedDict")
    with pytest.raises(
        ConfigError, match=re.escape("optim._target_: collections.OrderedDict is not a torch optimiser")
    ):
        tasks.run_train(compose_config(*overrides, output_dir=tmp_path))


@pytest.mark.parametrize(
    "task,override,needle",
    [
        (tasks.run_train, "train.max_length=2", "train.max_length=2 leaves no answer token in any of the"),
        (tasks.run_eval, "eval.max_length=2", "eval.max_length=2 leaves no answer token to score"),
    ],
)
def test_nothing_to_train_or_score_fails_before_the_model_loads(
    tiny_model_dir, tmp_path, no_model_loads, task, override, needle
):
    run_dir = tmp_path / "run"
    with pytest.raises(RunFailed, match=re.escape(needle)):
        task(compose_config(*tiny_overrides(tiny_model_dir, override), output_dir=run_dir))
    assert not run_dir.exists()  # a run that failed before doing anything leaves no folder


def test_an_output_folder_that_cannot_be_written_is_named(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a read-only folder answers to a non-root user
    with pytest.raises(ResourceError, match="cannot write there"):
        tasks.run_eval(compose_config(*tiny_overrides(tiny_model_dir), output_dir=tmp_path))


@pytest.mark.slow
def test_the_entrypoint_exits_1_for_nothing_to_do_and_leaves_no_folder(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_overrides(tiny_model_dir, "task=train", "train.max_length=2", f"hydra.run.dir={run_dir}")
    result = subprocess.run(
        [sys.executable, "-m", "adl_llm.run", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("adl-llm: error: train.max_length=2 leaves no answer")
    assert "Traceback" not in result.stderr and not run_dir.exists()


def test_report_of_a_missing_folder_is_one_line(tmp_path):
    command = [sys.executable, "-m", "adl_llm.report", str(tmp_path / "nope")]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"adl-llm: error: {tmp_path / 'nope'}: no such folder; give a multirun's sweep folder"
    )
