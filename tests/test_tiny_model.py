"""Tests for rlhf/tiny_model.py: the offline tiny Llama + BPE tokenizer builder."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

from rlhf.errors import UserError
from rlhf.tiny_model import CHAT_TEMPLATE, build_tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Tell me something about Mars."},
]


def _digest(path: str) -> dict[str, str]:
    return {
        name: hashlib.sha256(open(os.path.join(path, name), "rb").read()).hexdigest()
        for name in sorted(os.listdir(path))
    }


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), seed=0)


def test_loads_with_auto_classes(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert config.intermediate_size == 128 and config.max_position_embeddings == 1024
    assert config.tie_word_embeddings is False
    assert config.vocab_size == len(tokenizer) <= 512
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    generation = model.generation_config
    assert (generation.pad_token_id, generation.bos_token_id, generation.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert os.path.exists(os.path.join(tiny_dir, "model.safetensors"))

    batch = tokenizer(["Happy to help!", "Mars"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)

    reward = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1)
    with torch.no_grad():
        logits = reward(**batch).logits
    assert logits.shape == (2, 1) and torch.isfinite(logits).all()


def test_special_tokens_distinct_and_not_added_automatically(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokens = (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token)
    assert tokens == ("<pad>", "<s>", "</s>", "<unk>")
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    assert len(set(ids)) == 4 and tokenizer.unk_token_id not in ids[:3]
    # Plain text gets no bos/eos; text round-trips.
    encoded = tokenizer("Thanks for asking! Mars is red.")["input_ids"]
    assert set(encoded).isdisjoint(ids)
    assert tokenizer.decode(encoded) == "Thanks for asking! Mars is red."
    # Role markers are single tokens.
    assert len(tokenizer("<|assistant|>")["input_ids"]) == 1


def test_chat_template(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<s><|system|>\nYou are a helpful assistant.\n<|user|>\nTell me something about Mars.\n"
        "<|assistant|>\n"
    )
    assert prompt.endswith("<|assistant|>\n")
    without = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=False)
    assert not without.endswith("<|assistant|>\n")
    full = tokenizer.apply_chat_template(
        MESSAGES + [{"role": "assistant", "content": "Happy to help! Mars is red."}], tokenize=False
    )
    assert full == prompt + "Happy to help! Mars is red.</s>"
    ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert ids["input_ids"][0] == tokenizer.bos_token_id
    assert ids["input_ids"].count(tokenizer.bos_token_id) == 1
    with pytest.raises(Exception, match="Unknown role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_files_for_transformers_455(tiny_dir):
    """The Gaudi stack (transformers 4.55) reads tokenizer.json and tokenizer_config.json."""
    with open(os.path.join(tiny_dir, "tokenizer_config.json")) as handle:
        config = json.load(handle)
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == CHAT_TEMPLATE
    assert (config["pad_token"], config["bos_token"], config["eos_token"], config["unk_token"]) == (
        "<pad>", "<s>", "</s>", "<unk>")
    assert not isinstance(config.get("extra_special_tokens", {}), list)
    raw = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tiny_dir, "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(tiny_dir)
    text = "Good question! Jupiter is the largest planet."
    assert raw(text)["input_ids"] == auto(text)["input_ids"]
    assert raw.convert_tokens_to_ids("</s>") == auto.eos_token_id


def test_deterministic_for_seed(tiny_dir, tmp_path):
    same = build_tiny_model(str(tmp_path / "same"), seed=0)
    assert _digest(same) == _digest(tiny_dir)
    other = build_tiny_model(str(tmp_path / "other"), seed=1)
    digests = _digest(other)
    assert digests["model.safetensors"] != _digest(tiny_dir)["model.safetensors"]
    assert digests["tokenizer.json"] == _digest(tiny_dir)["tokenizer.json"]


def test_bad_sizes_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="hidden_size"):
        build_tiny_model(str(tmp_path / "m"), hidden_size=30)
    with pytest.raises(UserError, match="vocab_size"):
        build_tiny_model(str(tmp_path / "m"), vocab_size=100)


def test_cli(tmp_path):
    out = tmp_path / "cli"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, "-m", "rlhf.tiny_model", "--output_dir", str(out), "--seed", "3",
         "--hidden_size", "32", "--num_layers", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (32, 1)
    bad = subprocess.run(
        [sys.executable, "-m", "rlhf.tiny_model", "--output_dir", str(tmp_path / "bad"), "--hidden_size", "30"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 2 and "hidden_size" in bad.stderr and "Traceback" not in bad.stderr
