# Two commands set up and prove a fresh machine: `make demo` and `make test`.
# Both create .venv/ (Python 3.11+) and install the three packages editable (core with its
# crypto and messages extras), from PyPI otherwise.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench bench-quick chaos clean

install: $(STAMP)

$(STAMP): pyproject.toml libs/core/pyproject.toml libs/checkpoint-sqlite/pyproject.toml libs/checkpoint-postgres/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25.1"
	$(BIN)/python -m pip install --quiet \
		-e libs/core[crypto,messages] -e libs/checkpoint-sqlite -e libs/checkpoint-postgres \
		--group test --group lint
	touch $(STAMP)

demo: install
	$(BIN)/python examples/demo.py

test: install
	$(BIN)/python -m pytest -q

# The long fault-injection and chaos suites: every write index x kill boundary x durability mode x
# backend (sync and async API) in tests/test_faults.py, and STEPGRAPH_CHAOS_SECONDS (default 120)
# of random worker kills and terminated connections in tests/test_chaos.py.
chaos: install
	STEPGRAPH_CHAOS=1 $(BIN)/python -m pytest -q tests/test_faults.py tests/test_chaos.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check libs tests bench examples
	$(BIN)/mypy libs/core/stepgraph libs/checkpoint-sqlite/stepgraph libs/checkpoint-postgres/stepgraph

# The benchmark venv holds LangGraph (pinned) and stepgraph (editable) side by side: different
# import roots, one interpreter. Kept apart from .venv so LangGraph never enters the test env.
BENCH_VENV  := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP): bench/requirements.txt libs/core/pyproject.toml libs/checkpoint-sqlite/pyproject.toml libs/checkpoint-postgres/pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade "pip>=25.1"
	$(BENCH_VENV)/bin/python -m pip install --quiet -r bench/requirements.txt \
		-e libs/core -e libs/checkpoint-sqlite -e libs/checkpoint-postgres
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python bench/run.py

bench-quick: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python bench/run.py --quick

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .mypy_cache .ruff_cache
