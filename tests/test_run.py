"""The entrypoint end to end: task=eval on the tiny model, and the real embedded model from its packages."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adl_llm.config import PROJECT_ROOT
from adl_llm.data import few_shot_examples, load_records
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

    assert metrics["ids"] == [r.id for r in records]
    assert metrics["perplexities"] == pytest.approx(expected, rel=1e-4)
    assert metrics["mean_perplexity"] == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    run_info = read_json(run_dir / "run.json")
    assert run_info["config"]["prompt"]["name"] == prompt and run_info["provenance"]["packages"]["torch"]


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


def test_embedded_model_from_its_packages_to_a_perplexity(tmp_path):
    """Two processes start the first build at once; both get the same complete folder; then a perplexity."""
    env = {"ADL_LLM_CACHE": str(tmp_path / "cache")}
    build = [
        sys.executable,
        "-c",
        "from adl_llm.embedded import embedded_model_dir as d; print(d('embedded:gemma3-270m'))",
    ]
    procs = [
        subprocess.Popen(build, cwd=PROJECT_ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    folders = [proc.communicate(timeout=900)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert folders[0] == folders[1] == str(tmp_path / "cache" / "models" / "gemma3-270m")
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir()) == ["gemma3-270m"]

    run_dir = tmp_path / "run"
    result = run_entrypoint("task=eval", "data.n_eval=6", "eval.batch_size=3", f"hydra.run.dir={run_dir}", env=env)
    assert result.returncode == 0, result.stderr
    metrics = read_json(run_dir / "metrics.json")
    assert len(metrics["perplexities"]) == 6
    # A working 270M model scores these sentences far below its 262,144-token vocabulary.
    assert all(math.isfinite(v) and 1 < v < 2000 for v in metrics["perplexities"])
