# Sluis: `make run` starts the stack, `make test` runs the whole suite. Both set up everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LITELLM_VENV := .venv-litellm

.PHONY: install run test lint services bench-gateway bench-quotas clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/sluis up

services:
	bash scripts/services.sh

lint: install
	$(BIN)/ruff check gateway quotas billing deployments loadtests tests
	$(BIN)/ruff format --check gateway quotas billing deployments loadtests tests
	$(BIN)/mypy

test: install services lint
	$(BIN)/pytest

$(LITELLM_VENV)/bin/litellm:
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install -q 'litellm[proxy]'

bench-gateway: install $(LITELLM_VENV)/bin/litellm
	$(BIN)/python -m loadtests.bench_gateway --litellm $(LITELLM_VENV)/bin/litellm

bench-quotas: install
	$(BIN)/python -m loadtests.bench_quotas

clean:
	rm -rf $(VENV) $(LITELLM_VENV) .sluis .pytest_cache .mypy_cache .ruff_cache
