"""Tests for rlhf/sft_data.py: completion-only labels, EOS, truncation, packing that keeps documents apart."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.modeling import load_tokenizer
from rlhf.sft_data import IGNORE_INDEX, PackedCollator, pack_examples, tokenize_example

PROMPTS = [
    "<s><|user|>\nWhat is Mars?\n<|assistant|>\n",
    "<s><|user|>\nName a colour, please.\n<|assistant|>\n",
    "<s><|system|>\nYou are a helpful assistant.\n<|user|>\nSay something about volcanoes.\n<|assistant|>\n",
    "<s><|user|>\nHi\n<|assistant|>\n",
    "<s><|user|>\nWhat is the capital of France?\n<|assistant|>\n",
]
ANSWERS = [
    "Mars is a planet.",
    "Blue is a colour, and so is green.",
    "A volcano is an opening in the ground where hot lava can come out.",
    "Hello!",
    "The capital of France is Paris.",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.eval()
    # As in training: transformers' Trainer sets config.use_cache = TrainingArguments.use_cache (False),
    # see test_trainer_switches_kv_cache_off. With a KV cache, transformers skips its packed-sequence
    # masking and packed documents WOULD attend to each other.
    model.config.use_cache = False
    return model


def tok(prompt, answer, tokenizer, max_seq_length=512, max_source_length=384, train_on_inputs=False):
    return tokenize_example(prompt, answer, tokenizer, max_seq_length, max_source_length, train_on_inputs)


def examples(tokenizer, train_on_inputs=False):
    return [tok(p, a, tokenizer, train_on_inputs=train_on_inputs) for p, a in zip(PROMPTS, ANSWERS)]


# ---------------------------------------------------------------- one example


def test_prompt_masked_answer_kept_eos_appended(tokenizer):
    prompt_ids = tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(ANSWERS[0], add_special_tokens=False)["input_ids"]
    example = tok(PROMPTS[0], ANSWERS[0], tokenizer)
    assert example["input_ids"] == prompt_ids + answer_ids + [tokenizer.eos_token_id]
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [tokenizer.eos_token_id]
    assert all(label != IGNORE_INDEX for label in example["labels"][len(prompt_ids):])


def test_train_on_inputs_keeps_prompt_labels(tokenizer):
    example = tok(PROMPTS[2], ANSWERS[2], tokenizer, train_on_inputs=True)
    assert example["labels"] == example["input_ids"]
    assert IGNORE_INDEX not in example["labels"]


def test_truncated_answer_has_no_eos(tokenizer):
    prompt_ids = tokenizer(PROMPTS[2], add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(ANSWERS[2], add_special_tokens=False)["input_ids"]
    limit = len(prompt_ids) + 5
    assert len(answer_ids) > 5
    example = tok(PROMPTS[2], ANSWERS[2], tokenizer, max_seq_length=limit, max_source_length=limit - 1)
    assert len(example["input_ids"]) == limit
    assert example["input_ids"] == prompt_ids + answer_ids[:5]
    assert tokenizer.eos_token_id not in example["input_ids"][len(prompt_ids):]


def test_answer_that_just_fits_gets_eos(tokenizer):
    prompt_ids = tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(ANSWERS[0], add_special_tokens=False)["input_ids"]
    limit = len(prompt_ids) + len(answer_ids) + 1
    example = tok(PROMPTS[0], ANSWERS[0], tokenizer, max_seq_length=limit, max_source_length=limit - 1)
    assert example["input_ids"][-1] == tokenizer.eos_token_id and len(example["input_ids"]) == limit


def test_long_prompt_keeps_its_end(tokenizer):
    prompt = "<s><|user|>\n" + "Tell me a long story about many things. " * 20 + "\n<|assistant|>\n"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert len(prompt_ids) > 40
    example = tok(prompt, "Once upon a time.", tokenizer, max_seq_length=64, max_source_length=16)
    masked = [i for i, label in enumerate(example["labels"]) if label == IGNORE_INDEX]
    assert masked == list(range(16))
    assert example["input_ids"][:16] == prompt_ids[-16:]  # the end of the prompt (assistant marker) survives
    assert tokenizer.decode(example["input_ids"][:16]).endswith("<|assistant|>\n")


def test_empty_prompt_text_format(tokenizer):
    example = tokenize_example("", "Just text.", tokenizer, 64, 32, False)
    answer_ids = tokenizer("Just text.", add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == answer_ids + [tokenizer.eos_token_id]
    assert example["labels"] == example["input_ids"]


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("block_size", [7, 16, 33, 64])
def test_packing_fills_blocks_and_conserves_tokens(tokenizer, block_size):
    docs = examples(tokenizer) * 3
    blocks = pack_examples(docs, block_size)
    assert all(len(b["input_ids"]) == block_size for b in blocks[:-1])
    assert 0 < len(blocks[-1]["input_ids"]) <= block_size
    for block in blocks:
        assert len(block["labels"]) == len(block["input_ids"]) == len(block["position_ids"])
    flat_ids = [t for b in blocks for t in b["input_ids"]]
    assert flat_ids == [t for d in docs for t in d["input_ids"]]  # order kept, nothing lost
    total = sum(len(d["input_ids"]) for d in docs)
    assert len(blocks) == -(-total // block_size)


def test_position_ids_restart_at_each_document(tokenizer):
    docs = examples(tokenizer)
    lengths = [len(d["input_ids"]) for d in docs]
    block_size = sum(lengths) + 3  # one block holds everything
    (block,) = pack_examples(docs, block_size)
    expected = [p for n in lengths for p in range(n)]
    assert block["position_ids"] == expected
    # a document split across blocks restarts at 0 in the next block
    blocks = pack_examples(docs[:1], lengths[0] - 3)
    assert blocks[1]["position_ids"] == [0, 1, 2]


def test_packed_labels_never_cross_documents(tokenizer):
    docs = examples(tokenizer, train_on_inputs=True)
    (block,) = pack_examples(docs, 10_000)
    starts = [i for i, p in enumerate(block["position_ids"]) if p == 0]
    assert len(starts) == len(docs)
    assert all(block["labels"][i] == IGNORE_INDEX for i in starts)
    # every other label is the document's own
    flat = [label for d in docs for label in d["labels"][1:]]
    assert [label for i, label in enumerate(block["labels"]) if i not in starts] == flat


def _block_of_whole_documents(tokenizer, train_on_inputs=False):
    docs = examples(tokenizer, train_on_inputs)
    block_size = sum(len(d["input_ids"]) for d in docs[:3])
    blocks = pack_examples(docs, block_size)
    return docs, blocks


def test_packed_documents_do_not_attend_to_each_other(tokenizer, model):
    """The logits of each document inside a packed block equal its logits when run alone."""
    docs, blocks = _block_of_whole_documents(tokenizer)
    block = blocks[0]
    with torch.no_grad():
        packed = model(
            input_ids=torch.tensor([block["input_ids"]]), position_ids=torch.tensor([block["position_ids"]])
        ).logits[0]
        start = 0
        for doc in docs[:3]:
            n = len(doc["input_ids"])
            alone = model(input_ids=torch.tensor([doc["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[start : start + n], alone, atol=1e-4, rtol=1e-4)
            start += n
        assert start == len(block["input_ids"])
        # negative control: without position ids the later documents DO see the earlier ones
        leaky = model(input_ids=torch.tensor([block["input_ids"]])).logits[0]
        second = slice(len(docs[0]["input_ids"]), len(docs[0]["input_ids"]) + len(docs[1]["input_ids"]))
        assert not torch.allclose(leaky[second], packed[second], atol=1e-4)


def test_packed_batch_with_padding_keeps_documents_apart(tokenizer, model):
    docs, blocks = _block_of_whole_documents(tokenizer)
    assert len(blocks) == 2 and len(blocks[1]["input_ids"]) < len(blocks[0]["input_ids"])
    batch = PackedCollator(tokenizer.pad_token_id)(blocks)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        start = 0
        for doc in docs[3:]:  # the documents of the second, padded block
            n = len(doc["input_ids"])
            alone = model(input_ids=torch.tensor([doc["input_ids"]])).logits[0]
            torch.testing.assert_close(logits[1, start : start + n], alone, atol=1e-4, rtol=1e-4)
            start += n


def test_packed_loss_equals_per_document_losses(tokenizer, model):
    """Summed token loss of a packed block = sum over its documents run alone (train_on_inputs)."""
    docs, blocks = _block_of_whole_documents(tokenizer, train_on_inputs=True)
    block = blocks[0]
    with torch.no_grad():
        packed = model(
            input_ids=torch.tensor([block["input_ids"]]),
            position_ids=torch.tensor([block["position_ids"]]),
            labels=torch.tensor([block["labels"]]),
        ).loss
        packed_targets = sum(1 for label in block["labels"][1:] if label != IGNORE_INDEX)
        total, targets = 0.0, 0
        for doc in docs[:3]:
            out = model(input_ids=torch.tensor([doc["input_ids"]]), labels=torch.tensor([doc["labels"]]))
            n = len(doc["labels"]) - 1
            total += out.loss.item() * n
            targets += n
    assert packed_targets == targets
    assert packed.item() * packed_targets == pytest.approx(total, rel=1e-4)


def test_packed_collator_pads(tokenizer):
    features = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8], "position_ids": [0, 1, 0, 1]},
        {"input_ids": [9, 10], "labels": [-100, 10], "position_ids": [0, 1]},
    ]
    batch = PackedCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, 8], [-100, 10, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert "attention_mask" not in batch  # a mask would switch off the packed-sequence masking
    fixed = PackedCollator(pad_token_id=0, pad_to=6)(features)
    assert fixed["input_ids"].shape == (2, 6)
    assert fixed["position_ids"].tolist()[1] == [0, 1, 0, 1, 2, 3]
    assert fixed["labels"].tolist()[0][4:] == [-100, -100]


def test_trainer_switches_kv_cache_off(tiny_model_dir, tmp_path):
    """Packing relies on this: transformers only derives the per-document mask without a KV cache."""
    from transformers import Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert model.config.use_cache is True
    Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    assert model.config.use_cache is False
