"""Tests for rlhf/validation.py: the argument checks made before any model loads (issue 26)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from rlhf.errors import UserError
from rlhf.modeling import DEFAULT_TARGETS, LoraArguments
from rlhf.validation import check_lora, check_lora_targets, check_validation_split, module_names


@pytest.fixture(scope="module")
def gpt2_model_dir(tmp_path_factory, tiny_model_dir) -> str:
    """A tiny GPT-2 (Conv1D layers c_attn, c_proj, c_fc) with the tiny tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("gpt2") / "model"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=512, n_positions=64, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(folder)
    for tokenizer_file in Path(tiny_model_dir).glob("tokenizer*"):
        shutil.copy(tokenizer_file, folder)
    return str(folder)


@pytest.mark.parametrize("rank, alpha, dropout, fragment", [
    (0, 16, 0.0, "--lora_rank 0 must be a positive integer"),
    (-2, 16, 0.0, "--lora_rank -2"),
    (8, 0, 0.0, "--lora_alpha 0 must be positive"),
    (8, 16, 1.0, "--lora_dropout 1.0 is out of range"),
])
def test_check_lora_refuses_what_peft_would_raise_on(rank, alpha, dropout, fragment):
    with pytest.raises(UserError) as error:
        check_lora(rank, alpha, dropout)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_check_lora_names_the_stage_flag():
    with pytest.raises(UserError, match="--lora_r 0 .*--lora_r 8"):
        check_lora(0, 32, 0.05, rank_flag="--lora_r")
    check_lora(1, 1, 0.0)  # the smallest valid settings pass


def test_module_names_reads_the_config_only(gpt2_model_dir, tiny_model_dir):
    names, linear, model_type = module_names(gpt2_model_dir)
    assert model_type == "gpt2" and linear == ["c_attn", "c_fc", "c_proj"]
    assert "lm_head" not in linear and any(n.endswith("attn.c_attn") for n in names)
    _, linear, model_type = module_names(tiny_model_dir)
    assert set(DEFAULT_TARGETS) <= set(linear) and model_type == "llama"


def test_gpt2_under_the_default_targets_is_refused_naming_its_modules(gpt2_model_dir):
    with pytest.raises(UserError) as error:
        check_lora_targets(gpt2_model_dir, None, DEFAULT_TARGETS)
    message = str(error.value)
    assert "(the default)" in message and "gpt2" in message and "\n" not in message
    assert "--lora_target_modules c_attn c_fc c_proj" in message and "--lora_all_linear" in message


def test_targets_matching_the_model_pass_and_partial_ones_warn(gpt2_model_dir, tiny_model_dir, caplog):
    check_lora_targets(gpt2_model_dir, ["c_attn"], DEFAULT_TARGETS)
    check_lora_targets(tiny_model_dir, None, DEFAULT_TARGETS)
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        check_lora_targets(tiny_model_dir, ["q_proj", "no_such_proj"], DEFAULT_TARGETS)
    assert "no_such_proj match no module" in caplog.text
    with pytest.raises(UserError, match="--lora_target_modules typo_proj match no module"):
        check_lora_targets(tiny_model_dir, ["typo_proj"], DEFAULT_TARGETS)


def test_lora_arguments_check_targets_skips_all_linear_and_none(gpt2_model_dir):
    LoraArguments(lora_all_linear=True).check_targets(gpt2_model_dir)
    LoraArguments(peft="none").check_targets(gpt2_model_dir)
    with pytest.raises(UserError, match="c_attn"):
        LoraArguments().check_targets(gpt2_model_dir)


def test_unloadable_model_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load"):
        module_names(str(tmp_path / "not_there"))


@pytest.mark.parametrize("rows, percentage, ok", [
    (1, 2, False), (1, 50, False), (2, 50, True), (2, 99, False), (50, 2, True), (100, 99, True), (1, 0, True),
])
def test_validation_split_leaves_a_training_row(rows, percentage, ok):
    """As datasets counts: held out = ceil(rows * p / 100), the rest trains (and must be >= 1)."""
    if ok:
        check_validation_split(rows, percentage, "train.jsonl")
        if percentage:
            from datasets import Dataset

            split = Dataset.from_dict({"x": list(range(rows))}).train_test_split(test_size=percentage / 100, seed=0)
            assert len(split["train"]) >= 1  # datasets agrees
        return
    with pytest.raises(UserError) as error:
        check_validation_split(rows, percentage, "train.jsonl")
    assert f"--validation_split_percentage {percentage}" in str(error.value) and "--validation_file" in str(error.value)
    from datasets import Dataset

    with pytest.raises(ValueError):  # what the check stands in front of
        Dataset.from_dict({"x": list(range(rows))}).train_test_split(test_size=percentage / 100, seed=0)
