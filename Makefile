# adl-llm: every target runs in .venv, which the first target creates. Extra Hydra overrides go in ARGS:
#   make demo ARGS="data.n_eval=20"
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0  # a CPU build on this kind of machine; any torch already in the venv is kept
ARGS ?=
NPROC ?= 1  # processes (GPUs) for make train: data-parallel through torchrun when > 1
RUN := $(PY) -m adl_llm.run

.PHONY: help venv demo test test-fast lint format eval train chain curve beams compare export chat reproduce bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(strip $(TORCH))"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

venv: $(VENV)/.installed  ## create .venv with adl-llm and its test tools (CPU torch if none is there)

demo: venv  ## a short CPU QLoRA run of the embedded model, then zero-shot / 3-shot / fine-tuned perplexity
	$(RUN) experiment=demo_train $(ARGS)
	$(RUN) -m experiment=demo $(ARGS)

# Test processes at once (pytest-xdist): most of the suite's time is single-threaded Python start-up of the runs it
# launches, so 2 workers on 2 cores take 0.7x the time of one; the tests that need the embedded model share a worker.
WORKERS ?= 2
PYTEST = $(PY) -m pytest -n $(WORKERS) --dist loadgroup

test: venv  ## the whole test suite, as CI runs it (slow tests included); WORKERS=0 runs it in one process
	$(PYTEST) $(ARGS)

test-fast: venv  ## the tests without the slow (subprocess and embedded-model) ones
	$(PYTEST) -m "not slow" $(ARGS)

lint: venv  ## ruff lint and format check
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: venv  ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

eval: venv  ## course perplexity with the default model and prompt (task=eval)
	$(RUN) task=eval $(ARGS)

train: venv  ## QLoRA training with the report's settings, then the course perplexity; NPROC=2 for 2 GPUs
	$(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m adl_llm.run,$(RUN)) \
		task=train $(ARGS)

chain: venv  ## the report's 1+1+3 stage chain as one multirun; a stage table at the sweep root
	$(RUN) -m experiment=chain $(ARGS)

curve: venv  ## the 1+1+1+1+1 learning curve; learning_curve.png and .csv at the sweep root
	$(RUN) -m experiment=curve $(ARGS)

# The newest adapter under outputs/ (a chain's last stage, a train run), unless ADAPTER=... is given.
ADAPTER ?= $(shell ls -td outputs/reproduce/*/chain/*/adapter outputs/multirun/*/*/adapter outputs/runs/*/adapter \
	2>/dev/null | head -1)
NEED_ADAPTER = @test -n "$(ADAPTER)" || { echo "make $@: no adapter under outputs/: run make chain or pass ADAPTER=..."; exit 2; }

beams: venv  ## beam sweep 1/3/5 of ADAPTER: chrF, BLEU, peak memory, speed; table and generation.png
	$(NEED_ADAPTER)
	$(RUN) -m task=generate gen.beams=1,3,5 adapter=$(ADAPTER) $(ARGS)

compare: venv  ## zero-shot, 3-shot and QLoRA (ADAPTER) course perplexity, as one table
	$(NEED_ADAPTER)
	$(RUN) -m task=eval prompt=zero_shot,few_shot adapter=null,$(ADAPTER) $(ARGS)

export: venv  ## merge ADAPTER into its base: a standalone model folder with a model card (model/ in the run folder)
	$(NEED_ADAPTER)
	$(RUN) task=export adapter=$(ADAPTER) $(ARGS)

chat: venv  ## talk to ADAPTER on its base with the study's prompt and decoding; ADAPTER=null: no adapter
	$(NEED_ADAPTER)
	$(PY) -m adl_llm.chat adapter=$(ADAPTER) $(ARGS)

reproduce: venv  ## the whole study (chain, curve, compare, beams) and one report.md under outputs/reproduce/
	$(PY) -m adl_llm.reproduce $(ARGS)

bench: venv  ## on a GPU: adl-llm against TRL (+ Liger) and seed-style loops, embedded model and a 7B shape (docs/BENCHMARKS.md)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -u -m bench.run --model embedded --precision-check --out outputs/bench $(ARGS)
	test -d outputs/llama7b || $(PY) -m bench.build_llama7b outputs/llama7b
	$(PY) -u -m bench.run --model llama7b --model-path outputs/llama7b --out outputs/bench $(ARGS)
	$(PY) -m bench.report outputs/bench

clean:  ## remove outputs/ and caches (keeps .venv and the model cache)
	rm -rf outputs/* .pytest_cache .ruff_cache
