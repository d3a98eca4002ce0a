"""Shared test fixtures. No network, no hub: every model is built here from rlhf.tiny_model."""

from __future__ import annotations

import os

import pytest

# Offline everywhere, also in the subprocesses tests start (they inherit os.environ).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random-init Llama causal LM + BPE tokenizer (seed 0), built once per test session."""
    from rlhf.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_model") / "model"), seed=0)


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO_ROOT
