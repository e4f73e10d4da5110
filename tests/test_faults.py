"""Runs that go wrong: a non-finite loss, two runs in one folder, a refused resume, damaged checkpoints, a full
disk, killed writers, long prompts, an awkward tokenizer, Ctrl-C (docs/RELIABILITY.md)."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from safetensors.torch import load_file

from adl_llm import artifacts, checkpoint, decoding, embedded, generate, tasks
from adl_llm.artifacts import UMASK, claimed, remove_stale_temporaries, write_json
from adl_llm.config import PROJECT_ROOT
from adl_llm.errors import ResourceError, RunFailed, UserError
from adl_llm.train import planned_steps
from tests.conftest import EVAL_FILE, compose_config, read_json, tiny_overrides


def _cfg(tiny_model_dir, run_dir, *extra):
    return compose_config(*tiny_overrides(tiny_model_dir, "data.n_eval=4", *extra), output_dir=run_dir)


@pytest.mark.parametrize("broken", ["loss", "gradient"])
def test_a_loss_that_goes_non_finite_stops_the_run_and_saves_nothing(tiny_model_dir, tmp_path, monkeypatch, broken):
    from adl_llm import train as training

    real = training.accumulate_gradients
    calls = []

    def second_step_breaks(model, *args, **kwargs):
        nll, tokens = real(model, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2 and broken == "gradient":
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(math.inf)
        return (math.nan if len(calls) == 2 and broken == "loss" else nll), tokens

    monkeypatch.setattr(training, "accumulate_gradients", second_step_breaks)
    cfg = _cfg(tiny_model_dir, tmp_path / "run", "data.n_train=16", "train.batch_size=4", "train.save_every=1")
    with pytest.raises(RunFailed, match=r"became (nan|inf) at step 2; nothing was saved from this step on"):
        tasks.run_train(cfg)
    run_dir = tmp_path / "run"
    assert not (run_dir / "adapter").exists() and not (run_dir / "metrics.json").exists()
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000001"]  # the last sound one
    assert (run_dir / "error.txt").read_text().startswith(f"the {'loss' if broken == 'loss' else 'gradient norm'}")


def test_metrics_are_strict_json(tmp_path):
    write_json(tmp_path / "m.json", {"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}})

    def refuse(constant):
        raise AssertionError(f"{constant} in strict JSON")

    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse) == {
        "a": None,
        "b": [None, 1.5],
        "c": {"d": None},
    }


def test_max_steps_caps_training_instead_of_replacing_the_epochs(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, "data.n_train=16", "train.max_steps=2", "train.epochs=1")
    assert planned_steps(16, cfg) == 1  # 16 examples, 16 a step, one epoch: one step, whatever max_steps allows
    assert planned_steps(64, cfg) == 2
    assert tasks.run_train(cfg)["train/steps"] == 1


def test_a_second_run_in_a_busy_folder_is_refused_and_writes_nothing(tiny_model_dir, tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("the first run's")
    with claimed(run_dir), pytest.raises(UserError, match="another adl-llm run is using this folder"):
        tasks.run_eval(_cfg(tiny_model_dir, run_dir))
    assert [p.name for p in run_dir.iterdir()] == ["keep.txt"]
    with caplog.at_level(logging.INFO):
        tasks.run_eval(_cfg(tiny_model_dir, run_dir))  # free again once the first run is over
    assert (run_dir / "metrics.json").is_file() and f"run folder: {run_dir}" in caplog.text


@pytest.mark.slow
def test_a_refused_resume_leaves_the_finished_runs_files_untouched(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *tiny_overrides(tiny_model_dir, "task=train", "data.n_train=8", "data.n_eval=2"),
        f"hydra.run.dir={run_dir}",
    ]
    command = [sys.executable, "-m", "adl_llm.run", *args]
    assert subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, timeout=300).returncode == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert run_dir / ".hydra" / "overrides.yaml" in before and run_dir / "run.json" in before
    refused = subprocess.run([*command, "optim.lr=1e-3"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "written with other training settings" in refused.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def _trained_run(tiny_model_dir, run_dir, *extra):
    settings = (
        "data.n_train=8",
        "train.batch_size=4",
        "train.epochs=2",
        "train.save_every=1",
        "train.keep_checkpoints=4",
    )
    return tasks.run_train(_cfg(tiny_model_dir, run_dir, *settings, *extra))


@pytest.mark.parametrize("damaged", ["adapter.safetensors", "state.json"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tiny_model_dir, tmp_path, caplog, damaged):
    straight = _trained_run(tiny_model_dir, tmp_path / "straight")
    run_dir = tmp_path / "run"
    _trained_run(tiny_model_dir, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-000004")  # killed before its last step...
    shutil.rmtree(run_dir / "adapter")
    newest = run_dir / "checkpoints" / "step-000003" / damaged  # ...and the newest file it kept is truncated
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        resumed = _trained_run(tiny_model_dir, run_dir)
    assert "step-000003 is damaged" in caplog.text
    assert resumed["train/losses"] == straight["train/losses"]  # resumed from step 2, to the same end

    for path in (run_dir / "checkpoints").glob("step-*/adapter.safetensors"):
        path.write_bytes(b"")
    with pytest.raises(UserError, match=r"every checkpoint is damaged; start over with train\.resume=never"):
        _trained_run(tiny_model_dir, run_dir)


def test_a_full_disk_while_saving_a_checkpoint_is_named_and_leaves_no_temporary(tiny_model_dir, tmp_path, monkeypatch):
    real_save = checkpoint.save_file

    def disk_full(tensors, path):
        if path.name == "optimizer.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    run_dir = tmp_path / "run"
    with pytest.raises(ResourceError, match="no space left on the device while saving a checkpoint"):
        _trained_run(tiny_model_dir, run_dir)
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert (run_dir / "error.txt").is_file()


def test_what_killed_writers_left_is_removed_on_the_next_run(tiny_model_dir, tmp_path):
    dead = 2**22 + 12345  # above Linux's default pid_max: no process has it
    run_dir = tmp_path / "run"
    for folder in (run_dir, run_dir / "checkpoints"):
        folder.mkdir(parents=True, exist_ok=True)
    left = [run_dir / f".adapter.tmp-{dead}", run_dir / "checkpoints" / f".step-000002.tmp-{dead}"]
    for path in left:
        path.mkdir()
        (path / "adapter.safetensors").write_bytes(b"half")
    live = run_dir / "checkpoints" / f".step-000003.tmp-{os.getpid()}"  # a writer still running: left alone
    live.mkdir()
    _trained_run(tiny_model_dir, run_dir, "train.max_steps=1")
    assert not any(path.exists() for path in left) and live.exists()

    models = tmp_path / "cache" / "models"
    (models / f".gemma3-270m.building-{dead}").mkdir(parents=True)
    assert remove_stale_temporaries(models) == [models / f".gemma3-270m.building-{dead}"]


def test_a_process_waiting_for_the_embedded_build_says_so(tmp_path, caplog):
    from filelock import FileLock

    target = tmp_path / "gemma3-270m"
    held = FileLock(str(target) + ".lock")
    held.acquire()
    waiter = threading.Thread(target=lambda: embedded._build_lock(target).__enter__())
    with caplog.at_level(logging.WARNING):
        waiter.start()
        time.sleep(1)
        assert "another process is building" in caplog.text
        held.release()
        waiter.join(timeout=30)
    assert not waiter.is_alive()


def test_results_follow_the_umask(tiny_model_dir, tmp_path):
    _trained_run(tiny_model_dir, tmp_path, "train.max_steps=1")
    expected = 0o666 & ~UMASK
    for name in ("metrics.json", "run.json", "adapter/adapter_model.safetensors", "adapter/training.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


def _long_eval_file(tmp_path):
    records = json.loads(EVAL_FILE.read_text(encoding="utf-8"))[:3]
    records[1] = {**records[1], "instruction": "子曰學而時習之" * 1200}  # 8,400 characters: 8,400 tokens here
    path = tmp_path / "long.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    return path, records[1]["id"]


def test_a_long_prompt_is_cut_from_the_left_counted_and_decoded_alone(tiny_model_dir, tmp_path, monkeypatch):
    path, long_id = _long_eval_file(tmp_path)
    batches = []
    real_pad_left = decoding.pad_left
    monkeypatch.setattr(
        decoding, "pad_left", lambda rows, *rest: batches.append(len(rows)) or real_pad_left(rows, *rest)
    )
    overrides = (f"data.eval_file={path}", "gen=greedy", "gen.max_new_tokens=4", "gen.max_prompt_tokens=3000")
    metrics = tasks.run_generate(_cfg(tiny_model_dir, tmp_path / "run", *overrides))
    assert metrics["gen/n_prompts_cut"] == 1 and len(read_json(tmp_path / "run" / "predictions.json")) == 3
    assert batches == [1, 2]  # the long prompt alone, then the two short ones together

    refuse = (*overrides, "gen.long_prompts=refuse")
    with pytest.raises(UserError, match=f"record '{long_id}': its prompt has 8"):
        tasks.run_generate(_cfg(tiny_model_dir, tmp_path / "refused", *refuse))
    assert not (tmp_path / "refused").exists()


def test_stop_strings_work_with_a_tokenizer_that_transformers_cannot_map(tiny_model_dir, tmp_path):
    """A WordLevel tokenizer without a decoder: transformers' StopStringCriteria cannot be built for it."""
    from tokenizers import Tokenizer

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    core = Tokenizer.from_file(str(folder / "tokenizer.json"))
    core.decoder = None
    core.save(str(folder / "tokenizer.json"))
    overrides = ("gen=greedy", "gen.max_new_tokens=6", "gen.stop_strings=[x]")
    cfg = compose_config(*tiny_overrides(folder, "data.n_eval=3", *overrides), output_dir=tmp_path / "run")
    metrics = tasks.run_generate(cfg)
    assert metrics["gen/n_examples"] == 3 and len(read_json(tmp_path / "run" / "predictions.json")) == 3


def test_a_pipeline_whose_decoding_fails_keeps_what_training_and_scoring_gave(tiny_model_dir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("decoding broke")

    monkeypatch.setattr(generate, "generate_from_ids", broken)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="decoding broke"):
        tasks.run_pipeline(_cfg(tiny_model_dir, run_dir, "data.n_train=8", "train.batch_size=4"))
    partial = read_json(run_dir / "metrics.partial.json")
    assert partial["train/steps"] == 2 and len(partial["eval/perplexities"]) == 4
    assert not (run_dir / "metrics.json").exists() and (run_dir / "adapter").is_dir()
    assert "decoding broke" in (run_dir / "error.txt").read_text()


@pytest.mark.slow
def test_ctrl_c_during_training_says_how_to_resume(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_overrides(tiny_model_dir, "task=train", "train.epochs=50", "train.batch_size=4", "train.save_every=1")
    command = [sys.executable, "-m", "adl_llm.run", *args, f"hydra.run.dir={run_dir}"]
    # Ctrl-C as at a terminal, even where this suite was started in the background (`make test &`: SIGINT ignored,
    # and the run would inherit that).
    proc = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while not list((run_dir / "checkpoints").glob("step-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "adl-llm: interrupted; rerun the same command with hydra.run.dir=" in stderr and "Traceback" not in stderr
    assert (run_dir / "error.txt").read_text().startswith("interrupted")
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert newest.name in stderr and load_file(newest / "adapter.safetensors")  # whole, and named


def test_artifacts_module_names_every_temporary_pattern():
    for name in (".step-000003.tmp-12", ".adapter.tmp-12", ".adapter.old-12", ".gemma3-270m.building-12"):
        assert artifacts.TEMPORARY.match(name), name
