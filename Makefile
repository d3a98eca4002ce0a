# RLHF toolkit: one-command setup, tests and demo. Only python3.11 is needed on the machine.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: setup setup-dev setup-deepspeed test demo demo-tiny bench clean-outputs recipe-hh

# Packages other than torch go in with uv (pinned, from PyPI): the same pins as pip, installed in about 15 s
# instead of 36 here (parallel downloads and unpacking). --compile-bytecode writes the .pyc files at install,
# as pip does: where PYTHONDONTWRITEBYTECODE is set nothing else writes them, and every import pays.
UV := $(VENV)/bin/uv pip install --quiet --python $(PY) --compile-bytecode

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip uv==0.13.9
	# torch first, pinned and with pip: pip takes the CPU wheel where pip's configuration points at one (uv does not
	# read it); never let an installer pick an unpinned (CUDA, GBs) torch.
	$(PY) -m pip install --quiet torch==2.13.0
	$(UV) -r requirements.txt
	touch $@

# What the tests need beside the main stack (pytest and its parallel runner); the demo does not install it.
$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(UV) -r requirements-dev.txt
	touch $@

# Optional DeepSpeed set (the demo never uses it; make test does). On a CPU-only machine DeepSpeed compiles its
# C++ comm op at first use; it is built once, into the venv (tests/test_deepspeed.py uses the same
# TORCH_EXTENSIONS_DIR and the venv's ninja, so no test rebuilds it).
$(VENV)/.installed-deepspeed: $(VENV)/.installed requirements-deepspeed.txt
	# pip, not uv: DeepSpeed is an sdist whose build must see the installed torch
	$(PY) -m pip install --quiet -r requirements-deepspeed.txt
	touch $@

BUILD_DS_OPS := PATH="$(abspath $(VENV))/bin:$$PATH" TORCH_EXTENSIONS_DIR="$(abspath $(VENV))/torch_extensions" \
	$(PY) -m rlhf.deepspeed_ops
# A build killed half-way (Ctrl-C, a timeout) leaves torch's lock file, and every DeepSpeed job then waits on it
# for ever: make test removes such a stale lock first (rlhf/deepspeed_ops.py).
CLEAR_DS_LOCKS := TORCH_EXTENSIONS_DIR="$(abspath $(VENV))/torch_extensions" $(PY) -m rlhf.deepspeed_ops --remove_stale_locks
$(VENV)/.built-deepspeed-ops: $(VENV)/.installed-deepspeed
	$(BUILD_DS_OPS)
	touch $@

setup: $(VENV)/.installed

setup-dev: $(VENV)/.installed-dev

setup-deepspeed: $(VENV)/.built-deepspeed-ops

# Test files run in parallel, one worker per core up to 4 (tests/conftest.py splits the threads between them);
# a file's tests stay on one worker, so its module fixtures are built once. PYTEST_ARGS="-n 0" runs them serially.
PYTEST_ARGS ?= -n auto --maxprocesses 4 --dist loadfile
# The comm op compiles (about 40 s, mostly on one core) beside the first tests rather than before them: a
# DeepSpeed test that starts first waits on torch's build lock, and a failed build fails make test.
test: setup-dev $(VENV)/.installed-deepspeed
	@$(CLEAR_DS_LOCKS)
	@if [ -f $(VENV)/.built-deepspeed-ops ]; then ops=; else \
		( $(BUILD_DS_OPS) && touch $(VENV)/.built-deepspeed-ops ) & ops=$$!; fi; \
	rc=0; $(PY) -m pytest -q $(PYTEST_ARGS) tests || rc=$$?; \
	if [ -n "$$ops" ] && ! wait $$ops; then echo "make test: building DeepSpeed's comm op failed (output above)" >&2; rc=1; fi; \
	exit $$rc

demo: setup
	./run_pipeline.sh

demo-tiny: setup
	./run_pipeline.sh --tiny

-include habana.mk
-include vllm.mk
-include bench/bench.mk

# The measured recipe on real preference data (docs/recipes.md); HH_DATA: a folder with hh-rlhf's train.jsonl.
recipe-hh: setup
	@test -n "$(HH_DATA)" || { echo "make recipe-hh: set HH_DATA to a folder holding hh-rlhf rows (train.jsonl)" >&2; exit 2; }
	configs/recipes/hh-rlhf/run.sh "$(HH_DATA)"
