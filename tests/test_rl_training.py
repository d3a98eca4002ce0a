"""rl_training.py's prompt loading (the PPO loop itself is in test_ppo.py, its CLI in test_reliability.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import rl_training  # noqa: E402
from rlhf.data import DataArguments  # noqa: E402
from rlhf.modeling import load_tokenizer  # noqa: E402


def write_pairs(path: Path, questions: list[str]) -> str:
    rows = [{"system": "", "question": q, "chosen": "Happy to help.", "rejected": "No."} for q in questions]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_repeated_prompts_are_used_once_and_never_both_trained_and_held_out(tokenizer, tmp_path):
    # Several preference pairs per prompt, as in data/demo/train.jsonl.
    questions = [f"Question {i}?" for i in range(12) for _ in range(3)]
    data = DataArguments(train_file=write_pairs(tmp_path / "train.jsonl", questions))
    args = rl_training.ScriptArguments(batch_size=2, eval_samples=2, seed=0)
    prompts, held_out = rl_training.load_prompts(data, args, tokenizer, world=1, rank=0)
    assert len(set(prompts)) == len(prompts) == 10
    assert len(set(held_out)) == len(held_out) == 2
    assert not set(prompts) & set(held_out)


def test_repeated_held_out_prompts_are_evaluated_once(tokenizer, tmp_path):
    data = DataArguments(
        train_file=write_pairs(tmp_path / "train.jsonl", [f"Train {i}?" for i in range(4)]),
        validation_file=write_pairs(tmp_path / "test.jsonl", ["Held out?", "Held out?", "Other?"]),
    )
    args = rl_training.ScriptArguments(batch_size=2, eval_samples=8, seed=0)
    prompts, held_out = rl_training.load_prompts(data, args, tokenizer, world=1, rank=0)
    assert len(prompts) == 4
    assert len(held_out) == 2 and held_out[0] != held_out[1]
