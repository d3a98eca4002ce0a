"""Shared test fixtures. No network, no hub: every model is built here from rlhf.tiny_model."""

from __future__ import annotations

import os

import pytest

# Offline everywhere, also in the subprocesses tests start (they inherit os.environ).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config) -> None:
    """Split the cores between pytest-xdist's workers (``make test`` runs ``-n auto``).

    Without this every worker, and every subprocess a test starts, would use all the cores: on 2 cores two
    workers of 2 threads each run slower than one. Tests that compare two runs do both in one process,
    so the thread count they see is the same for both."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return  # one process (PYTEST_ARGS="-n 0", make test-habana, make test-vllm): torch's defaults
    import torch

    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random-init Llama causal LM + BPE tokenizer (seed 0), built once per test session."""
    from rlhf.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_model") / "model"), seed=0)


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO_ROOT
