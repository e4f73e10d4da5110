"""QLoRA training on the tiny model: what trains, the loss, accumulation, chains, checkpoints and resume."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from adl_llm.batching import padded_width
from adl_llm.checkpoint import complete_checkpoints
from adl_llm.config import PROJECT_ROOT, DType, ModelConfig, Quant
from adl_llm.data import load_records
from adl_llm.encode import encode_examples
from adl_llm.errors import UserError
from adl_llm.evaluate import perplexities
from adl_llm.loss import accumulate_gradients
from adl_llm.micro_batches import split_step
from adl_llm.modeling import add_lora, gradient_checkpointing_on, load_model, set_gradient_checkpointing
from adl_llm.nf4 import nf4_layers
from adl_llm.prompts import build_prompts
from adl_llm.train import train
from tests.conftest import TRAIN_FILE, compose_config, read_json, run_entrypoint, tiny_overrides


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _examples(tokenizer, n: int):
    records = load_records(str(TRAIN_FILE), need_outputs=True, limit=n)
    prompts = build_prompts([r.instruction for r in records], compose_config().prompt)
    return encode_examples(tokenizer, prompts, [r.output for r in records], 2048)


def _model(tiny_model_dir, quant: Quant = Quant.none, seed: int = 0, **lora):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), quant=quant, dtype=DType.float32)
    model = load_model(cfg, torch.device("cpu"))
    torch.manual_seed(seed)
    return add_lora(model, compose_config(*(f"lora.{k}={v}" for k, v in lora.items())).lora)


def _train(model, examples, tmp_path, *overrides):
    cfg = compose_config(*overrides, output_dir=tmp_path)
    return train(model, examples, cfg, tmp_path, pad_id=0)


def _adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_nf4_base_stays_frozen_while_the_adapter_learns(tiny_model_dir, tokenizer, tmp_path):
    model = _model(tiny_model_dir, Quant.nf4)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    adapter_before = _adapter(model)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    _train(model, _examples(tokenizer, 8), tmp_path, "train.batch_size=4", "train.grad_accum=2", "optim.lr=1e-2")
    for name, value in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(value, frozen_before[name]), name
    changed = [n for n, v in _adapter(model).items() if not torch.equal(v, adapter_before[n])]
    assert len(changed) == len(adapter_before)  # every A and B of q and v in both layers


def test_evaluate_then_train_still_trains_under_cpu_nf4(tiny_model_dir, tokenizer, tmp_path):
    """bitsandbytes repacks NF4 weights for its AVX512-BF16 inference kernel after an eval-mode no-grad forward on a
    CPU that has one; training must undo it, or LoRA learns nothing. On a CPU without that kernel the forward leaves
    the weights as they are, so the test packs them as bitsandbytes would: the fix is exercised on every CPU."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    def packed(model) -> list[bool]:
        return [bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False)) for layer in nf4_layers(model)]

    examples = _examples(tokenizer, 8)
    settings = ("train.batch_size=4", "train.micro_batch_size=4", "optim.lr=1e-2")
    fresh = _train(_model(tiny_model_dir, Quant.nf4), examples, tmp_path / "fresh", *settings)

    model = _model(tiny_model_dir, Quant.nf4)
    perplexities(model, examples, batch_size=4, pad_id=0, progress=False)
    if not any(packed(model)):  # this CPU has no AVX512-BF16: what the forward would have done there
        for layer in nf4_layers(model):
            layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
                layer.weight.data, layer.weight.quant_state
            )
    assert all(packed(model))
    adapter_before = _adapter(model)
    state = _train(model, examples, tmp_path / "evaluated", *settings)
    assert not any(packed(model))
    assert all(not torch.equal(v, adapter_before[n]) for n, v in _adapter(model).items())
    # As if never evaluated, up to bitsandbytes' unpacking, which rounds the NF4 weights a little differently.
    assert state.losses == pytest.approx(fresh.losses, rel=2e-3)


def test_fitting_16_records_lowers_their_loss_and_perplexity(tiny_model_dir, tokenizer, tmp_path):
    model = _model(tiny_model_dir)
    examples = _examples(tokenizer, 16)
    before = perplexities(model, examples, batch_size=8, pad_id=0, progress=False)
    state = _train(
        model, examples, tmp_path, "train.epochs=15", "train.batch_size=8", "train.micro_batch_size=4", "optim.lr=3e-2"
    )
    after = perplexities(model, examples, batch_size=8, pad_id=0, progress=False)
    assert state.global_step == 30 and len(state.losses) == 30
    assert sum(state.losses[-4:]) / 4 < 0.8 * sum(state.losses[:4]) / 4
    assert sum(after) / len(after) < 0.5 * sum(before) / len(before)


def test_two_by_eight_accumulates_the_gradient_of_sixteen_by_one(tiny_model_dir, tokenizer):
    """The loss is normalised over the tokens of the whole effective batch, however the batch is split."""
    examples = _examples(tokenizer, 16)
    results = []
    splits = [[examples[i : i + micro] for i in range(0, 16, micro)] for micro in (2, 16, 5)]  # 2x8, 16x1, 5+5+5+1
    auto = compose_config("train.micro_batch_tokens=300").train
    splits.append(split_step(examples, auto, 300))  # the default: passes of similar length under a token budget
    assert len(splits[-1]) > 2 and sorted(id(ex) for p in splits[-1] for ex in p) == sorted(map(id, examples))
    bucketed = split_step(examples, auto, 300, multiple=16)  # as on a GPU: pass widths rounded up to 16 columns
    assert all(len(p) == 1 or padded_width(len(p[0].input_ids), 16) * len(p) <= 300 for p in bucketed)
    cases = [(passes, 1) for passes in splits] + [(bucketed, 16)]
    for passes, multiple in cases:
        model = _model(tiny_model_dir, seed=3, lora_dropout=0.0)  # dropout off: its masks draw randomness
        torch.manual_seed(4)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero, which would leave A without a gradient
                param.data.normal_(std=0.1)
        model.train()
        n_scored = sum(ex.n_scored for ex in examples)
        loss, tokens = accumulate_gradients(model, passes, n_scored, 0, torch.device("cpu"), multiple)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss, tokens, grads))
    loss, tokens, grads = results[0]
    assert len(grads) == 8 and all(g.abs().max() > 0 for g in grads.values())
    for other_loss, other_tokens, other_grads in results[1:]:
        assert other_loss == pytest.approx(loss, rel=1e-6) and other_tokens == tokens
        for name, grad in grads.items():  # float32 rounding is ~1e-6; a per-micro-batch mean is off by ~1e-2
            assert (grad - other_grads[name]).norm() / grad.norm() < 1e-5, name


@pytest.mark.slow
def test_chain_multirun_starts_each_stage_from_the_one_before(tiny_model_dir, tmp_path):
    sweep = tmp_path / "sweep"
    args = tiny_overrides(tiny_model_dir, "task=train", "data.n_train=16", "train.init_from=previous")
    result = run_entrypoint("-m", *args, "train.epochs=1,1", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr
    assert all((sweep / job / "adapter" / "adapter_model.safetensors").is_file() for job in ("0", "1"))
    stage2 = read_json(sweep / "1" / "adapter" / "training.json")
    assert stage2["cumulative_epochs"] == 2 and [s["run_dir"] for s in stage2["stages"]] == [str(sweep / "0")] + [
        str(sweep / "1")
    ]
    summary = (sweep / "summary.csv").read_text().splitlines()
    header = summary[0].split(",")
    assert len(summary) == 3 and {"cum_epochs", "train_loss", "ppl"} <= set(header)
    assert [row.split(",")[header.index("cum_epochs")] for row in summary[1:]] == ["1", "2"]

    # Weight-level check: a second stage with a vanishing learning rate ends where the first one ended.
    sweep2 = tmp_path / "sweep2"
    result = run_entrypoint("-m", *args, "optim.lr=3e-2,1e-12", f"hydra.sweep.dir={sweep2}")
    assert result.returncode == 0, result.stderr
    first, second = (load_file(sweep2 / job / "adapter" / "adapter_model.safetensors") for job in ("0", "1"))
    assert any(v.abs().max() > 1e-3 for k, v in first.items() if "lora_B" in k)  # stage 1 moved B off zero
    assert all(torch.allclose(first[k], second[k], atol=1e-8) for k in first)


@pytest.mark.slow
def test_chain_refuses_a_missing_previous_adapter(tiny_model_dir, tmp_path):
    args = tiny_overrides(tiny_model_dir, "task=train", "data.n_train=8", "train.init_from=previous")
    result = run_entrypoint(*args, f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2 and "chains the jobs of a multirun" in result.stderr


@pytest.mark.slow
def test_saved_adapter_reproduces_the_runs_perplexity(tiny_model_dir, tmp_path):
    args = tiny_overrides(tiny_model_dir, "data.n_train=16", "train.epochs=2", "optim.lr=1e-2")
    assert run_entrypoint(*args, "task=train", f"hydra.run.dir={tmp_path}/train").returncode == 0
    result = run_entrypoint(*args, "task=eval", f"adapter={tmp_path}/train/adapter", f"hydra.run.dir={tmp_path}/eval")
    assert result.returncode == 0, result.stderr
    trained, reloaded = read_json(tmp_path / "train/metrics.json"), read_json(tmp_path / "eval/metrics.json")
    assert reloaded["eval/perplexities"] == pytest.approx(trained["eval/perplexities"], rel=1e-5)


def _train_command(model_dir, run_dir, *extra: str) -> list[str]:
    # 40 steps, a checkpoint after each: the kill below lands between step 4 and the end.
    args = tiny_overrides(model_dir, "task=train", "train.epochs=4", "train.batch_size=4", "train.grad_accum=2")
    return [sys.executable, "-m", "adl_llm.run", *args, "train.save_every=1", f"hydra.run.dir={run_dir}", *extra]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_adapter(tiny_model_dir, tmp_path):
    straight = subprocess.run(_train_command(tiny_model_dir, tmp_path / "straight"), cwd=PROJECT_ROOT)
    assert straight.returncode == 0

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(_train_command(tiny_model_dir, run_dir), cwd=PROJECT_ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "step-000004").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (run_dir / "adapter").exists()
    steps_done = int(complete_checkpoints(run_dir / "checkpoints")[-1].name.removeprefix("step-"))
    assert 4 <= steps_done < 40

    resumed = subprocess.run(_train_command(tiny_model_dir, run_dir, "train.resume=auto"), cwd=PROJECT_ROOT)
    assert resumed.returncode == 0
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        read_json(run_dir / "metrics.json")["train/losses"]
        == read_json(tmp_path / "straight/metrics.json")["train/losses"]
    )


def test_partial_checkpoint_is_ignored_and_other_settings_are_refused(tiny_model_dir, tokenizer, tmp_path):
    """A kill during a save leaves a temporary folder: resume takes the last complete checkpoint instead."""
    examples = _examples(tokenizer, 8)
    settings = ("train.epochs=3", "train.grad_accum=2", "train.save_every=1", "train.keep_checkpoints=5")
    straight = _train(_model(tiny_model_dir), examples, tmp_path / "straight", *settings)

    run_dir = tmp_path / "interrupted"
    _train(_model(tiny_model_dir), examples, run_dir, *settings)
    checkpoints = run_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step-000003")  # the process died while writing step 3
    partial = checkpoints / ".step-000003.tmp-999"
    partial.mkdir()
    (partial / "adapter.safetensors").write_bytes(b"half-written")
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["step-000001", "step-000002"]

    resumed = _train(_model(tiny_model_dir), examples, run_dir, *settings)
    assert resumed.global_step == 3 and resumed.losses == straight.losses

    with pytest.raises(UserError, match="other training settings"):
        _train(_model(tiny_model_dir), examples, run_dir, *settings, "optim.lr=1.0")


@pytest.mark.parametrize(
    ("setting", "plain", "checkpointed", "expected"),
    [
        (None, 4000, 20000, (4000, False)),  # one pass a step without it: checkpointing is not even measured
        (None, 1000, 20000, (20000, True)),  # 3 passes against 1: recomputing the forward pays
        (None, 1000, 1500, (1000, False)),  # 3 passes against 2: not enough fewer to pay for the recompute
        (None, 2000, 4000, (4000, True)),  # 2 passes against 1
        (None, None, 20000, (20000, True)),  # the plain probe ran out of memory
        (False, 1000, 20000, (1000, False)),  # asked off: stays off
        (True, 4000, 20000, (20000, True)),  # asked on: stays on
    ],
)
def test_gpu_pass_budget_turns_checkpointing_on_when_it_saves_passes(
    tiny_model_dir, tokenizer, monkeypatch, setting, plain, checkpointed, expected
):
    """The measured budgets are stubbed (no GPU here); what is decided from them is the code under test."""
    from adl_llm import micro_batches

    examples = _examples(tokenizer, 16)  # one step of 16
    ckpt = "null" if setting is None else str(setting).lower()
    tc = compose_config(f"train.gradient_checkpointing={ckpt}", "train.pad_to_multiple=1").train
    passes = {budget: len(split_step(examples, tc, budget)) for budget in (1000, 1500, 2000, 4000, 20000)}
    assert passes == {1000: 3, 1500: 2, 2000: 2, 4000: 1, 20000: 1}  # what the cases above assume
    model = _model(tiny_model_dir)
    probed = []

    def measured(model, *args):
        on = gradient_checkpointing_on(model)
        probed.append(on)
        return checkpointed if on else plain

    monkeypatch.setattr(micro_batches, "_measure", measured)
    plan = micro_batches.plan_micro_batches(model, examples, tc, 0, torch.device("cuda"))
    assert not gradient_checkpointing_on(model)  # planning leaves the model as it found it
    set_gradient_checkpointing(model, plan.gradient_checkpointing)  # as train() applies the plan
    assert (plan.tokens, gradient_checkpointing_on(model)) == expected
    set_gradient_checkpointing(model, False)  # as train() leaves the model
    embedded = model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert not embedded.requires_grad  # turned off again: with the hook enabling put on the embeddings
    assert probed == {None: [False] if plain == 4000 else [False, True], False: [False], True: [True]}[setting]


@pytest.mark.parametrize(
    ("setting", "kept", "recomputed", "checkpointed", "expected", "probes"),
    [
        # kept weights need 3 passes, recomputed ones 1: no checkpointing, the weights dequantised again
        (None, 1000, 4000, 20000, (4000, False, True), ["plain", "lean"]),
        # recomputed: 2 passes, still more than 1.5x the checkpointed one's: checkpointing (weights kept)
        (None, 1000, 2000, 20000, (20000, True, False), ["plain", "lean", "checkpointed"]),
        # recomputed saves nothing: the weights stay kept
        (None, 1000, 1000, 1500, (1000, False, False), ["plain", "lean", "checkpointed"]),
        # one pass kept already: nothing else measured
        (None, 4000, 20000, 20000, (4000, False, False), ["plain"]),
        # checkpointing asked off: recomputing still chosen where it saves passes
        (False, 1000, 2000, 20000, (2000, False, True), ["plain", "lean"]),
        # asked on: checkpointing, the weights kept (its recompute runs just before each layer's backward)
        (True, 1000, 4000, 20000, (20000, True, False), ["checkpointed"]),
    ],
)
def test_gpu_pass_budget_recomputes_nf4_weights_where_that_saves_passes(
    tiny_model_dir, tokenizer, monkeypatch, setting, kept, recomputed, checkpointed, expected, probes
):
    """Stubbed budgets, as above, for a model whose NF4 weights dequantise in the compiled graph (nf4_graph)."""
    from adl_llm import micro_batches, nf4_graph

    examples = _examples(tokenizer, 16)
    ckpt = "null" if setting is None else str(setting).lower()
    tc = compose_config(f"train.gradient_checkpointing={ckpt}", "train.pad_to_multiple=1").train
    probed = []

    def measured(model, *args):
        if gradient_checkpointing_on(model):
            probed.append("checkpointed")
            return checkpointed
        probed.append("lean" if nf4_graph.recomputes_weights() else "plain")
        return recomputed if nf4_graph.recomputes_weights() else kept

    monkeypatch.setattr(micro_batches, "_measure", measured)
    monkeypatch.setattr(nf4_graph, "in_graph", lambda model: True)
    plan = micro_batches.plan_micro_batches(_model(tiny_model_dir), examples, tc, 0, torch.device("cuda"))
    assert (plan.tokens, plan.gradient_checkpointing, plan.recompute_nf4) == expected
    assert probed == probes
    assert not nf4_graph.recomputes_weights()  # planning leaves it as it found it; train() applies the plan


def test_training_applies_the_plans_nf4_recompute_and_leaves_it_off(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    import dataclasses

    from adl_llm import nf4_graph
    from adl_llm import train as train_module

    real_plan, real_accumulate = train_module.plan_micro_batches, train_module.accumulate_gradients
    seen = []

    def plan(*args, **kwargs):
        return dataclasses.replace(real_plan(*args, **kwargs), recompute_nf4=True)

    def accumulate(*args, **kwargs):
        seen.append(nf4_graph.recomputes_weights())
        return real_accumulate(*args, **kwargs)

    monkeypatch.setattr(train_module, "plan_micro_batches", plan)
    monkeypatch.setattr(train_module, "accumulate_gradients", accumulate)
    _train(_model(tiny_model_dir), _examples(tokenizer, 4), tmp_path, "train.batch_size=2")
    assert seen == [True, True]  # every step as planned
    assert not nf4_graph.recomputes_weights()  # evaluation and later runs keep their weights again


def test_a_recomputing_probe_that_fails_to_compile_keeps_the_weights(tiny_model_dir, tokenizer, monkeypatch, caplog):
    from adl_llm import micro_batches, nf4_graph

    def measured(model, *args):
        if nf4_graph.recomputes_weights():
            raise torch._dynamo.exc.TorchDynamoException("inductor said no")
        return 20000 if gradient_checkpointing_on(model) else 1000

    monkeypatch.setattr(micro_batches, "_measure", measured)
    monkeypatch.setattr(nf4_graph, "in_graph", lambda model: True)
    tc = compose_config("train.pad_to_multiple=1").train
    plan = micro_batches.plan_micro_batches(
        _model(tiny_model_dir), _examples(tokenizer, 16), tc, 0, torch.device("cuda")
    )
    assert (plan.tokens, plan.gradient_checkpointing, plan.recompute_nf4) == (20000, True, False)
    assert "recomputing NF4 weights in the backward pass failed to compile" in caplog.text
    assert not nf4_graph.recomputes_weights()
