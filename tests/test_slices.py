"""Metrics per slice of the eval file (data.slices): per direction for the shipped data, `other` for the rest."""

from __future__ import annotations

import pytest

from adl_llm.data import load_records, slice_names
from adl_llm.errors import ConfigError
from adl_llm.report import job_rows
from adl_llm.scores import perplexity_summary
from adl_llm.tasks import run_eval, run_generate
from tests.conftest import EVAL_FILE, PROJECT_ROOT, compose_config, tiny_overrides


def test_the_shipped_rules_split_the_data_by_direction_and_leave_nothing_over():
    rules = compose_config().data.slices
    for name in ("train.json", "public_test.json"):
        records = load_records(str(PROJECT_ROOT / "data" / "classical_zh" / name), need_outputs=True)
        names = slice_names(records, rules)
        assert set(names) == {"classical_to_modern", "modern_to_classical"}, name
    records = load_records(str(EVAL_FILE), need_outputs=True)
    assert slice_names(records[:2], rules) == ["classical_to_modern", "modern_to_classical"]  # asked, read off


def test_eval_and_generate_report_each_slice(tiny_model_dir, tmp_path):
    cfg = compose_config(*tiny_overrides(tiny_model_dir, "gen=greedy", "gen.max_new_tokens=4"), output_dir=tmp_path)
    metrics = run_eval(cfg)
    names = slice_names(load_records(str(EVAL_FILE), need_outputs=True), cfg.data.slices)
    for name in set(names):
        mine = [v for v, n in zip(metrics["eval/perplexities"], names) if n == name]
        assert metrics[f"eval/perplexity/{name}"] == pytest.approx(perplexity_summary(mine)["eval/perplexity"])
        assert metrics[f"eval/n_examples/{name}"] == len(mine)
    assert "eval/perplexity/other" not in metrics  # shown only when some record matches no rule
    generated = run_generate(
        compose_config(*tiny_overrides(tiny_model_dir, "gen=greedy", "gen.max_new_tokens=4"), output_dir=tmp_path / "g")
    )
    assert {f"gen/chrf/{n}" for n in set(names)} <= set(generated)
    assert sum(generated[f"gen/n_examples/{n}"] for n in set(names)) == 12


def test_records_no_rule_matches_form_the_other_slice_and_no_rules_means_no_slices(tiny_model_dir, tmp_path):
    rules = ("data.slices.classical_to_modern='白話'", "data.slices.modern_to_classical='a phrase in no record'")
    metrics = run_eval(compose_config(*tiny_overrides(tiny_model_dir, *rules), output_dir=tmp_path / "a"))
    assert metrics["eval/n_examples/classical_to_modern"] + metrics["eval/n_examples/other"] == 12
    assert "eval/n_examples/modern_to_classical" not in metrics  # a slice with no record is not shown
    none = run_eval(compose_config(*tiny_overrides(tiny_model_dir, "data.slices=null"), output_dir=tmp_path / "b"))
    assert not [key for key in none if key.count("/") > 1]


@pytest.mark.parametrize(
    "rule,message",
    [("bad='('", "data.slices.bad: is not a regular expression"), ("other=x", "data.slices.other: is the name")],
)
def test_a_slice_rule_that_cannot_work_is_refused(rule, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(f"+data.slices.{rule}")


def test_the_sweep_summary_has_a_column_per_slice(tiny_model_dir, tmp_path):
    for job in ("0", "1"):
        run_eval(compose_config(*tiny_overrides(tiny_model_dir), output_dir=tmp_path / job))
    columns = set(job_rows(tmp_path)[0])
    assert {"ppl", "ppl[classical_to_modern]", "ppl[modern_to_classical]"} <= columns
