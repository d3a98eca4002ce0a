"""SFT examples as token ids: completion-only labels and document-preserving packing.

`tokenize_example` turns a rendered (prompt, answer) pair into `input_ids` and `labels`, with the
prompt masked out of the loss (-100) unless `train_on_inputs`, EOS appended unless truncated.
`pack_examples` concatenates examples into blocks of exactly `block_size` tokens (the last one may
be shorter) and restarts `position_ids` at every document start. With position ids and no attention
mask, transformers builds a block-diagonal causal mask, so documents packed together never attend
to each other. `PackedCollator` pads such blocks without breaking that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.tokenization import encode_text, keep_end

IGNORE_INDEX = -100


def tokenize_example(
    prompt: str,
    answer: str,
    tokenizer,
    max_seq_length: int,
    max_source_length: int,
    train_on_inputs: bool,
) -> dict:
    # The prompt is encoded exactly as PPO encodes it (rlhf.tokenization): BOS once, whatever the template.
    prompt_ids = encode_text(tokenizer, prompt)
    prompt_ids = keep_end(prompt_ids, max_source_length) if max_source_length else prompt_ids
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    room = max_seq_length - len(prompt_ids)
    if tokenizer.eos_token_id is not None and len(answer_ids) < room:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    answer_ids = answer_ids[: max(room, 0)]
    input_ids = prompt_ids + answer_ids
    labels = list(input_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return {"input_ids": input_ids, "labels": labels}


def pack_examples(examples: list[dict], block_size: int) -> list[dict]:
    """Concatenate tokenized examples into `block_size` blocks with per-document position ids."""
    blocks: list[dict] = []
    current = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        # The first token of a document is never a target: in a packed block it would be
        # predicted from the previous document's last token.
        ids, labels = example["input_ids"], [IGNORE_INDEX, *example["labels"][1:]]
        position = 0
        while ids:
            room = block_size - len(current["input_ids"])
            take = min(room, len(ids))
            current["input_ids"] += ids[:take]
            current["labels"] += labels[:take]
            current["position_ids"] += list(range(position, position + take))
            ids, labels, position = ids[take:], labels[take:], 0  # a split document restarts in the next block
            if len(current["input_ids"]) == block_size:
                blocks.append(current)
                current = {"input_ids": [], "labels": [], "position_ids": []}
    if current["input_ids"]:
        blocks.append(current)
    return blocks


@dataclass
class PackedCollator:
    """Pads packed blocks; padding becomes its own masked-out "document" (position ids from 0)."""

    pad_token_id: int
    pad_to: int | None = None

    def __call__(self, features: list[dict]) -> dict:
        length = self.pad_to or max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "labels": [], "position_ids": []}
        for feature in features:
            missing = length - len(feature["input_ids"])
            batch["input_ids"].append(list(feature["input_ids"]) + [self.pad_token_id] * missing)
            batch["labels"].append(list(feature["labels"]) + [IGNORE_INDEX] * missing)
            batch["position_ids"].append(list(feature["position_ids"]) + list(range(missing)))
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
