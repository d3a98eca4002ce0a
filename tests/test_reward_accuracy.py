"""rlhf.reward_accuracy: a reward model's accuracy on pairs whose answers are cut at the policy's length."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.reward_accuracy import cut_answer

REPO = Path(__file__).resolve().parents[1]


def test_cut_answer_keeps_the_first_tokens_and_says_whether_it_cut(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    answer = "The quick brown fox jumps over the lazy dog, then sleeps."
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    text, was_cut = cut_answer(tokenizer, answer, 3)
    assert was_cut and tokenizer(text, add_special_tokens=False)["input_ids"] == ids[:3]
    assert cut_answer(tokenizer, answer, len(ids)) == (answer, False)


def test_command_line_agrees_with_the_uncut_accuracy_when_nothing_is_cut(tiny_model_dir, tmp_path):
    """At a length no answer reaches, with room for every prompt, the texts scored are the whole ones: the
    accuracy must equal the whole-answer figure; at 1 token every pair is cut."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_dir = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(rm_dir)
    pairs = tmp_path / "valid.jsonl"
    rows = [json.loads(line) for line in (REPO / "data" / "demo" / "test.jsonl").read_text().splitlines()[:12]]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "accuracy.json"
    result = subprocess.run(
        [sys.executable, "-m", "rlhf.reward_accuracy", "--rm_dir", str(rm_dir), "--pairs_file", str(pairs),
         "--answer_tokens", "1", "4000", "--prompt_tokens", "4000", "--whole_max_length", "8000",
         "--output", str(output)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(output.read_text())
    assert figures["pairs"] == 12
    assert figures["answers_cut_at_4000"]["cut"] == 0.0
    assert figures["answers_cut_at_4000"]["accuracy"] == pytest.approx(figures["whole_answers"]["accuracy"])
    assert figures["answers_cut_at_1"]["cut"] == 1.0
    assert 0.0 <= figures["answers_cut_at_1"]["accuracy"] <= 1.0


def test_a_bad_length_is_refused_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "rlhf.reward_accuracy", "--rm_dir", str(tmp_path), "--pairs_file", "x.jsonl",
         "--answer_tokens", "0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("give one or more positive token counts")
