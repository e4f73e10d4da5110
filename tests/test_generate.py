"""Decoding on the tiny model: batching, stop strings, predictions, metrics and sweep summaries."""

from __future__ import annotations

import csv
import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from adl_llm.config import GenConfig
from adl_llm.data import load_records
from adl_llm.decoding import cut_at_stop, generate_texts
from adl_llm.tasks import run_generate
from tests.conftest import EVAL_FILE, compose_config, read_json, run_entrypoint, tiny_overrides


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


PROMPTS = ["USER: 子曰 ASSISTANT:", "USER: 短 ASSISTANT:", "USER: 這是一個很長很長的問題，請翻譯成文言文 ASSISTANT:"]


def test_cut_at_stop_keeps_the_text_before_the_earliest_stop():
    assert cut_at_stop(" 其言也善。\n2. USER: 又問", ["USER:", "\n"]) == "其言也善。"
    assert cut_at_stop("其言也善。 USER: 又問", ["USER:", "\n"]) == "其言也善。"
    assert cut_at_stop("其言也善。", ["USER:"]) == "其言也善。"


@pytest.mark.parametrize("beams", [1, 3])
def test_left_padded_batches_decode_like_one_prompt_at_a_time(tiny, beams):
    model, tokenizer = tiny
    gen = GenConfig(beams=beams, do_sample=False, max_new_tokens=10, stop_strings=["USER:"], batch_size=3)
    batched = generate_texts(model, tokenizer, PROMPTS, gen, progress=False)
    gen.batch_size = 1
    assert batched == generate_texts(model, tokenizer, PROMPTS, gen, progress=False)
    assert all(batched)


def test_generation_is_cut_at_a_stop_string(tiny):
    model, tokenizer = tiny
    free = GenConfig(beams=1, do_sample=False, max_new_tokens=12, stop_strings=["USER:"], batch_size=3)
    full = generate_texts(model, tokenizer, PROMPTS, free, progress=False)
    stop = full[0][4]  # a character the model goes on to produce: the answer must end just before it
    cut = GenConfig(beams=1, do_sample=False, max_new_tokens=12, stop_strings=[stop], batch_size=3)
    texts = generate_texts(model, tokenizer, PROMPTS, cut, progress=False)
    assert texts[0] == full[0][: full[0].index(stop)].strip()
    assert all(stop not in text for text in texts)


def test_the_stop_string_tables_are_built_once_per_tokenizer_and_strings(tiny_model_dir, tiny, monkeypatch):
    """A sweep's jobs load the tokenizer anew: its tables (a second or two for a 262k vocabulary) are built once."""
    from adl_llm import decoding

    built = []
    real = decoding.StopStringCriteria
    monkeypatch.setattr(decoding, "_STOP_TABLES", {})
    monkeypatch.setattr(decoding, "StopStringCriteria", lambda *args: built.append(args) or real(*args))
    _, tokenizer = tiny
    again = AutoTokenizer.from_pretrained(tiny_model_dir)  # the next job's
    first = decoding.stop_criterion(tokenizer, ["USER:"])(8)
    assert decoding.stop_criterion(again, ["USER:"])(16) is first and len(built) == 1
    assert decoding.stop_criterion(again, ["USER:", "\n"])(8) is not first and len(built) == 2  # other strings


def test_task_generate_writes_ordered_predictions_and_metrics(tiny_model_dir, tmp_path):
    cfg = compose_config(
        *tiny_overrides(tiny_model_dir, "task=generate", "gen=beam3", "gen.max_new_tokens=8", "gen.batch_size=5"),
        output_dir=tmp_path,
    )
    run_generate(cfg)
    predictions = read_json(tmp_path / "predictions.json")
    assert [p["id"] for p in predictions] == [r.id for r in load_records(str(EVAL_FILE), need_outputs=True)]
    assert all(isinstance(p["output"], str) and set(p) == {"id", "output"} for p in predictions)
    metrics = read_json(tmp_path / "metrics.json")
    assert metrics["run/peak_rss_gib"] > 0.05 and metrics["gen/examples_per_s"] > 0
    assert 0 <= metrics["gen/chrf"] <= 100 and 0 <= metrics["gen/bleu"] <= 100


def test_a_file_without_outputs_still_gets_predictions(tiny_model_dir, tmp_path):
    unlabelled = tmp_path / "test.json"
    records = json.loads(EVAL_FILE.read_text(encoding="utf-8"))[:4]
    unlabelled.write_text(json.dumps([{"id": r["id"], "instruction": r["instruction"]} for r in records]))
    overrides = tiny_overrides(tiny_model_dir, "gen=greedy", "gen.max_new_tokens=4", f"data.eval_file={unlabelled}")
    run_generate(compose_config(*overrides, output_dir=tmp_path / "run"))
    assert [p["id"] for p in read_json(tmp_path / "run" / "predictions.json")] == [r["id"] for r in records]
    assert "gen/chrf" not in read_json(tmp_path / "run" / "metrics.json")


@pytest.mark.slow
def test_beam_sweep_summary_has_a_row_per_job_and_marks_the_failed_one(tiny_model_dir, tmp_path):
    sweep = tmp_path / "sweep"
    args = tiny_overrides(tiny_model_dir, "task=generate", "gen=greedy", "gen.max_new_tokens=4", "data.n_eval=4")
    result = run_entrypoint("-m", *args, "gen.beams=1,0,3", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 1 and "job 1: gen.beams: must be >= 1" in result.stderr
    with open(sweep / "summary.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [row["overrides"] for row in rows] == ["gen.beams=1", "gen.beams=0", "gen.beams=3"]
    assert [row["status"].split(":")[0] for row in rows] == ["ok", "failed", "ok"]
    assert rows[0]["peak_rss_gib"] and rows[2]["chrf"] and not rows[1]["chrf"]
    assert not (sweep / "1" / "metrics.json").exists() and (sweep / "generation.png").is_file()
