# Two entry points do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test lint typecheck unit bench cluster chaos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[fast]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/optsync up

lint: $(VENV)/.installed-dev
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/ruff check src tests bench examples

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy --strict src

# The fast tier: pure rules and in-process pieces, no server (seconds).
unit: $(VENV)/.installed-dev
	$(BIN)/python -m pytest tests/unit

test: lint typecheck
	bash scripts/ensure-test-tools.sh
	$(BIN)/python -m pytest --durations=15

# The scale-out walkthrough: private nats-server, PostgreSQL and MariaDB; capture, 2 apply, 2 serve.
cluster: $(VENV)/.installed-dev
	bash scripts/ensure-test-tools.sh
	$(BIN)/python examples/cluster/run.py

# The full chaos run (docs/reliability.md): >= 100 SIGKILLs of capture/apply/serve and restarts of
# the source databases and nats-server under random source changes; minutes. The short form is in
# `make test` (tests/chaos/test_chaos_short.py).
chaos: $(VENV)/.installed-dev
	bash scripts/ensure-test-tools.sh
	$(BIN)/python tests/chaos/run.py --kills 100

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
