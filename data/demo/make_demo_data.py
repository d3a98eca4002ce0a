"""Generate the demo preference data set (orca columns: system, question, chosen, rejected).

Usage:
    python data/demo/make_demo_data.py                       # writes data/demo/{train,test}.jsonl
    python data/demo/make_demo_data.py --output_dir /tmp/demo --seed 0 --n_train 400 --n_test 140

The preference follows the readable rule in ``rlhf/demo_rule.py`` (topics and markers are
imported from there, so data and rule agree): a chosen answer mentions the question's topic
word, is polite (contains a polite marker such as "Happy to help") and ends its sentence with
"." or "!". Each rejected answer breaks exactly one of these, picked at random per pair: rude
(a rude marker, no polite one), off topic (a polite, finished answer about another topic) or
trailing off (stops mid-sentence, no final punctuation). Answers are one or two short sentences.

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
TRAILING_TAILS = ["and then the", "which is why the", "because the", "and also the", "but when the", "so the"]


def _lower_first(fact: str, topic: str) -> str:
    """The fact with its first letter lowered, unless it starts with a proper noun."""
    if fact.split()[0] == topic and topic[0].isupper():
        return fact
    return fact[0].lower() + fact[1:]


def polite_answer(rng: random.Random, fact: str, topic: str) -> str:
    """A polite, finished one- or two-sentence answer stating ``fact``."""
    opening, closing = rng.choice(OPENING_MARKERS), rng.choice(CLOSING_MARKERS)
    f = _lower_first(fact, topic)
    formats = [
        f"{opening}! {fact}.",
        f"{opening}. {fact}.",
        f"{opening}: {f}.",
        f"{fact}. {closing}!",
        f"{opening}! Here is a fact: {f}.",
        f"Sure! {fact}. {closing}.",
    ]
    return rng.choice(formats)


def rejected_answer(rng: random.Random, kind: str, fact: str, topic: str) -> str:
    if kind == "rude":
        return rng.choice(RUDE_FORMATS).format(F=fact, f=_lower_first(fact, topic))
    if kind == "off_topic":
        others = [(w, fa) for w, _, fa in TOPICS if w != topic and not mentions(fa, topic)]
        other_word, other_fact = rng.choice(others)
        return polite_answer(rng, other_fact, other_word)
    if kind == "trail_off":
        words = fact.split()
        topic_at = next(i for i, w in enumerate(words) if mentions(w, topic))
        cut = rng.randint(max(topic_at + 2, 3), max(topic_at + 2, 3, len(words) - 2))
        fragment = " ".join(words[:cut]).rstrip(",.")
        return f"{rng.choice(OPENING_MARKERS)}! {fragment} {rng.choice(TRAILING_TAILS)}"
    raise ValueError(f"unknown rejected kind {kind!r}")


def make_pairs(seed: int = 0, n_train: int = 400, n_test: int = 140) -> tuple[list[dict], list[dict]]:
    """Build (train, test) rows; questions in test never occur in train."""
    rng = random.Random(seed)
    combos = [(template, topic) for template in QUESTION_TEMPLATES for topic in TOPICS]
    if n_train + n_test > len(combos):
        raise ValueError(f"at most {len(combos)} distinct questions; asked for {n_train + n_test}")
    rng.shuffle(combos)
    splits = {"test": combos[:n_test], "train": combos[n_test:n_test + n_train]}
    rows: dict[str, list[dict]] = {}
    for name in ("train", "test"):
        rows[name] = []
        for template, (word, phrase, fact) in splits[name]:
            question = template.format(t=phrase)
            kind = rng.choice(["rude", "off_topic", "trail_off"])
            row = {
                "system": rng.choice(SYSTEM_PROMPTS),
                "question": question,
                "chosen": polite_answer(rng, fact, word),
                "rejected": rejected_answer(rng, kind, fact, word),
            }
            # The data must agree with the rule, or the demo teaches nothing checkable.
            assert rule_score(question, row["chosen"]) == 1.0, row
            assert rule_score(question, row["rejected"]) < 1.0, row
            rows[name].append(row)
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
    args = parser.parse_args()
    _check_topics()
    train, test = make_pairs(args.seed, args.n_train, args.n_test)
    os.makedirs(args.output_dir, exist_ok=True)
    write_jsonl(os.path.join(args.output_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(args.output_dir, "test.jsonl"), test)
    print(f"wrote {len(train)} train and {len(test)} test pairs to {args.output_dir}")


if __name__ == "__main__":
    main()
