"""Tests for rlhf/demo_rule.py and the demo data it describes (data/demo/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rlhf.demo_rule import (
    POLITE_MARKERS,
    RUDE_MARKERS,
    TOPICS,
    TOPIC_WORDS,
    check_response,
    extract_question,
    find_topic,
    mentions,
    rule_reward,
    rule_score,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "data", "demo")
QUESTION = "Tell me something about elephants."
GOOD = "Happy to help! Elephants are the largest land animals and use their trunks to drink."


def _rows(name: str) -> list[dict]:
    with open(os.path.join(DEMO, f"{name}.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_good_answer_passes_all_checks():
    assert check_response(QUESTION, GOOD) == {"on_topic": True, "polite": True, "finished": True}
    assert rule_score(QUESTION, GOOD) == 1.0


@pytest.mark.parametrize(
    "response, failed",
    [
        ("That is a silly question. Elephants are the largest land animals.", "polite"),
        ("Obviously elephants are the largest land animals.", "polite"),
        ("Good question, but obviously elephants are big.", "polite"),  # rude marker beats polite
        ("Elephants are the largest land animals.", "polite"),  # no polite marker at all
        ("Happy to help! Mars is the red planet.", "on_topic"),
        ("Thanks for asking! Bananas grow in bunches.", "on_topic"),
        ("Happy to help! Elephants are the largest land animals and then the", "finished"),
        ("Good question! Elephants are big because the", "finished"),
        ("Good question! Elephants are big...", "finished"),
    ],
)
def test_each_failure_kind(response, failed):
    checks = check_response(QUESTION, response)
    assert checks[failed] is False
    assert sum(checks.values()) == 2, checks
    assert rule_score(QUESTION, response) == pytest.approx(2 / 3)


def test_score_is_fraction_of_checks():
    assert rule_score(QUESTION, "Obviously bananas are yellow and the") == 0.0
    assert rule_score(QUESTION, "obviously the bananas.") == pytest.approx(1 / 3)


def test_matching_details():
    assert mentions("Two octopuses swam by.", "octopus")
    assert mentions("MANGOES are sweet.", "mango")
    assert not mentions("A pineapple is sweet.", "apple")  # whole words only
    assert not mentions("It went through the tunnel.", "ugh")
    assert find_topic("Tell me about Paris and Rome.") == "Rome"
    assert find_topic("What is the weather like?") is None
    # Unknown topic: content-word overlap decides on_topic.
    assert check_response("Tell me about umbrellas.", "Happy to help! Umbrellas keep rain off.")["on_topic"]
    assert not check_response("Tell me about umbrellas.", "Happy to help! Cats sleep a lot.")["on_topic"]
    # A decoded end-of-text marker does not hide the final punctuation.
    assert check_response(QUESTION, GOOD + "</s>")["finished"]


@pytest.mark.parametrize(
    "prompt",
    [
        QUESTION,
        "You are a helpful assistant.\n\n" + QUESTION,
        "<s><|system|>\nYou are a helpful assistant.\n<|user|>\n" + QUESTION + "\n<|assistant|>\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n" + QUESTION + "<|im_end|>\n"
        "<|im_start|>assistant\n",
        "<s>[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\n" + QUESTION + " [/INST]",
        "### System: Be kind.\n### Human: " + QUESTION + "\n### Assistant:",
    ],
)
def test_rule_reward_finds_question_in_rendered_prompts(prompt):
    assert find_topic(extract_question(prompt)) == "elephant"
    bad = "Happy to help! Mars is the red planet."
    assert rule_reward([prompt, prompt], [GOOD, bad]) == [1.0, pytest.approx(2 / 3)]


def test_rule_reward_length_mismatch():
    with pytest.raises(ValueError):
        rule_reward(["a"], [])


def test_topics_and_markers_are_consistent():
    assert len(TOPICS) >= 40 and len(set(w.lower() for w in TOPIC_WORDS)) == len(TOPIC_WORDS)
    for word, phrase, fact in TOPICS:
        assert find_topic(phrase) == word
        assert [w for w in TOPIC_WORDS if mentions(fact, w)] == [word]
    for marker in POLITE_MARKERS:
        assert not any(mentions(marker, rude) for rude in RUDE_MARKERS)


@pytest.mark.parametrize("name", ["train", "test"])
def test_committed_data_follows_rule(name):
    rows = _rows(name)
    assert len(rows) >= (400 if name == "train" else 120)
    for i, row in enumerate(rows):
        assert set(row) == {"system", "question", "chosen", "rejected"}, i
        assert all(isinstance(v, str) and v.strip() for v in row.values()), i
        assert rule_score(row["question"], row["chosen"]) == 1.0, (i, row)
        assert rule_score(row["question"], row["rejected"]) < 1.0, (i, row)
        assert len(row["chosen"].split()) < 40 and len(row["rejected"].split()) < 40
    prompts = [row["system"] + "\n" + row["question"] for row in rows]
    assert rule_reward(prompts, [row["chosen"] for row in rows]) == [1.0] * len(rows)


def test_data_has_all_failure_kinds_and_varied_answers():
    rows = _rows("train")
    kinds = {"on_topic": 0, "polite": 0, "finished": 0}
    for row in rows:
        for key, ok in check_response(row["question"], row["rejected"]).items():
            kinds[key] += not ok
    assert all(count >= len(rows) // 6 for count in kinds.values()), kinds
    assert len({row["chosen"] for row in rows}) > len(rows) // 3  # chosen wording varies per pair
    assert len({row["system"] for row in rows}) >= 3
    assert {find_topic(row["question"]) for row in rows} == set(TOPIC_WORDS)


def test_train_and_test_questions_do_not_overlap():
    train = {row["question"] for row in _rows("train")}
    test = {row["question"] for row in _rows("test")}
    assert train and test and not (train & test)


def test_generator_is_deterministic_and_matches_committed_files(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(DEMO, "make_demo_data.py"), "--output_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for name in ("train.jsonl", "test.jsonl"):
        with open(tmp_path / name, "rb") as new, open(os.path.join(DEMO, name), "rb") as old:
            assert new.read() == old.read(), name


def test_training_questions_have_one_pair_per_failure_and_minimal_pairs():
    by_question: dict[str, list[dict]] = {}
    for row in _rows("train"):
        by_question.setdefault(row["question"], []).append(row)
    assert len(by_question) == 400  # 6 pairs each: rude, plain, trailing off, 3 off topic
    for question, rows in by_question.items():
        failures = [next(k for k, ok in check_response(question, r["rejected"]).items() if not ok) for r in rows]
        assert sorted(failures) == ["finished", "on_topic", "on_topic", "on_topic", "polite", "polite"], question
        impolite = [r["rejected"] for r, failure in zip(rows, failures) if failure == "polite"]
        assert sum(any(mentions(text, m) for m in RUDE_MARKERS) for text in impolite) == 1  # one rude, one plain
        off_topic = [r for r, failure in zip(rows, failures) if failure == "on_topic"]
        other_topics = {next(w for w in TOPIC_WORDS if mentions(r["rejected"], w)) for r in off_topic}
        assert len(other_topics) == 3, question
        for row in off_topic:  # the same polite wording, another topic's fact
            markers = [m for m in POLITE_MARKERS if mentions(row["chosen"], m)]
            assert markers and markers == [m for m in POLITE_MARKERS if mentions(row["rejected"], m)], row
    assert len({row["system"] for rows in by_question.values() for row in rows}) >= 3
    assert all(len({row["system"] for row in rows}) == 1 for rows in by_question.values())
