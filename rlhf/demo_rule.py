"""The readable rule behind the demo preference data (``data/demo/*.jsonl``).

A response to a demo question is good when it passes three checks:

* ``on_topic``: the response mentions the question's topic word. The topic is the known
  topic word (``TOPIC_WORDS``, matched case-insensitively as a whole word, plural "s"/"es"
  allowed) that occurs in the question; if several occur, the last one counts. If the question
  contains no known topic word, the response must share at least one content word (4+ letters,
  not a stop word) with the question instead.
* ``polite``: the response contains at least one polite marker (``POLITE_MARKERS``, e.g.
  "Happy to help", "Thanks for asking") and none of the rude markers (``RUDE_MARKERS``, e.g.
  "silly question", "obviously"). Markers match case-insensitively on word boundaries.
* ``finished``: after stripping whitespace (and a trailing end-of-text marker such as
  ``</s>``), the response ends with "." or "!" and not with an ellipsis ("...").

``rule_score`` is the fraction of the three checks passed (0, 1/3, 2/3 or 1).
``rule_reward`` scores a batch of (prompt, response) pairs; the prompt may be the full
rendered prompt (system text, chat-template markers, ...): the question is located inside it
(see ``extract_question``). It can serve as the reward callable for PPO and as the
ground-truth check in tests.

The generator ``data/demo/make_demo_data.py`` imports the topics and markers from here, so the
data and the rule agree: every chosen answer scores 1.0, every rejected one less.
"""

from __future__ import annotations

import re
from functools import lru_cache

# (topic word, how questions name it, one simple true fact that mentions the topic word).
# Facts never mention another topic word (checked by the generator and the tests).
TOPICS: list[tuple[str, str, str]] = [
    # animals
    ("elephant", "elephants", "Elephants are the largest land animals and use their trunks to drink"),
    ("dolphin", "dolphins", "Dolphins are clever mammals that breathe air through a blowhole"),
    ("penguin", "penguins", "Penguins are birds that cannot fly but swim very well"),
    ("giraffe", "giraffes", "Giraffes have very long necks that help them eat leaves from tall trees"),
    ("owl", "owls", "Owls hunt at night and can turn their heads a long way"),
    ("tiger", "tigers", "Tigers are big cats with striped coats and they like to swim"),
    ("camel", "camels", "Camels can walk for days in the desert without drinking"),
    ("bee", "bees", "Bees collect nectar from flowers and make honey in their hives"),
    ("octopus", "octopuses", "An octopus has eight arms and three hearts"),
    ("shark", "sharks", "Sharks have skeletons made of cartilage instead of bone"),
    # fruit
    ("banana", "bananas", "Bananas grow in bunches and are rich in potassium"),
    ("apple", "apples", "Apples grow on trees and come in red, green and yellow kinds"),
    ("lemon", "lemons", "Lemons are sour citrus fruits full of vitamin C"),
    ("grape", "grapes", "Grapes grow on vines and can be dried into raisins"),
    ("mango", "mangoes", "Mangoes are sweet tropical fruits with one large seed"),
    ("pineapple", "pineapples", "A pineapple takes about two years to grow on its plant"),
    ("coconut", "coconuts", "Coconuts have a hard shell with water and white flesh inside"),
    ("plum", "plums", "Plums are small round fruits with a hard pit and can be dried into prunes"),
    # cities
    ("Paris", "Paris", "Paris is the capital of France and is known for the Eiffel Tower"),
    ("Tokyo", "Tokyo", "Tokyo is the capital of Japan and one of the largest cities on Earth"),
    ("Cairo", "Cairo", "Cairo is the capital of Egypt and lies on the Nile"),
    ("London", "London", "London is the capital of England and has a famous clock called Big Ben"),
    ("Rome", "Rome", "Rome is the capital of Italy and is home to the Colosseum"),
    ("Sydney", "Sydney", "Sydney is a city in Australia with a famous opera house by the harbour"),
    # planets
    ("Mars", "Mars", "Mars is called the red planet because of rusty dust on its surface"),
    ("Jupiter", "Jupiter", "Jupiter is the largest planet in our solar system"),
    ("Saturn", "Saturn", "Saturn is a gas giant with bright rings made of ice and rock"),
    ("Venus", "Venus", "Venus is the hottest planet because its thick clouds trap heat"),
    ("Mercury", "Mercury", "Mercury is the planet closest to the Sun"),
    # tools
    ("hammer", "hammers", "A hammer is a tool used to drive nails into wood"),
    ("screwdriver", "screwdrivers", "A screwdriver turns screws so they go in or come out"),
    ("ladder", "ladders", "A ladder helps people climb up to high places safely"),
    ("wrench", "wrenches", "A wrench is a tool that grips and turns nuts and bolts"),
    ("shovel", "shovels", "A shovel is used to dig and move soil or snow"),
    # sports and games
    ("soccer", "soccer", "Soccer is played by two teams of eleven players who kick a ball into a goal"),
    ("tennis", "tennis", "Tennis players hit a ball over a net with a racket"),
    ("chess", "chess", "Chess is a board game where each player starts with sixteen pieces"),
    ("basketball", "basketball", "Basketball teams score points by throwing a ball through a hoop"),
    ("golf", "golf", "In golf players try to hit a small ball into a hole in as few strokes as possible"),
    # nature and music
    ("volcano", "volcanoes", "A volcano is an opening in the ground where hot lava can come out"),
    ("river", "rivers", "A river is a stream of fresh water that flows toward the sea"),
    ("rainbow", "rainbows", "A rainbow appears when sunlight shines through drops of rain"),
    ("piano", "pianos", "A piano makes sound when felt pads strike its strings"),
    ("guitar", "guitars", "A guitar usually has six strings that players pluck or strum"),
]
TOPIC_WORDS: list[str] = [word for word, _, _ in TOPICS]

POLITE_MARKERS: list[str] = [
    "Happy to help",
    "Thanks for asking",
    "Good question",
    "Great question",
    "Glad you asked",
    "Hope this helps",
]
RUDE_MARKERS: list[str] = [
    "silly question",
    "dumb question",
    "obviously",
    "everyone knows",
    "ugh",
    "whatever",
]

# Text that may close a decoded response without being part of the answer.
_END_MARKERS = ("</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>")

# Markers that start a user turn in common prompt formats; the question is the text after the
# last one, up to the next turn marker.
_USER_TURN = re.compile(
    r"(<\|user\|>|<\|im_start\|>user|<\|start_header_id\|>user<\|end_header_id\|>|\[INST\]"
    r"|###\s*(?:Human|User|Question|Instruction)\s*:|(?:^|\n)\s*(?:Human|User|Question)\s*:)",
    re.IGNORECASE,
)
_TURN_END = re.compile(
    r"(<\|[a-z_]+\|>|<\|im_end\|>|<\|eot_id\|>|\[/INST\]|</s>|###|(?:^|\n)\s*(?:Assistant|Answer)\s*:)",
    re.IGNORECASE,
)
_STOP_WORDS = frozenset(
    "what when where which while with would could should about there their them they this that "
    "these those have your from into some something tell know share give fact facts please "
    "quick question true anything interesting explain learn short teach curious special".split()
)


@lru_cache(maxsize=None)
def _word_pattern(word: str) -> re.Pattern[str]:
    """Whole-word, case-insensitive match of ``word`` with an optional plural "s"/"es"."""
    return re.compile(r"\b" + re.escape(word) + r"(?:s|es)?\b", re.IGNORECASE)


@lru_cache(maxsize=None)
def _marker_pattern(marker: str) -> re.Pattern[str]:
    return re.compile(r"\b" + re.escape(marker) + r"\b", re.IGNORECASE)


def mentions(text: str, word: str) -> bool:
    """True if ``text`` contains ``word`` (whole word, any case, plural allowed)."""
    return _word_pattern(word).search(text) is not None


def find_topic(question: str) -> str | None:
    """The known topic word in ``question`` (the last one if several), or None."""
    best, best_pos = None, -1
    for word in TOPIC_WORDS:
        for match in _word_pattern(word).finditer(question):
            if match.start() > best_pos:
                best, best_pos = word, match.start()
    return best


def extract_question(prompt: str) -> str:
    """The user's question inside a (possibly chat-templated) prompt.

    Takes the text after the last user-turn marker (``<|user|>``, ``<|im_start|>user``,
    ``[INST]``, ``### Human:``, ``User:`` ...) up to the next turn marker; without any marker
    the whole prompt is returned.
    """
    starts = list(_USER_TURN.finditer(prompt))
    if not starts:
        return prompt.strip()
    rest = prompt[starts[-1].end():]
    end = _TURN_END.search(rest)
    question = rest[: end.start()] if end else rest
    return question.strip() or prompt.strip()


def _content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]{4,}", text.lower()) if w not in _STOP_WORDS}


def _strip_end_markers(response: str) -> str:
    text = response.strip()
    changed = True
    while changed:
        changed = False
        for marker in _END_MARKERS:
            if text.endswith(marker):
                text = text[: -len(marker)].rstrip()
                changed = True
    return text


def check_response(question: str, response: str) -> dict[str, bool]:
    """Run the three checks (see the module docstring) on one response to ``question``."""
    topic = find_topic(question)
    if topic is not None:
        on_topic = mentions(response, topic)
    else:
        on_topic = bool(_content_words(question) & _content_words(response))
    polite = any(_marker_pattern(m).search(response) for m in POLITE_MARKERS) and not any(
        _marker_pattern(m).search(response) for m in RUDE_MARKERS
    )
    text = _strip_end_markers(response)
    finished = text.endswith((".", "!")) and not text.endswith("..")
    return {"on_topic": on_topic, "polite": polite, "finished": finished}


def rule_score(question: str, response: str) -> float:
    """Fraction of the three checks passed, in [0, 1]."""
    checks = check_response(question, response)
    return sum(checks.values()) / len(checks)


def rule_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Batched ``rule_score``; each prompt may be the full rendered prompt text."""
    if len(prompts) != len(responses):
        raise ValueError(f"rule_reward: {len(prompts)} prompts but {len(responses)} responses")
    return [rule_score(extract_question(p), r) for p, r in zip(prompts, responses)]
