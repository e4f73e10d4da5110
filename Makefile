# adl-llm: every target runs in .venv, which the first target creates. Extra Hydra overrides go in ARGS:
#   make demo ARGS="data.n_eval=20"
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0  # a CPU build on this kind of machine; any torch already in the venv is kept
ARGS ?=
RUN := $(PY) -m adl_llm.run

.PHONY: help venv demo test test-fast lint format eval clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(strip $(TORCH))"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

venv: $(VENV)/.installed  ## create .venv with adl-llm and its test tools (CPU torch if none is there)

demo: venv  ## zero-shot and 3-shot perplexity of the embedded Gemma-3-270M on a slice of the public test set
	$(RUN) -m experiment=demo $(ARGS)

test: venv  ## the whole test suite, as CI runs it (slow tests included)
	$(PY) -m pytest $(ARGS)

test-fast: venv  ## the tests without the slow (subprocess and embedded-model) ones
	$(PY) -m pytest -m "not slow" $(ARGS)

lint: venv  ## ruff lint and format check
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: venv  ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

eval: venv  ## course perplexity with the default model and prompt (task=eval)
	$(RUN) task=eval $(ARGS)

clean:  ## remove outputs/ and caches (keeps .venv and the model cache)
	rm -rf outputs/* .pytest_cache .ruff_cache
