# RLHF toolkit: one-command setup, tests and demo. Only python3.11 is needed on the machine.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: setup test demo demo-tiny bench clean-outputs

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel here; never let pip pick an unpinned (CUDA, GBs) torch.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q tests

demo: setup
	./run_pipeline.sh

demo-tiny: setup
	./run_pipeline.sh --tiny

-include habana.mk
-include bench/bench.mk
