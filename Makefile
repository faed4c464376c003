# The two commands of the README. Each creates .venv if missing, installs
# COOM into it and runs; nothing but Python is needed beforehand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test lint

train: $(STAMP)
	$(BIN)/coom train tiny $(ARGS)

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/python -m pycodestyle --max-line-length=79 coom tests benchmarks
	$(BIN)/python -m ruff check coom tests benchmarks
	$(BIN)/lint-imports

# torch is pinned first so pip takes the local CPU wheel instead of
# downloading the CUDA build; the rest follows pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)
