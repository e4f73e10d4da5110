"""train.compile: each decoder layer compiled, the same losses as the eager path, a failure in one line."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from adl_llm import nf4_graph
from adl_llm.compiled_layers import compiled_layers, decoder_layers
from adl_llm.modeling import set_gradient_checkpointing
from adl_llm.tasks import run_train
from tests.conftest import TWO_STEPS, compose_config, tiny_overrides


def test_the_decoder_layers_are_the_longest_list_of_one_class(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    layers = decoder_layers(model)
    assert layers == list(model.model.layers) and len(layers) == model.config.num_hidden_layers
    assert decoder_layers(torch.nn.Linear(2, 2)) == []


def test_training_compiles_on_a_gpu_unless_told_otherwise():
    from adl_llm.compiled_layers import training_compiles

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert compose_config().train.compile is None  # the default: decided by the device
    assert training_compiles(None, gpu) and not training_compiles(None, cpu)
    assert training_compiles(True, cpu) and not training_compiles(False, gpu)


def test_layers_are_compiled_within_and_eager_after(tiny_model_dir, caplog):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with caplog.at_level(logging.INFO), compiled_layers(model, True) as compiled:
        assert compiled.count == 2 and all(layer._compiled_call_impl is not None for layer in model.model.layers)
        # room for the variants of many jobs in one process (a sweep, the bench), not torch's 8 for all of them
        assert torch._dynamo.config.recompile_limit >= 64
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)
    assert "2 decoder layers of LlamaDecoderLayer compiled" in caplog.text
    assert torch._dynamo.config.recompile_limit == 8  # torch's own again (its default)
    with compiled_layers(model, False) as compiled:
        assert compiled.count == 0 and all(layer._compiled_call_impl is None for layer in model.model.layers)
    with caplog.at_level(logging.WARNING), compiled_layers(torch.nn.Linear(2, 2), True) as compiled:
        assert compiled.count == 0
    assert "no repeated decoder layers" in caplog.text


def test_checkpointed_calls_of_a_cuda_graph_mode_run_a_compile_without_graphs(tiny_model_dir, monkeypatch):
    """A CUDA graph's outputs are overwritten by its next replay, before the backward pass recomputes a checkpointed
    layer from them: those calls take the layer compiled in mode default, the others the graphed one."""
    modes = []

    def recording_compile(fn, mode=None, **kwargs):
        return lambda *args, **kw: modes.append(mode) or fn(*args, **kw)

    monkeypatch.setattr(torch, "compile", recording_compile)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with compiled_layers(model, True, "reduce-overhead"):
        model(input_ids=ids, labels=ids).loss.backward()
        assert modes == ["reduce-overhead"] * model.config.num_hidden_layers
        modes.clear()
        set_gradient_checkpointing(model, True)
        model(input_ids=ids, labels=ids).loss.backward()
        assert modes and set(modes) == {None}  # the forward and its recompute
    modes.clear()
    with compiled_layers(model, True, "max-autotune"):  # its autotuning kept for the checkpointed calls
        set_gradient_checkpointing(model, True)
        model(input_ids=ids, labels=ids).loss.backward()
        assert modes and set(modes) == {"max-autotune-no-cudagraphs"}
    modes.clear()
    with compiled_layers(model, True, "max-autotune-no-cudagraphs"):
        set_gradient_checkpointing(model, True)
        model(input_ids=ids, labels=ids).loss.backward()
        assert modes and set(modes) == {"max-autotune-no-cudagraphs"}  # no graphs: one compile serves both


def test_a_compile_mode_without_compiled_layers_is_said_to_do_nothing(tiny_model_dir, tmp_path, caplog):
    overrides = ("task=train", "data.n_train=4", "train.batch_size=4", "train.max_steps=1", "train.save_every=0")
    cfg = compose_config(
        *tiny_overrides(tiny_model_dir, *overrides, "train.compile_mode=reduce-overhead"), output_dir=tmp_path
    )
    with caplog.at_level(logging.WARNING):
        run_train(cfg)  # a CPU: train.compile null leaves the layers eager
    assert (
        "train.compile_mode=reduce-overhead has no effect" in caplog.text
        and "train.compile=null, on cpu" in caplog.text
    )


def _compile_failure() -> torch._dynamo.exc.TorchDynamoException:
    """What inductor raises: its first line says nothing; the backend's own error is the inner exception."""
    failed = torch._dynamo.exc.TorchDynamoException("backend='inductor' raised:\nAssertionError: ...")
    failed.inner_exception = AssertionError("Node add_380 was invalid, but is output")
    return failed


def test_work_that_fails_to_compile_is_done_again_on_the_eager_layers(tiny_model_dir, caplog):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    weight = model.model.layers[0].mlp.up_proj.weight
    calls = []

    def work() -> str:  # a step that fails part-way through, its gradients half accumulated
        eager = all(layer._compiled_call_impl is None for layer in model.model.layers)
        calls.append((eager, weight.grad))
        weight.grad = torch.ones_like(weight)
        if len(calls) == 1:
            raise _compile_failure()
        return "done"

    def on_fallback() -> None:  # e.g. a new memory plan, for the eager layers
        calls.append("on_fallback")

    with caplog.at_level(logging.WARNING), compiled_layers(model, True) as compiled:
        assert compiled.run(work, on_fallback) == "done" and compiled.count == 0
    assert calls == [(False, None), "on_fallback", (True, None)]  # compiled, then eager from zeroed gradients
    assert caplog.records[-1].getMessage() == (
        "train.compile: torch.compile failed on this model (AssertionError: Node add_380 was invalid, but is output); "
        "training on the eager layers"
    )

    def failing() -> None:
        raise _compile_failure()

    with pytest.raises(torch._dynamo.exc.TorchDynamoException), compiled_layers(model, False) as compiled:
        compiled.run(failing)  # without compiled layers the error is not a compile's to forgive


def test_a_recomputing_variant_that_fails_to_compile_keeps_the_weights_and_stays_compiled(tiny_model_dir, caplog):
    """A step whose NF4 weights are recomputed (nf4_graph.recompute_weights) fails to compile: the layers stay
    compiled, the weights are kept from then on (the plan made again), and a second failure goes eager."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    calls = []

    def work() -> str:
        eager = all(layer._compiled_call_impl is None for layer in model.model.layers)
        calls.append((eager, nf4_graph.recomputes_weights()))
        if sum(call[0] != "plan" for call in calls) < 3:  # the first two attempts fail
            raise _compile_failure()
        return "done"

    def on_fallback() -> None:  # train()'s: plans again, which no longer offers the refused variant
        calls.append(("plan", nf4_graph.recompute_refused()))

    with caplog.at_level(logging.WARNING), compiled_layers(model, True) as compiled:
        nf4_graph.recompute_weights(True)  # as train() applies a plan that chose it
        assert compiled.run(work, on_fallback) == "done"
        assert compiled.count == 0
    # refused for the compiled layers; the eager ones hold no NF4 graph, which restore() reset
    assert calls == [(False, True), ("plan", True), (False, False), ("plan", False), (True, False)]
    messages = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert messages[0].endswith("keeping NF4 weights for the backward pass")
    assert messages[1].endswith("training on the eager layers")
    assert not nf4_graph.recomputes_weights() and not nf4_graph.recompute_refused()  # the run's end restores both


def test_reaching_the_recompile_limit_is_said_and_no_longer_counted_as_compiled(tiny_model_dir, caplog):
    """torch.compile runs a function's new variants eagerly once it has compiled recompile_limit of them in the
    process (a long multirun can get there), saying so only in its own warning."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with caplog.at_level(logging.WARNING), compiled_layers(model, True) as compiled:
        assert compiled.run(lambda: "step") == "step" and compiled.count == 2
        logging.getLogger("torch._dynamo.convert_frame").warning("torch._dynamo hit config.recompile_limit (8)")
        assert compiled.run(lambda: "step") == "step" and compiled.count == 0
        compiled.run(lambda: "step")
    assert caplog.text.count("train.compile: torch.compile reached its recompile limit") == 1
    assert compiled.limit not in logging.getLogger("torch._dynamo.convert_frame").handlers


def test_a_training_run_whose_model_does_not_compile_trains_eagerly(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """torch.compile failing on the first pass (the memory probe on a GPU, the first step on a CPU): the run warns
    and gives the eager run's losses."""

    def failing_compile(fn, *args, **kwargs):
        def compiled(*call_args, **call_kwargs):
            raise _compile_failure()

        return compiled

    metrics = {}
    for name in ("eager", "failing"):
        overrides = ("task=train", "data.n_train=8", "train.batch_size=4", "train.max_steps=2", "train.save_every=0")
        compile_layers = "false" if name == "eager" else "true"
        cfg = compose_config(
            *tiny_overrides(tiny_model_dir, *overrides, f"train.compile={compile_layers}"), output_dir=tmp_path / name
        )
        if name == "failing":
            monkeypatch.setattr(torch, "compile", failing_compile)
        with caplog.at_level(logging.WARNING):
            metrics[name] = run_train(cfg)
    assert "training on the eager layers" in caplog.text
    assert metrics["failing"]["train/losses"] == metrics["eager"]["train/losses"]
    assert metrics["failing"]["train/compiled_steps"] == metrics["eager"]["train/compiled_steps"] == 0


@pytest.mark.slow
def test_compiled_training_gives_the_losses_of_the_eager_path(tiny_model_dir, tmp_path):
    """Without dropout (inductor draws its random numbers its own way); about a minute of compiling on 2 cores."""
    losses, compiled_steps = {}, {}
    for compile_layers in ("false", "true"):
        overrides = (*TWO_STEPS, f"train.compile={compile_layers}")
        cfg = compose_config(*tiny_overrides(tiny_model_dir, *overrides), output_dir=tmp_path / compile_layers)
        metrics = run_train(cfg)
        losses[compile_layers] = metrics["train/losses"]
        compiled_steps[compile_layers] = metrics["train/compiled_steps"]
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-4)
    assert compiled_steps == {"false": 0, "true": 2}


def test_compiled_work_loads_without_liger_unless_asked():
    from adl_llm.tasks import model_settings

    assert model_settings(compose_config(), compiled=True).liger is False  # Liger would break the graph
    assert model_settings(compose_config(), compiled=False).liger is None
    assert model_settings(compose_config("model.liger=true"), compiled=True).liger is True  # asked for: kept


def _lora_gradients(model_dir, dropout: float, checkpointing: bool, compiled: bool) -> dict[str, torch.Tensor]:
    """The LoRA gradients of one training pass of the tiny model, from the same seed."""
    from adl_llm.config import LoraConfig
    from adl_llm.modeling import add_lora

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"], bias="none")
    model = add_lora(AutoModelForCausalLM.from_pretrained(model_dir), lora)
    with torch.no_grad():  # a fresh adapter's B is zero, which would hide A's gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    calls = []
    torch.manual_seed(2)  # the dropout masks
    with compiled_layers(model, compiled):
        set_gradient_checkpointing(model, checkpointing)  # after compiling, as the memory planner does
        for layer in decoder_layers(model) if checkpointing else []:
            checkpoint = layer._gradient_checkpointing_func
            layer._gradient_checkpointing_func = lambda *args, _ckpt=checkpoint: calls.append(1) or _ckpt(*args)
        model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == (model.config.num_hidden_layers if checkpointing else 0)
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


@pytest.mark.slow
def test_a_checkpointed_layer_is_compiled_inside_its_checkpoint(tiny_model_dir):
    """The recompute in the backward pass runs the compiled layer again, with the same dropout masks (the RNG state
    replayed): compiled with checkpointing gives the gradients of compiled without, and of eager without dropout."""
    eager = _lora_gradients(tiny_model_dir, 0.0, checkpointing=True, compiled=False)
    compiled = _lora_gradients(tiny_model_dir, 0.0, checkpointing=True, compiled=True)
    assert eager.keys() == compiled.keys() and len(eager) == 8
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], atol=1e-5, rtol=1e-4, msg=name)

    with_dropout = _lora_gradients(tiny_model_dir, 0.5, checkpointing=True, compiled=True)
    without_checkpoint = _lora_gradients(tiny_model_dir, 0.5, checkpointing=False, compiled=True)
    for name in with_dropout:
        torch.testing.assert_close(with_dropout[name], without_checkpoint[name], atol=1e-5, rtol=1e-4, msg=name)
    assert any(not torch.allclose(with_dropout[name], compiled[name]) for name in compiled)  # dropout did act
