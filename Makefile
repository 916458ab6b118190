# Two entry points for a fresh machine: `make demo` and `make test` (README.md).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo live test unit integration lint security bench clean services-up services-down

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/waterflow replay --out .waterflow/demo --network dataflows/samples/network.toml dataflows/samples/

# The live stack without Docker (deploy/local/stack.sh): start it, publish the samples, watch
# rows, Redis keys, counters and an alert for a bounded time; it keeps running until
# `deploy/local/stack.sh stop`.
live: $(STAMP)
	bash deploy/local/stack.sh live

test: $(STAMP)
	bash deploy/local/run-tests.sh

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

lint: $(STAMP)
	$(BIN)/ruff check dataflows connectors tests bench grafana
	$(BIN)/mypy

# bandit over the packages, pip-audit over .venv's dependencies (also part of `make test`).
security: $(STAMP)
	bash deploy/local/security-checks.sh

# Side-by-side speed figures (bench/README.md); not part of `make test`. BENCH_ARGS=--quick for
# 200 k readings per size instead of 1 M.
bench: $(VENV)/.bench-installed
	$(BIN)/python bench/compare.py $(BENCH_ARGS)

$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $@

clean:
	rm -rf $(VENV) .waterflow .pytest_cache .ruff_cache .mypy_cache
