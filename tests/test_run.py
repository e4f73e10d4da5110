"""The entrypoint end to end: task=eval on the tiny model, and the real embedded model from its packages."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adl_llm.data import few_shot_examples, load_records
from adl_llm.modeling import tokenizer_fingerprint
from adl_llm.prompts import build_prompts
from tests.conftest import EVAL_FILE, TRAIN_FILE, compose_config, read_json, run_entrypoint, tiny_overrides
from tests.test_evaluate import reference_ppl

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("prompt", ["zero_shot", "few_shot"])
def test_task_eval_matches_an_independent_plain_loop(tiny_model_dir, tmp_path, prompt):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_model_dir, "task=eval", f"prompt={prompt}", "eval.batch_size=7")
    result = run_entrypoint(*overrides, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    metrics = read_json(run_dir / "metrics.json")

    records = load_records(str(EVAL_FILE), need_outputs=True)
    shots = few_shot_examples(load_records(str(TRAIN_FILE), need_outputs=True), 3) if prompt == "few_shot" else []
    prompts = build_prompts([r.instruction for r in records], compose_config(f"prompt={prompt}").prompt, shots)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    expected = [reference_ppl(model, tokenizer, p, r.output) for p, r in zip(prompts, records)]

    assert metrics["eval/ids"] == [r.id for r in records]
    assert metrics["eval/perplexities"] == pytest.approx(expected, rel=1e-4)
    assert metrics["eval/perplexity"] == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    run_info = read_json(run_dir / "run.json")
    assert run_info["config"]["prompt"]["name"] == prompt and run_info["provenance"]["packages"]["torch"]
    assert run_info["tokenizer"] == tokenizer_fingerprint(tokenizer)  # which tokenizer made these numbers


def test_model_folder_that_does_not_exist_is_one_line(tmp_path):
    result = run_entrypoint("task=eval", f"model.name_or_path={tmp_path}/missing", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2
    assert result.stderr.strip() == f"adl-llm: error: model.name_or_path={tmp_path}/missing: no such model folder"


def test_bad_data_is_one_line_before_the_model_loads(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "a", "instruction": "x", "output": "y"}, {"id": "a", "instruction": "z", "output": "w"}]')
    result = run_entrypoint("task=eval", f"data.eval_file={bad}", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2
    assert result.stderr.strip() == f"adl-llm: error: {bad}: record 1: duplicate id 'a' (first at record 0)"
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.xdist_group("embedded")  # one worker builds the embedded model for both tests that need it
def test_embedded_model_from_its_packages_to_a_perplexity(embedded_cache, tmp_path):
    """Built by two processes at once (the fixture); both got the same complete folder; then a perplexity."""
    assert sorted(p.name for p in (embedded_cache / "models").iterdir() if p.is_dir()) == ["gemma3-270m"]
    run_dir = tmp_path / "run"
    env = {"ADL_LLM_CACHE": str(embedded_cache)}
    result = run_entrypoint("task=eval", "data.n_eval=6", "eval.batch_size=3", f"hydra.run.dir={run_dir}", env=env)
    assert result.returncode == 0, result.stderr
    metrics = read_json(run_dir / "metrics.json")
    assert len(metrics["eval/perplexities"]) == 6
    # A working 270M model scores these sentences far below its 262,144-token vocabulary.
    assert all(math.isfinite(v) and 1 < v < 2000 for v in metrics["eval/perplexities"])
    assert read_json(run_dir / "run.json")["tokenizer"]["vocab_size"] == 262144


def test_a_run_that_fails_before_doing_anything_leaves_no_folder(tmp_path):
    for override in ("gen.beams=0", f"data.eval_file={tmp_path}/missing.json"):
        run_dir = tmp_path / "run"
        result = run_entrypoint("task=eval", override, f"hydra.run.dir={run_dir}")
        assert result.returncode == 2 and result.stderr.startswith("adl-llm: error: ")
        assert not run_dir.exists(), override
