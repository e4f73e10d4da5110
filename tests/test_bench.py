"""`bench/` end to end on the CPU with the tiny model: every part runs, the JSON holds what the report reads."""

from __future__ import annotations

import math

import pytest
import torch

from bench import framework, peer, profile_train, report
from bench import run as bench_run
from tests.conftest import read_json


@pytest.mark.slow
def test_bench_runs_every_part_and_reports(tiny_model_dir, tmp_path, capsys):
    bench_run.main(
        [
            f"--model-path={tiny_model_dir}",
            "--train-steps=3",
            "--ablation-steps=2",
            "--ablations=2x8,checkpointing",
            "--warmup-steps=1",
            "--n-train=40",
            "--n-eval=5",
            "--n-gen=4",
            "--n-gen-baseline=2",
            "--max-new-tokens=6",
            "--precision-check",
            "--dtype=float32",  # the fast path's text equals the batched path's in float32 (in bfloat16, rounding)
            f"--out={tmp_path}",
        ]
    )
    result = read_json(tmp_path / "embedded.json")
    train = result["train"]
    for run in ("baseline", "framework", "ablation_2x8", "ablation_checkpointing"):
        assert "error" not in train[run], train[run]
    for side, (liger, _) in peer.SIDES.items():  # TRL where the bench extra is installed, else a stated skip
        run = train[f"peer_{side}"]
        assert run.get("steps") == 3 or run["skipped"] == peer.missing_package(liger), run
    assert train["baseline"]["steps"] == train["framework"]["steps"] == 3
    assert len(train["framework"]["step_seconds"]) == len(train["framework"]["losses"]) == 3
    # How a step is split into passes must not change its loss (same weights, same data, same first step).
    assert train["ablation_2x8"]["losses"][0] == pytest.approx(train["framework"]["losses"][0], rel=1e-3)
    ppl = result["ppl"]
    assert set(ppl["framework"]) == {"1", "16", "64"} and "fp32" in ppl
    assert all(v is not None and math.isfinite(v) for v in ppl["framework"]["64"]["ppl"])
    assert ppl["max_rel_diff"] < 1e-2
    gen = result["gen"]
    assert gen["n_prompts"] == 4 and gen["n_prompts_baseline"] == 2
    for beams in (1, 3, 5):
        run = gen[f"beams{beams}"]
        assert len(run["framework"]["texts"]) == 4
        # the fast path of a generate job, compiled (on a CPU too, the NF4 weights dequantised in its graph), its
        # warm-up apart, the batched path's text
        assert run["fast"]["path"] == "static_cache+compile+nf4_graph" and run["fast"]["warmup_seconds"] > 0
        assert run["fast"]["texts"] == run["framework"]["texts"] and run["fast"]["same_text_as_batched"] == 4
    text = report.render(report.load([tmp_path]))
    assert "adl-llm, 2x8" in text and "precision check" in text and "| 5 |" in text
    assert "fast path ex/s" in text and "(static_cache+compile+nf4_graph)" in text
    assert "Training against the peer, TRL's SFTTrainer" in text and "| trl + liger |" in text
    assert "median step's tokens/s" in text
    capsys.readouterr()


@pytest.mark.slow
def test_profile_train_writes_its_table(tiny_model_dir, tmp_path):
    profile_train.main([f"--model-path={tiny_model_dir}", "--passes=1", "--examples=4", f"--out={tmp_path}"])
    text = (tmp_path / "profile.txt").read_text(encoding="utf-8")
    assert "wall time a step" in text and "gradient all-reduce alone" in text and "aten::" in text


def test_ddp_table_compares_each_run_with_one_gpu_at_its_batch(tmp_path):
    from adl_llm.artifacts import write_json
    from bench import ddp_table

    runs = {
        "1gpu-b16": (1000.0, [2.0, 1.5]),
        "2gpu-b16": (1800.0, [2.0, 1.52]),
        "2gpu-b64": (4000.0, [2.1]),
        "1gpu-b16-compile": (1500.0, [2.0, 1.5]),
        "2gpu-b16-compile": (2850.0, [2.0, 1.5]),
    }
    for name, (speed, losses) in runs.items():
        write_json(tmp_path / name / "metrics.json", {"train/tokens_per_s": speed, "train/losses": losses})
    table = ddp_table.rows(tmp_path)
    assert [(r["gpus"], r["batch"], r["variant"]) for r in table] == [
        (1, 16, ""),
        (2, 16, ""),
        (2, 64, ""),
        (1, 16, "compile"),
        (2, 16, "compile"),
    ]
    assert table[1]["speedup"] == pytest.approx(1.8) and table[1]["loss_diff"] == pytest.approx(0.01)
    assert table[2]["speedup"] is None  # no one-GPU run at batch 64 to compare with
    assert table[4]["speedup"] == pytest.approx(1.9)  # against the compiled one-GPU run, not the eager one
    text = ddp_table.markdown(table)
    assert "| 2 | 16 |  | 1,800 |  | 1.80 |" in text and "| 2 | 16 | compile | 2,850 |  | 1.90 |" in text

    # With every step's time, the ratio is of the rates after the first steps (a compiled run's compiles).
    warm_up, steady = [30.0] + [1.0] * 11, [2.0] * 12
    for name, seconds in (("1gpu-b16-compile", warm_up), ("2gpu-b16-compile", [30.0] + [0.5] * 11)):
        metrics = {"train/tokens_per_s": 100.0, "train/losses": [1.0] * 12, "train/step_seconds": seconds}
        write_json(tmp_path / name / "metrics.json", metrics | {"train/step_tokens": [1000] * 12})
    write_json(
        tmp_path / "1gpu-b16" / "metrics.json",
        {
            "train/tokens_per_s": 1000.0,
            "train/losses": [2.0],
            "train/step_seconds": steady,
            "train/step_tokens": [1] * 11,
        },
    )
    table = ddp_table.rows(tmp_path)
    assert table[3]["steady_tokens_per_s"] == pytest.approx(1000.0) and table[4]["speedup"] == pytest.approx(2.0)
    assert table[0]["steady_tokens_per_s"] is None  # a step's time without its tokens: no steady rate
    assert table[1]["speedup"] == pytest.approx(1.8)  # against the whole-run rate then
    assert "| 2 | 16 | compile | 100 | 2,000 | 2.00 |" in ddp_table.markdown(table)


@pytest.mark.slow
def test_profile_decode_writes_its_table(tiny_model_dir, tmp_path):
    from bench import profile_decode

    args = [
        f"--model-path={tiny_model_dir}",
        "--prompts=3",
        "--new-tokens=2",
        "--paths=plain,default,compiled_undeferred",
        f"--out={tmp_path}",
    ]
    profile_decode.main(args)
    text = (tmp_path / "profile-decode.txt").read_text(encoding="utf-8")
    assert "== plain (path plain)" in text and "== default" in text and "wall time a step" in text and "aten::" in text
    assert "== compiled_undeferred (path static_cache+compile" in text  # 2 new tokens: a warm-up within the cache
    assert "host waits for the card a step" in text


def test_the_median_step_rate_is_what_a_step_takes_once_its_shape_is_compiled():
    """One slow step in the window (a new shape compiling) halves the window's rate, not the median step's."""
    run = {"step_tokens": [100, 100, 100, 100, 100], "step_seconds": [9.0, 0.1, 0.1, 0.2, 0.1]}
    assert report.median_step_rate(run, warmup=1) == pytest.approx(1000.0)
    assert report.median_step_rate(run, warmup=5) is None and report.median_step_rate({}, warmup=0) is None


def test_decode_table_compares_each_run_with_its_plain_twin_and_names_failures(tmp_path):
    from adl_llm.artifacts import write_json
    from bench import decode_table

    def run(folder, path, speed, texts, beams=1, sample=False):
        setting = {"beams": beams, "do_sample": sample}
        metrics = {"gen/setting": setting, "gen/path": path, "gen/examples_per_s": speed, "gen/new_tokens_per_s": 1.0}
        write_json(folder / "metrics.json", metrics)
        write_json(folder / "predictions.json", [{"id": str(i), "output": t} for i, t in enumerate(texts)])

    run(tmp_path / "greedy-plain", "plain", 10.0, ["a", "b", "c"])
    run(tmp_path / "greedy-dequantize", "dequantize", 12.5, ["a", "b", "x"])
    (tmp_path / "greedy-dequantize" / "wall_ms.txt").write_text("31000")
    for job, speed in enumerate([20.0, 8.0]):
        run(tmp_path / "sampling-plain" / str(job), "plain", speed, ["s"], beams=1 + 2 * job, sample=True)
    (tmp_path / "sampling-fast" / "0").mkdir(parents=True)  # a job that crashed: no metrics.json
    table = decode_table.rows(tmp_path)
    by_run = {r["run"]: r for r in table if r["run"] != "sampling-plain"}
    assert by_run["greedy-dequantize"]["speedup"] == pytest.approx(1.25)
    assert by_run["greedy-dequantize"]["same_text"] == "2/3" and by_run["greedy-dequantize"]["command_s"] == 31.0
    assert by_run["greedy-plain"]["speedup"] is None and by_run["sampling-fast"]["failed"]
    assert "| sampling-fast | failed: no metrics.json" in decode_table.markdown(table)


def test_a_failing_fast_path_costs_only_its_own_figure(tiny_model_dir, monkeypatch, capsys):
    from argparse import Namespace

    from adl_llm.config import compose
    from adl_llm.data import load_records
    from adl_llm.modeling import load_model, load_tokenizer

    cfg = compose(f"model.name_or_path={tiny_model_dir}", "model.quant=none", "model.dtype=float32")
    model, tokenizer = load_model(cfg.model), load_tokenizer(cfg.model, str(tiny_model_dir))
    records = load_records(cfg.data.eval_file, need_outputs=True, limit=2)
    real = framework.generate_framework

    def fast_fails(*args, fast=False, **kwargs):
        if fast:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(framework, "generate_framework", fast_fails)
    args = Namespace(beams="1", max_new_tokens=3, gen_batch_size=None, n_gen_baseline=1, gen_fast=True)
    out = bench_run.bench_gen(args, cfg, model, tokenizer, records)
    assert out["beams1"]["fast"] == {"error": "OutOfMemoryError: CUDA out of memory"}
    assert len(out["beams1"]["framework"]["texts"]) == 2 and out["beams1"]["baseline"]["examples_per_s"] > 0
    assert "failed: OutOfMemoryError" in report._gen(out)
    capsys.readouterr()
