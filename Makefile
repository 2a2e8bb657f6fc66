# `make run` and `make test` set everything up on a fresh machine: no manual step.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PYTHONUNBUFFERED := 1
export TOKENIZERS_PARALLELISM := false
export OMP_WAIT_POLICY := PASSIVE

.PHONY: install run test bench ui ui-check clean

$(PY):
	python3.11 -m venv $(VENV) 2>/dev/null || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# CPU machines take the 2.13.0 CPU build that lies on disk; a machine with a GPU keeps its own CUDA build.
# deepspeed ships only a source archive whose setup imports torch: build it against the torch installed here.
$(STAMP): pyproject.toml | $(PY)
	@if command -v nvidia-smi >/dev/null 2>&1 && $(PY) -c "import torch" 2>/dev/null; then \
		echo "GPU machine: keeping the installed torch"; \
	else $(PIP) install -q "torch==2.13.0"; fi
	$(PIP) install -q --no-build-isolation "deepspeed==0.19.8"
	$(PIP) install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/selfplay run configs/cycle/tiny-grpo.yaml

# the architecture's import rules (pyproject.toml [tool.importlinter]) first, then the suite
test: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

bench: install
	@mkdir -p runs/bench
	$(VENV)/bin/selfplay bench storage | tail -n 1 | tee runs/bench/storage.json
	$(VENV)/bin/selfplay bench rollout | tail -n 1 | tee runs/bench/rollout.json
	$(VENV)/bin/selfplay bench stages | tail -n 1 | tee runs/bench/stages.json
	$(VENV)/bin/selfplay bench scale configs/cycle/tiny.yaml rollout.prompts_per_shard=16 --prompts 128 | tail -n 1 | tee runs/bench/scale.json

ui: install
	$(PY) -m flows.ui

# Drives the Prefect UI in headless Chromium (Debian's chromium + Playwright without a browser download): its own
# server on a free port, a temporary PREFECT_HOME and store; screenshots in runs/ui-check/, a JSON line at the end.
ui-check: install
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	$(PY) scripts/ui_check.py

clean:
	rm -rf runs .prefect .pytest_cache
