"""Tests for rlhf/arguments.py: config files, legacy flags, token handling, the reference SFT command."""

from __future__ import annotations

import json
import logging
import os

import pytest
import transformers
import yaml

from finetune_clm import FinetuneArguments
from rlhf.arguments import normalise_argv, parse_stage_args, public_dict
from rlhf.backend import BackendArguments
from rlhf.data import DataArguments
from rlhf.errors import UserError
from rlhf.modeling import LoraArguments, ModelArguments
from rlhf.training import RunArguments

SFT_TYPES = (ModelArguments, DataArguments, FinetuneArguments, LoraArguments, RunArguments)
SECRET = "hf_SECRETtoken1234567890"


@pytest.fixture(autouse=True)
def _clean_token_env(monkeypatch):
    """Parsing writes HF_TOKEN into os.environ; restore the environment after each test."""
    monkeypatch.delenv("HF_TOKEN", raising=False)


def parse_sft(argv: list[str]):
    return parse_stage_args(SFT_TYPES, True, argv)


def test_plain_flags_and_training_args_class(tmp_path):
    parsed = parse_sft(["--model_name_or_path", "m", "--output_dir", str(tmp_path), "--max_seq_length", "64",
                        "--lora_rank", "4", "--overwrite_output_dir"])
    model_args, data_args, ft_args, lora_args, run_args, training_args = parsed.values
    assert model_args.model_name_or_path == "m"
    assert ft_args.max_seq_length == 64 and lora_args.lora_rank == 4 and run_args.overwrite_output_dir
    assert type(training_args) is transformers.TrainingArguments
    assert parsed.trainer_class is transformers.Trainer
    assert parsed.backend.device == "cpu"
    assert training_args.output_dir == str(tmp_path)


@pytest.mark.parametrize("style", ["yaml_positional", "yml_flag", "json_positional", "json_flag"])
def test_config_file_then_flags_override(style, tmp_path):
    config = {
        "model_name_or_path": "from-file",
        "output_dir": str(tmp_path / "out"),
        "learning_rate": 0.5,
        "max_seq_length": 128,
        "do_train": True,
        "lora_target_modules": ["q_proj", "v_proj"],
    }
    suffix = ".json" if style.startswith("json") else (".yml" if style == "yml_flag" else ".yaml")
    path = tmp_path / f"sft{suffix}"
    path.write_text(json.dumps(config) if suffix == ".json" else yaml.safe_dump(config))
    later = ["--learning_rate", "0.25"]
    argv = [str(path), *later] if style.endswith("positional") else ["--config", str(path), *later]
    model_args, _, ft_args, lora_args, _, training_args = parse_sft(argv).values
    assert model_args.model_name_or_path == "from-file"
    assert ft_args.max_seq_length == 128
    assert lora_args.lora_target_modules == ["q_proj", "v_proj"]
    assert training_args.do_train is True
    assert training_args.learning_rate == 0.25  # the later flag wins over the file


def test_bad_config_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        parse_sft([str(tmp_path / "missing.yaml")])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(UserError, match="cannot be parsed"):
        parse_sft([str(broken)])
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping"):
        parse_sft([str(listing)])
    with pytest.raises(UserError, match="--config needs"):
        parse_sft(["--config"])


@pytest.mark.parametrize("spelling", [["--evaluation_strategy", "no"], ["--evaluation_strategy=steps"]])
def test_evaluation_strategy_maps_to_eval_strategy(spelling, tmp_path):
    training_args = parse_sft(["--output_dir", str(tmp_path), *spelling, "--eval_steps", "5"]).values[-1]
    expected = spelling[-1].split("=")[-1]
    assert str(training_args.eval_strategy.value if hasattr(training_args.eval_strategy, "value")
               else training_args.eval_strategy) == expected


def test_use_auth_token_true_is_accepted(tmp_path):
    parsed = parse_sft(["--output_dir", str(tmp_path), "--use_auth_token", "True", "--do_train"])
    assert parsed.values[-1].do_train
    assert "HF_TOKEN" not in os.environ  # "True" is not a token


def test_use_auth_token_as_last_bare_flag(tmp_path):
    parsed = parse_sft(["--output_dir", str(tmp_path), "--use_auth_token"])
    assert parsed.values[-1].output_dir == str(tmp_path)


@pytest.mark.parametrize("form", ["separate", "equals"])
def test_hf_access_token_goes_to_env_and_nowhere_else(form, tmp_path, caplog):
    token_args = ["--hf_access_token", SECRET] if form == "separate" else [f"--hf_access_token={SECRET}"]
    argv = ["--model_name_or_path", "m", "--output_dir", str(tmp_path), *token_args, "--do_train"]
    cleaned = normalise_argv(list(argv))
    assert SECRET not in " ".join(cleaned) and "--hf_access_token" not in " ".join(cleaned)
    os.environ.pop("HF_TOKEN", None)

    with caplog.at_level(logging.DEBUG):
        parsed = parse_sft(argv)
    assert os.environ["HF_TOKEN"] == SECRET
    for value in parsed.values:
        assert SECRET not in json.dumps(public_dict(value), default=str)
        assert SECRET not in repr(value)
    assert SECRET not in caplog.text


def test_public_dict_drops_token_fields():
    data = public_dict({"hub_token": SECRET, "token": SECRET, "pad_token": "<pad>", "lr": 1})
    assert data == {"pad_token": "<pad>", "lr": 1}


def test_backend_arguments_returned_only_when_asked(tmp_path):
    parsed = parse_stage_args((ModelArguments, BackendArguments), False, ["--device", "cpu"])
    assert isinstance(parsed.values[1], BackendArguments) and parsed.values[1].device == "cpu"
    assert parsed.trainer_class is None
    parsed = parse_stage_args((ModelArguments,), False, ["--device", "cpu"])
    assert len(parsed.values) == 1


def test_hpu_flags_fail_before_parsing_on_this_machine(tmp_path):
    with pytest.raises(UserError, match="Gaudi"):
        parse_sft(["--output_dir", str(tmp_path), "--device", "hpu", "--use_habana", "--use_lazy_mode"])


REFERENCE_SFT = (
    "--model_name_or_path meta-llama/Llama-2-7b-chat-hf --bf16 True --dataset_name Intel/orca_dpo_pairs "
    "--dataset_concatenation --per_device_train_batch_size 2 --gradient_accumulation_steps 4 "
    "--learning_rate 1e-4 --num_train_epochs 3 --save_strategy steps --save_steps 2000 --save_total_limit 1 "
    "--logging_steps 1 --do_train --overwrite_output_dir --log_level info --output_dir {out} --peft lora "
    "--use_fast_tokenizer false"
)


def test_reference_sft_command_parses(tmp_path):
    """The reference command's flags, unchanged (bf16 included: TrainingArguments accepts it on CPU)."""
    argv = REFERENCE_SFT.format(out=tmp_path / "llama2_7b_se").split()
    model_args, data_args, ft_args, lora_args, run_args, training_args = parse_sft(argv).values
    assert model_args.model_name_or_path == "meta-llama/Llama-2-7b-chat-hf"
    assert model_args.use_fast_tokenizer is False
    assert data_args.dataset_name == "Intel/orca_dpo_pairs"
    assert ft_args.dataset_concatenation is True
    assert lora_args.peft == "lora"
    assert run_args.overwrite_output_dir is True
    assert training_args.bf16 is True
    assert training_args.per_device_train_batch_size == 2
    assert training_args.gradient_accumulation_steps == 4
    assert training_args.learning_rate == pytest.approx(1e-4)
    assert training_args.num_train_epochs == 3
    assert str(getattr(training_args.save_strategy, "value", training_args.save_strategy)) == "steps"
    assert training_args.save_steps == 2000 and training_args.save_total_limit == 1
    assert training_args.logging_steps == 1 and training_args.do_train
    assert training_args.log_level == "info"
    assert training_args.output_dir.endswith("llama2_7b_se")


def test_unknown_flag_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--no_such_flag") as error:
        parse_sft(["--output_dir", str(tmp_path), "--no_such_flag", "1"])
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- config files read exactly (issue 26)


def write_yaml(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_config_key_must_be_an_exact_field_name(tmp_path):
    """argparse would take `learning_rat` as an abbreviation of --learning_rate; a config file may not."""
    path = write_yaml(tmp_path, f"output_dir: {tmp_path}\nlearning_rat: 0.001\n")
    with pytest.raises(UserError) as error:
        parse_sft([path])
    message = str(error.value)
    assert "'learning_rat'" in message and "did you mean 'learning_rate'" in message and "\n" not in message


def test_config_key_far_from_every_field_names_no_guess(tmp_path):
    path = write_yaml(tmp_path, f"output_dir: {tmp_path}\nzzzqqq: 1\n")
    with pytest.raises(UserError, match="unknown key 'zzzqqq'.*see --help"):
        parse_sft([path])


def test_config_null_means_the_field_default(tmp_path):
    path = write_yaml(tmp_path, f"output_dir: {tmp_path}\ntokenizer_name: null\nmax_seq_length: ~\n"
                                "lora_target_modules: null\n")
    model_args, _, ft_args, lora_args, _, _ = parse_sft([path]).values
    assert model_args.tokenizer_name is None  # not the string "None"
    assert ft_args.max_seq_length == FinetuneArguments().max_seq_length
    assert lora_args.lora_target_modules is None


def test_config_legacy_and_token_keys_still_accepted(tmp_path):
    path = write_yaml(tmp_path, f"output_dir: {tmp_path}\nevaluation_strategy: 'no'\nhf_access_token: {SECRET}\n")
    parse_sft([path])
    assert os.environ["HF_TOKEN"] == SECRET


def test_config_takes_a_fields_aliases_too(tmp_path):
    """--lora_r (the reference's name for --lora_rank) is a flag, so it is a config key as well."""
    path = write_yaml(tmp_path, f"output_dir: {tmp_path}\nlora_r: 4\n")
    lora_args = parse_sft([path]).values[3]
    assert lora_args.lora_rank == 4


@pytest.mark.parametrize("text, line, column", [
    ("output_dir: x\nlearning_rate: [1\n", 3, 1),
    ("output_dir: x\n  bad: indent\n", 2, 6),
])
def test_yaml_syntax_error_is_one_line_with_line_and_column(text, line, column, tmp_path):
    with pytest.raises(UserError) as error:
        parse_sft([write_yaml(tmp_path, text)])
    message = str(error.value)
    assert "\n" not in message and f"line {line}, column {column}" in message, message


def test_json_syntax_error_has_line_and_column(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "output_dir": "x",\n  "learning_rate" 1\n}\n')
    with pytest.raises(UserError) as error:
        parse_sft([str(path)])
    assert "line 3, column 19" in str(error.value) and "\n" not in str(error.value)


def test_empty_config_file_sets_nothing(tmp_path):
    path = write_yaml(tmp_path, "")
    training_args = parse_sft([path, "--output_dir", str(tmp_path)]).values[-1]
    assert training_args.output_dir == str(tmp_path)


# ---------------------------------------------------------------- what trackers see (issue 26)


@pytest.mark.parametrize("flag", ["--hf_access_token", "--use_auth_token", "--token", "--hub_token"])
def test_parsing_takes_the_token_out_of_sys_argv(flag, tmp_path, monkeypatch):
    """wandb (and anything else recording the command line) reads sys.argv: no token may be left there."""
    argv = ["finetune_clm.py", "--output_dir", str(tmp_path), flag, SECRET, f"{flag}={SECRET}", "--do_train"]
    monkeypatch.setattr("sys.argv", list(argv))
    import sys

    training_args = parse_sft(sys.argv[1:]).values[-1]
    assert SECRET not in " ".join(sys.argv) and flag not in sys.argv
    assert sys.argv == ["finetune_clm.py", "--output_dir", str(tmp_path), "--do_train"]
    assert os.environ["HF_TOKEN"] == SECRET
    assert training_args.hub_token is None  # so training_args.bin cannot hold it


@pytest.mark.parametrize("argv, fragment", [
    (["--loss_type", "foo"], "invalid choice: 'foo' (choose from 'dapo'"),
    (["--batch_size", "eight"], "invalid int value: 'eight'"),
    (["--device", "tpu"], "--device"),
])
def test_a_flag_value_argparse_refuses_is_one_line(argv, fragment, capsys):
    from rlhf.ppo import PPOConfig

    with pytest.raises(UserError, match="see --help") as raised:
        parse_stage_args((PPOConfig,), False, [*argv, "--device", "cpu"] if argv[0] != "--device" else argv)
    assert fragment in str(raised.value) and "\n" not in str(raised.value)
    assert "usage:" not in capsys.readouterr().err
