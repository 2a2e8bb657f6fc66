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

.PHONY: install run test bench ui clean

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
	$(VENV)/bin/selfplay world check

test: install
	$(PY) -m pytest -q

bench: install
	@mkdir -p runs/bench
	$(VENV)/bin/selfplay bench storage | tee runs/bench/storage.json

ui: install
	$(PY) -m flows.ui

clean:
	rm -rf runs .prefect .pytest_cache
