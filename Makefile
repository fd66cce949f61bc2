# Every target bootstraps its own virtual environment; nothing else needs installing by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test lint fmt bench soak fuzz histories clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

dev: $(STAMP)
	$(BIN)/chainloom dev

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m chains.schema --check
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m pytest -q -m "bench or soak" -p no:randomly benchmarks tests -o addopts="" --benchmark-disable-gc

# The recovery soak alone: 8 runs x 6 steps, the worker SIGKILLed 6 times; prints the table.
soak: $(STAMP)
	$(BIN)/python -m pytest -q -m soak -p no:randomly tests/test_recovery_soak.py -o addopts="" -s

# Schemathesis over every route of the OpenAPI document, on SQLite and PostgreSQL by default
# (FUZZ_ARGS="--database sqlite" for SQLite only; FUZZ_EXAMPLES per operation). Exit 1 on any
# 5xx or response that breaks its declared schema.
FUZZ_EXAMPLES ?= 50
FUZZ_ARGS ?=
fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzz --examples $(FUZZ_EXAMPLES) $(FUZZ_ARGS)

# Record a history of every workflow type with the current code, for tests/test_histories.py
# (docs/workflows.md: only after a change to a workflow's decisions, put behind a patch).
histories: $(STAMP)
	$(BIN)/python -m tests.histories.record

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .chainloom
