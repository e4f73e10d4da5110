"""The fast decoding path on a CPU: its choices, one batch shape, the same text as the plain path, the fallback."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adl_llm import decode_path, nf4_graph
from adl_llm.config import DType, GenConfig, ModelConfig, Quant
from adl_llm.decoding import encode_prompts, generate_from_ids
from adl_llm.modeling import load_model
from adl_llm.nf4 import is_dequantized, nf4_layers
from tests.conftest import compose_config, read_json, tiny_gemma3, tiny_overrides

PROMPTS = [
    "USER: 子曰 ASSISTANT:",
    "USER: 短 ASSISTANT:",
    "USER: 這是一個很長很長的問題，請翻譯成文言文 ASSISTANT:",
] * 2


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer, encode_prompts(tokenizer, PROMPTS)


def _gen(**settings) -> GenConfig:
    return GenConfig(**{"beams": 1, "do_sample": False, "max_new_tokens": 8, "stop_strings": ["USER:"], **settings})


def test_batches_of_one_size_cover_every_prompt_once():
    order = list(range(10))
    batches = decode_path.fixed_batches(order, 4)
    assert [len(rows) for rows, _ in batches] == [4, 4, 4]  # 3 batches of 4, not 4 + 4 + 2
    assert [real for _, real in batches] == [4, 4, 2]
    assert [i for rows, real in batches for i in rows[:real]] == order
    assert batches[-1][0][2:] == [9, 9]  # filled up with the last prompt, whose repeats are dropped
    assert decode_path.fixed_batches([3], 8) == [([3], 1)]
    assert decode_path.bucket(1) == decode_path.bucket(64) == 64 and decode_path.bucket(65) == 128


def test_each_piece_is_on_only_where_it_applies(tiny, caplog):
    model, _, _ = tiny
    with decode_path.fast_path(model, _gen()) as path:
        assert path == decode_path.PLAIN
    with decode_path.fast_path(model, _gen(compile=True)) as path:
        assert path.static_cache and path.compile  # compiling needs the static cache: asked for it, it comes with
    with decode_path.fast_path(model, _gen(static_cache=True)) as path:
        assert path.static_cache and not path.compile
    with caplog.at_level(logging.INFO), decode_path.fast_path(model, _gen(compile=True, static_cache=False)) as path:
        assert not path.compile
    assert "gen.static_cache=false" in caplog.text
    with caplog.at_level(logging.INFO), decode_path.fast_path(model, _gen(dequantize=True)) as path:
        assert not path.dequantize  # a plain model has nothing to dequantise
    assert "no NF4 layers" in caplog.text


@pytest.mark.parametrize("beams", [1, 3])
def test_a_static_cache_decodes_the_text_of_the_plain_path(tiny, beams):
    model, tokenizer, encoded = tiny
    gen = _gen(beams=beams, batch_size=4)  # 6 prompts: two batches of 3 on the fast path, 4 + 2 on the plain one
    plain = generate_from_ids(model, tokenizer, encoded, gen, progress=False)
    stats: dict = {}
    fast = generate_from_ids(
        model, tokenizer, encoded, dataclasses.replace(gen, static_cache=True), progress=False, fast=True, stats=stats
    )
    assert fast == plain and all(plain)
    assert set(stats) == {"path", "warmup_seconds"} and stats["path"] == "static_cache"


@pytest.mark.parametrize("settings", [{}, {"static_cache": True}])
def test_no_prompts_decode_to_no_answers(tiny, settings, caplog):
    """Under torchrun a rank's share of a few prompts may be empty: no answers, and no fallback either."""
    model, tokenizer, _ = tiny
    with caplog.at_level(logging.WARNING):
        assert generate_from_ids(model, tokenizer, [], _gen(**settings), progress=False, fast=True) == []
    assert not caplog.text


def test_a_failing_fast_path_falls_back_to_the_plain_one(tiny, monkeypatch, caplog):
    model, tokenizer, encoded = tiny
    gen = _gen(batch_size=4)
    plain = generate_from_ids(model, tokenizer, encoded, gen, progress=False)

    def no_static_cache(*args, **kwargs):
        raise RuntimeError("this architecture has no static cache\nsecond line")

    monkeypatch.setattr(decode_path, "generation_settings", no_static_cache)
    stats: dict = {}
    with caplog.at_level(logging.WARNING):
        fast = generate_from_ids(
            model, tokenizer, encoded, dataclasses.replace(gen, compile=True), progress=False, fast=True, stats=stats
        )
    assert fast == plain and stats["path"] == "plain"
    assert "compiled step failed (RuntimeError: this architecture has no static cache)" in caplog.text
    assert "second line" not in caplog.text


def test_an_out_of_memory_is_not_hidden_by_the_fallback(tiny, monkeypatch):
    model, tokenizer, encoded = tiny

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(decode_path, "generation_settings", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        generate_from_ids(model, tokenizer, encoded, _gen(static_cache=True), progress=False, fast=True)


def test_nf4_weights_dequantised_for_decoding_are_put_back(tiny_model_dir, tiny):
    _, tokenizer, encoded = tiny
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir), quant=Quant.nf4, dtype=DType.float32))
    gen = _gen(batch_size=3)
    plain = generate_from_ids(model, tokenizer, encoded, gen, progress=False)
    stats: dict = {}
    with decode_path.fast_path(model, gen) as path:
        assert not path.dequantize  # on a CPU only when asked
    fast = generate_from_ids(
        model, tokenizer, encoded, dataclasses.replace(gen, dequantize=True), progress=False, fast=True, stats=stats
    )
    assert stats["path"] == "dequantize" and fast == plain
    assert not any(is_dequantized(layer) for layer in nf4_layers(model))  # bitsandbytes' own layers again


def test_only_the_decode_step_is_compiled(tiny, monkeypatch):
    """The prompt pass stays eager: there the static cache allocates its buffers, which must not happen inside a
    CUDA-graphed region (pytorch/pytorch#192748)."""
    model, tokenizer, encoded = tiny
    widths, compile_settings = [], []
    real_compile = torch.compile

    def fake_compile(forward, **settings):
        if getattr(forward, "__self__", None) is not model:  # a library's own (bitsandbytes compiles on import)
            return real_compile(forward, **settings)
        compile_settings.append(settings)

        def traced(*args, **kwargs):
            widths.append(kwargs["input_ids"].shape[-1])
            return forward(*args, **kwargs)

        return traced

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(model, "_adl_llm_compiled_forward", None, raising=False)  # put back after the test
    gen = _gen(beams=3, batch_size=4)
    plain = generate_from_ids(model, tokenizer, encoded, gen, progress=False)
    fast = generate_from_ids(
        model, tokenizer, encoded, dataclasses.replace(gen, compile=True), progress=False, fast=True
    )
    assert fast == plain
    assert compile_settings == [{"mode": "default", "dynamic": None}]  # once per model; CUDA graphs only on a GPU
    assert widths and set(widths) == {1}
    assert "forward" not in vars(model)  # the model's own forward again


def _compiles(model, tokenizer, encoded, gen, monkeypatch) -> tuple[list[str], dict, int, list[bool]]:
    """Decode on the compiled path with a backend that counts the graphs compiled (run as traced, no inductor);
    the answers, stats, count, and whether each compiled call was given position_ids."""
    graphs, given_positions = [], []
    real_compile = torch.compile

    def counted(forward, mode=None, dynamic=None):
        def backend(graph, example_inputs):
            graphs.append(graph)
            return graph.forward

        compiled_forward = real_compile(forward, backend=backend, dynamic=dynamic)

        def call(*args, **kwargs):
            given_positions.append(kwargs.get("position_ids") is not None)
            return compiled_forward(*args, **kwargs)

        return call

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", counted)
    monkeypatch.setattr(model, "_adl_llm_compiled_forward", None, raising=False)
    stats: dict = {}
    with torch._dynamo.config.patch(recompile_limit=100):  # a step recompiled at every token shows in the count
        texts = generate_from_ids(
            model, tokenizer, encoded, dataclasses.replace(gen, compile=True), progress=False, fast=True, stats=stats
        )
    monkeypatch.undo()
    return texts, stats, len(graphs), given_positions


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
@pytest.mark.parametrize("beams", [1, 3])
def test_a_compiled_job_compiles_its_step_once_whatever_it_decodes(tiny, architecture, beams, monkeypatch):
    """What a CUDA graph needs: the same graphs for every step and batch of a job, so decoding twice as many tokens
    compiles nothing more (on an H200 Gemma 3's step was recompiled at every token, beam search's reorder gave the
    cache new tensors, and generate passed no positions to the compiled step), and the plain path's text."""
    model, tokenizer, encoded = tiny
    if architecture == "gemma3":
        model = tiny_gemma3(tokenizer, sliding_window=512)
    counts = []
    for new_tokens in (4, 8):
        gen = _gen(beams=beams, batch_size=4, max_new_tokens=new_tokens, stop_strings=[])
        plain = generate_from_ids(model, tokenizer, encoded, gen, progress=False)
        texts, stats, count, given_positions = _compiles(model, tokenizer, encoded, gen, monkeypatch)
        assert texts == plain and stats["path"] == "static_cache+compile"
        assert given_positions and all(given_positions)
        counts.append(count)
    assert counts[0] == counts[1] > 0


@pytest.mark.parametrize("beams", [1, 3])
def test_a_compiled_step_dequantises_nf4_weights_in_its_graph(tiny_model_dir, tiny, beams, monkeypatch):
    """Where the base stays NF4, the compiled step holds its weights' dequantising (nf4_graph.py): the plain path's
    text, bitsandbytes' own layers again after the job, and with gen.nf4_graph=false bitsandbytes' operator."""
    _, tokenizer, encoded = tiny
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir), quant=Quant.nf4, dtype=DType.float32))
    traced = []
    real_weight = nf4_graph.nf4_weight
    monkeypatch.setattr(nf4_graph, "nf4_weight", lambda *args: traced.append(1) or real_weight(*args))
    gen = _gen(beams=beams, batch_size=4, max_new_tokens=6, stop_strings=[])
    plain = generate_from_ids(model, tokenizer, encoded, gen, progress=False)
    assert not traced
    texts, stats, _, _ = _compiles(model, tokenizer, encoded, gen, monkeypatch)
    assert texts == plain and stats["path"] == "static_cache+compile+nf4_graph" and traced
    assert all(type(layer).__name__ == "Linear4bit" for layer in nf4_layers(model))
    monkeypatch.setattr(nf4_graph, "nf4_weight", lambda *args: traced.append(1) or real_weight(*args))
    traced.clear()
    texts, stats, _, _ = _compiles(model, tokenizer, encoded, dataclasses.replace(gen, nf4_graph=False), monkeypatch)
    assert texts == plain and stats["path"] == "static_cache+compile" and not traced


def _count_graphs_across_jobs(monkeypatch) -> list:
    """From here on torch.compile traces with one counting backend for every job of the test (as inductor's compare
    equal, so a later job may reuse a graph): the list of graphs compiled, which grows as they are."""
    graphs = []
    real_compile = torch.compile

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    def counted(forward, mode=None, dynamic=None):
        return real_compile(forward, backend=backend, dynamic=dynamic)

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", counted)
    return graphs


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_a_sweep_over_beams_compiles_its_step_once(tiny_model_dir, tiny, architecture, monkeypatch):
    """The rows of a batch (prompts x beams) are dynamic in the compiled step, so the jobs of a beam sweep, each with
    its own model as a multirun loads it, reuse the first job's graph (on an H200 each job compiled for about 30 s)."""
    _, tokenizer, encoded = tiny
    graphs = _count_graphs_across_jobs(monkeypatch)
    counts = []
    with torch._dynamo.config.patch(recompile_limit=100):
        for beams in (1, 3, 5):
            if architecture == "gemma3":
                model = tiny_gemma3(tokenizer, sliding_window=512)
            else:
                model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
            gen = _gen(beams=beams, batch_size=4, max_new_tokens=6, stop_strings=[])
            plain = generate_from_ids(model, tokenizer, encoded, gen, progress=False)
            before = len(graphs)
            fast = generate_from_ids(
                model, tokenizer, encoded, dataclasses.replace(gen, compile=True), progress=False, fast=True
            )
            assert fast == plain
            counts.append(len(graphs) - before)
    assert counts == [1, 0, 0]


def test_jobs_with_a_dequantised_base_reuse_the_compiled_step(tiny_model_dir, tiny, monkeypatch):
    """Each job dequantises the NF4 weights anew; the compiled step must not guard on the copy's objects (on an H200
    every job, and every call of bench.profile_decode, compiled again for 10 s when each layer had its own forward)."""
    _, tokenizer, encoded = tiny
    graphs = _count_graphs_across_jobs(monkeypatch)
    gen = _gen(batch_size=3, max_new_tokens=5, stop_strings=[], dequantize=True, compile=True)
    counts = []
    with torch._dynamo.config.patch(recompile_limit=100):
        for _ in range(2):  # two jobs of a sweep, each loading the model as a multirun does
            model = load_model(ModelConfig(name_or_path=str(tiny_model_dir), quant=Quant.nf4, dtype=DType.float32))
            before, stats = len(graphs), {}
            generate_from_ids(model, tokenizer, encoded, gen, progress=False, fast=True, stats=stats)
            generate_from_ids(model, tokenizer, encoded, gen, progress=False, fast=True, stats=stats)
            assert stats["path"] == "dequantize+static_cache+compile"
            counts.append(len(graphs) - before)
    assert counts == [1, 0]


def test_the_job_cache_reorders_beams_in_place(tiny):
    """A CUDA graph captured the cache's tensors: beam search's reorder must move rows within them, not replace them
    (transformers' StaticLayer replaces them, and the graph was skipped on an H200: "mutated inputs")."""
    model, _, _ = tiny
    cache = decode_path.job_cache(model, max_cache_len=8)
    assert all(isinstance(layer, decode_path.FixedAddressLayer) for layer in cache.layers)
    layer = cache.layers[0]
    keys, values = torch.randn(3, 2, 1, 16), torch.randn(3, 2, 1, 16)
    layer.update(keys, values)
    addresses = (layer.keys.data_ptr(), layer.values.data_ptr())
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert (layer.keys.data_ptr(), layer.values.data_ptr()) == addresses
    torch.testing.assert_close(layer.keys[:, :, 0], keys[[2, 0, 0], :, 0])
    torch.testing.assert_close(layer.values[:, :, 0], values[[2, 0, 0], :, 0])


def test_a_sliding_window_shorter_than_the_job_is_decoded_uncompiled(tiny, monkeypatch, caplog):
    """Where the window would slide within a job, the sliding layer's count would recompile the step at every token:
    transformers' own static cache then, not compiled, and the log says so."""
    _, tokenizer, encoded = tiny
    model = tiny_gemma3(tokenizer, sliding_window=16)
    gen = _gen(batch_size=4, max_new_tokens=8, stop_strings=[])
    plain = generate_from_ids(model, tokenizer, encoded, gen, progress=False)
    with caplog.at_level(logging.INFO):
        texts, stats, count, _ = _compiles(model, tokenizer, encoded, gen, monkeypatch)
    assert texts == plain and stats["path"] == "static_cache" and count == 0
    assert "gen.compile: off" in caplog.text


@pytest.mark.slow
def test_a_compiled_step_decodes_the_text_of_the_plain_path(tiny):
    """torch.compile on a CPU (mode default: CUDA graphs are the GPU's); about half a minute the first time."""
    model, tokenizer, encoded = tiny
    gen = _gen(beams=3, batch_size=4)
    plain = generate_from_ids(model, tokenizer, encoded, gen, progress=False)
    stats: dict = {}
    fast = generate_from_ids(
        model, tokenizer, encoded, dataclasses.replace(gen, compile=True), progress=False, fast=True, stats=stats
    )
    assert fast == plain and stats["path"] == "static_cache+compile" and stats["warmup_seconds"] > 0


def test_the_generate_task_records_its_path_and_warm_up(tiny_model_dir, tmp_path):
    from adl_llm.tasks import run_generate

    overrides = tiny_overrides(
        tiny_model_dir, "task=generate", "gen=greedy", "gen.max_new_tokens=6", "gen.static_cache=true"
    )
    metrics = run_generate(compose_config(*overrides, output_dir=tmp_path))
    assert metrics["gen/path"] == "static_cache" and metrics["gen/warmup_seconds"] >= 0  # the stop-string tables
    assert metrics["gen/wall_seconds"] == pytest.approx(metrics["gen/seconds"] + metrics["gen/warmup_seconds"])
    assert metrics["gen/seconds"] > 0
    assert read_json(tmp_path / "metrics.json")["gen/path"] == "static_cache"
