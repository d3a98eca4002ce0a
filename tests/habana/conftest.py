"""Gaudi-stack tests (optimum-habana 1.21 / transformers 4.55), on CPU, under EMULATION.

Run by ``make test-habana`` in ``.venv-habana``. Under the main venv (no optimum-habana) the whole
folder is skipped. Habana's software is emulated by ``emulation/`` (test-only; read
``emulation/habana_emulation.py`` for exactly what is faked): these tests show that our scripts
reach optimum-habana's Gaudi classes and hooks with the Gaudi users' arguments, not that anything
runs on a real Gaudi.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EMULATION = Path(__file__).resolve().parent / "emulation"
TEST_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


def _optimum_habana_installed() -> bool:
    try:
        return importlib.util.find_spec("optimum.habana") is not None
    except ModuleNotFoundError:  # no `optimum` at all
        return False


HABANA_STACK = _optimum_habana_installed()

if not HABANA_STACK:
    # Main venv: collect nothing here (the folder is skipped, and the header says so).
    collect_ignore_glob = ["*"]

    def pytest_report_header(config):
        return "tests/habana skipped: optimum-habana is not installed (run them with `make test-habana`)"

else:
    os.environ.update(TEST_ENV)
    for _name in (str(REPO), str(EMULATION), str(Path(__file__).resolve().parent)):
        if _name not in sys.path:
            sys.path.insert(0, _name)

    import habana_emulation  # test-only emulation, installed in the pytest process too

    habana_emulation.install()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """The tiny random Llama + BPE tokenizer, built once (saved by transformers 4.55)."""
    from rlhf.tiny_model import build_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model(str(path), seed=0)
    return str(path)


@pytest.fixture(scope="session")
def demo_train() -> str:
    return str(REPO / "data" / "demo" / "train.jsonl")


@pytest.fixture
def emulation_record():
    """Reset the in-process record; yields it (calls, instances, events, input_shapes)."""
    for key in ("instances", "events", "input_shapes"):
        habana_emulation.RECORD[key].clear()
    habana_emulation.RECORD["calls"].clear()
    yield habana_emulation.RECORD
