"""Generate the demo preference data set (orca columns: system, question, chosen, rejected).

Usage:
    python data/demo/make_demo_data.py                       # writes data/demo/{train,test}.jsonl
    python data/demo/make_demo_data.py --output_dir /tmp/demo --seed 0 --n_train 400 --n_test 140 \
        --off_topic_pairs 3

The preference follows the readable rule in ``rlhf/demo_rule.py`` (topics and markers are
imported from there, so data and rule agree): a chosen answer mentions the question's topic
word, is polite (contains a polite marker such as "Happy to help") and ends its sentence with
"." or "!". Each rejected answer breaks exactly one of these: impolite (rude: a rude marker and
no polite one; or plain: the bare fact, no marker at all), off topic (the same polite wording
about another topic) or trailing off (a polite opening, stopping mid-sentence). Answers are one
or two short sentences.

A rejected answer keeps the chosen answer's wording wherever its failure allows (a minimal
pair), so the one property that differs is what a reward model has to learn. Each training
question has several pairs, as in real preference data with several comparisons per prompt:
one rude, one plain, one trailing off and ``--off_topic_pairs`` off topic (3 by default, each
about a different other topic), because "on topic" is the relation between question and answer
that a small model learns last. The training rows are shuffled, so any first N rows mix
questions. Each test question has one pair: impolite (rude or plain), off topic or trailing off,
a third each at random.

Train and test use disjoint (question template, topic) combinations, so no test question
appears in train. Standard library only; the output depends only on ``--seed`` and the sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from rlhf.demo_rule import POLITE_MARKERS, TOPICS, TOPIC_WORDS, mentions, rule_score  # noqa: E402

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a friendly assistant. Answer briefly.",
    "You are an AI assistant that gives short, kind answers.",
    "Answer the user's question in one or two sentences.",
]

QUESTION_TEMPLATES = [
    "Tell me something about {t}.",
    "What do you know about {t}?",
    "Can you share a fact about {t}?",
    "I am curious about {t}. What is true about them?",
    "Give me one short fact about {t}.",
    "Please explain something interesting about {t}.",
    "What should I know about {t}?",
    "Teach me a fact about {t}.",
    "Say something true about {t}.",
    "Could you tell me about {t}?",
    "What is special about {t}?",
    "I want to learn about {t}. Any fact?",
    "Share something you know about {t}.",
    "What is a fun fact about {t}?",
]

# Markers that read naturally at the end of an answer.
CLOSING_MARKERS = ["Thanks for asking", "Hope this helps", "Happy to help"]
OPENING_MARKERS = [m for m in POLITE_MARKERS if m != "Hope this helps"]

RUDE_FORMATS = [
    "That is a silly question. {F}.",
    "Obviously {f}.",
    "Ugh, fine. {F}.",
    "Everyone knows that {f}.",
    "What a dumb question. {F}.",
    "{F}. Obviously.",
    "Whatever. {F}.",
]
# A polite answer's wordings; {f} is the fact with its first letter lowered (mid-sentence).
POLITE_FORMATS = [
    "{opening}! {fact}.",
    "{opening}. {fact}.",
    "{opening}: {f}.",
    "{fact}. {closing}!",
    "{opening}! Here is a fact: {f}.",
    "Sure! {fact}. {closing}.",
]
TRAILING_TAILS = ["and then the", "which is why the", "because the", "and also the", "but when the", "so the"]


def _lower_first(fact: str, topic: str) -> str:
    """The fact with its first letter lowered, unless it starts with a proper noun."""
    if fact.split()[0] == topic and topic[0].isupper():
        return fact
    return fact[0].lower() + fact[1:]


Style = tuple[str, str, int]  # (opening marker, closing marker, index into the polite formats)


def polite_style(rng: random.Random) -> Style:
    return rng.choice(OPENING_MARKERS), rng.choice(CLOSING_MARKERS), rng.randrange(len(POLITE_FORMATS))


def polite_answer(fact: str, topic: str, style: Style) -> str:
    """A polite, finished one- or two-sentence answer stating ``fact`` in ``style``."""
    opening, closing, index = style
    return POLITE_FORMATS[index].format(opening=opening, closing=closing, fact=fact, f=_lower_first(fact, topic))


def other_topics(rng: random.Random, topic: str, count: int) -> list[tuple[str, str]]:
    """``count`` different (topic word, fact) pairs of topics other than ``topic``.

    No fact mentions another topic word (``_check_topics``), so every other topic is off topic.
    """
    return rng.sample([(w, fa) for w, _, fa in TOPICS if w != topic], count)


def rejected_answer(rng: random.Random, kind: str, fact: str, topic: str, style: Style,
                    other: tuple[str, str] | None = None) -> str:
    """A rejected answer of failure ``kind``, worded like the chosen answer in ``style`` where it can be.

    ``other``: the (topic word, fact) an off-topic answer states instead.
    """
    if kind == "rude":
        return rng.choice(RUDE_FORMATS).format(F=fact, f=_lower_first(fact, topic))
    if kind == "plain":
        return f"{fact}."
    if kind == "off_topic":
        other_word, other_fact = other
        return polite_answer(other_fact, other_word, style)
    if kind == "trail_off":
        words = fact.split()
        topic_at = next(i for i, w in enumerate(words) if mentions(w, topic))
        cut = rng.randint(max(topic_at + 2, 3), max(topic_at + 2, 3, len(words) - 2))
        fragment = " ".join(words[:cut]).rstrip(",.")
        return f"{style[0]}! {fragment} {rng.choice(TRAILING_TAILS)}"
    raise ValueError(f"unknown rejected kind {kind!r}")


def question_pairs(rng: random.Random, question: str, word: str, fact: str, kinds: list[str]) -> list[dict]:
    """One row per failure kind in ``kinds`` for one question (off-topic rows use different topics)."""
    system = rng.choice(SYSTEM_PROMPTS)
    others = iter(other_topics(rng, word, kinds.count("off_topic")))
    rows = []
    for kind in kinds:
        style = polite_style(rng)
        other = next(others) if kind == "off_topic" else None
        row = {
            "system": system,
            "question": question,
            "chosen": polite_answer(fact, word, style),
            "rejected": rejected_answer(rng, kind, fact, word, style, other),
        }
        # The data must agree with the rule, or the demo teaches nothing checkable.
        assert rule_score(question, row["chosen"]) == 1.0, row
        assert rule_score(question, row["rejected"]) < 1.0, row
        rows.append(row)
    return rows


def held_out_kind(rng: random.Random) -> str:
    """A test pair's failure: impolite (rude or plain), off topic or trailing off, a third each."""
    kind = rng.choice(["impolite", "off_topic", "trail_off"])
    return rng.choice(["rude", "plain"]) if kind == "impolite" else kind


def make_pairs(seed: int = 0, n_train: int = 400, n_test: int = 140, off_topic_pairs: int = 3):
    """Build (train, test) rows; questions in test never occur in train.

    Train has ``3 + off_topic_pairs`` rows per question, test one (its kind picked at random).
    """
    rng = random.Random(seed)
    combos = [(template, topic) for template in QUESTION_TEMPLATES for topic in TOPICS]
    if n_train + n_test > len(combos):
        raise ValueError(f"at most {len(combos)} distinct questions; asked for {n_train + n_test}")
    rng.shuffle(combos)
    splits = {"test": combos[:n_test], "train": combos[n_test:n_test + n_train]}
    train_kinds = ["rude", "plain", "trail_off"] + ["off_topic"] * off_topic_pairs
    rows: dict[str, list[dict]] = {"test": [], "train": []}
    for name in ("test", "train"):  # test first: it does not depend on the training settings
        for template, (word, phrase, fact) in splits[name]:
            kinds = [held_out_kind(rng)] if name == "test" else train_kinds
            rows[name].extend(question_pairs(rng, template.format(t=phrase), word, fact, kinds))
    rng.shuffle(rows["train"])
    return rows["train"], rows["test"]


def _check_topics() -> None:
    for word, phrase, fact in TOPICS:
        assert mentions(phrase, word) and mentions(fact, word), word
        clashes = [w for w in TOPIC_WORDS if w != word and mentions(fact, w)]
        assert not clashes, f"fact for {word!r} mentions other topics {clashes}"


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--output_dir", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n_train", type=int, default=400)
    parser.add_argument("--n_test", type=int, default=140)
    parser.add_argument("--off_topic_pairs", type=int, default=3, help="off-topic pairs per training question")
    args = parser.parse_args()
    if not 0 <= args.off_topic_pairs < len(TOPICS):
        parser.error(f"--off_topic_pairs {args.off_topic_pairs} is out of range; use 0 to {len(TOPICS) - 1}")
    _check_topics()
    train, test = make_pairs(args.seed, args.n_train, args.n_test, args.off_topic_pairs)
    os.makedirs(args.output_dir, exist_ok=True)
    write_jsonl(os.path.join(args.output_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(args.output_dir, "test.jsonl"), test)
    print(f"wrote {len(train)} train pairs ({args.n_train} questions) and {len(test)} test pairs to {args.output_dir}")


if __name__ == "__main__":
    main()
