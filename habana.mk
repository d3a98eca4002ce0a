# Gaudi stack (optimum-habana 1.21.2, transformers 4.55): its own virtual environment, .venv-habana.
# Included by the Makefile. See docs/gaudi.md.
#
#   make setup-habana        no Gaudi here: python3.11 venv, CPU torch first, then requirements-habana.txt
#   make setup-habana HABANA_TORCH= HABANA_PYTHON=python3
#                            on a Gaudi host, inside Intel's container image: install NO torch and let
#                            the venv see the image's torch + habana_frameworks (--system-site-packages)
#   make test-habana         tests/habana: the Gaudi path on CPU, with Habana's software EMULATED
#
# HABANA_TORCH   the torch requirement installed first; set it empty on a Gaudi host.
# HABANA_PYTHON  the interpreter the venv is made from (Intel's images ship their own python3).

HABANA_PYTHON ?= python3.11
HABANA_TORCH ?= torch==2.13.0
HABANA_VENV ?= .venv-habana
HABANA_ENV := HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
HABANA_VENV_FLAGS := $(if $(strip $(HABANA_TORCH)),,--system-site-packages)

.PHONY: setup-habana test-habana

$(HABANA_VENV)/.installed: requirements-habana.txt
	$(HABANA_PYTHON) -m venv $(HABANA_VENV_FLAGS) $(HABANA_VENV)
ifneq ($(strip $(HABANA_TORCH)),)
	# torch first and pinned (CPU wheel): only because this is not a Gaudi host.
	$(HABANA_VENV)/bin/python -m pip install --quiet "$(HABANA_TORCH)"
endif
	# one command, so pip keeps transformers at optimum-habana's pin
	$(HABANA_VENV)/bin/python -m pip install --quiet -r requirements-habana.txt
	touch $@

setup-habana: $(HABANA_VENV)/.installed

test-habana: setup-habana
	$(HABANA_ENV) $(HABANA_VENV)/bin/python -m pytest -q tests/habana
