"""rlhf/modeling.py on the tiny model, in-process: LoRA merging (the one ``merge_lora``) and the loaders'
one-line errors for every broken piece of a model / tokenizer directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rlhf.errors import UserError
from rlhf.modeling import (
    LoraArguments,
    ModelArguments,
    check_model_path,
    fold_lm_head_input,
    load_causal_lm,
    load_model_tokenizer,
    load_pretrained,
    load_sequence_classifier,
    load_tokenizer,
    lora_config,
    merge_lora,
)


def nudge_adapter(model) -> None:
    """LoRA's B starts at zero (the adapter is a no-op): give it weights so merging changes the model."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)


def test_merge_lora_returns_plain_model_with_the_adapters_outputs(tiny_model_dir):
    from peft import PeftModel, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(tiny_model_dir), lora_config(LoraArguments(), "CAUSAL_LM")).eval()
    nudge_adapter(model)
    batch = torch.tensor([[1, 10, 20, 30, 40]])
    with torch.no_grad():
        expected = model(batch).logits
        base = model.get_base_model()
        with model.disable_adapter():
            without = model(batch).logits
    assert not torch.allclose(expected, without, atol=1e-3)  # the adapter matters
    merged = merge_lora(model)
    assert not isinstance(merged, PeftModel) and type(merged).__name__ == "LlamaForCausalLM"
    assert merged is base
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(batch).logits, expected, atol=1e-4, rtol=1e-4)


def test_merge_lora_keeps_the_trained_score_head(tiny_model_dir):
    from peft import get_peft_model

    tokenizer = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    model = get_peft_model(load_sequence_classifier(tiny_model_dir, tokenizer), lora_config(LoraArguments(), "SEQ_CLS"))
    nudge_adapter(model)
    with torch.no_grad():  # the score head is trained in full (modules_to_save): change its copy only
        trained = model.base_model.model.score.modules_to_save["default"].weight
        trained.add_(1.0)
        expected_head = trained.clone()
    merged = merge_lora(model)
    assert torch.equal(merged.score.weight, expected_head)


def test_merge_lora_leaves_other_models_alone(tiny_model_dir):
    model = load_causal_lm(tiny_model_dir)
    assert merge_lora(model) is model
    module = torch.nn.Linear(2, 2)
    assert merge_lora(module) is module


# ---------------------------------------------------------------- broken model and tokenizer directories
# Each piece missing or of the wrong kind ends as one UserError line naming the directory or file and the
# fix (run_cli: exit 2), raised by the loaders the stages call; anything else still propagates.

def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


MODEL_DIR_CASES = {
    # name: (how to break a copy of the tiny model, fragment of the error line)
    "no_config": (lambda d: (d / "config.json").unlink(), "directory has no config.json"),
    "config_not_json": (lambda d: (d / "config.json").write_text("{'model_type': llama"),
                        "config.json is not valid JSON (line 1"),
    "config_not_object": (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json holds a list"),
    "config_no_model_type": (lambda d: edit_config(d, model_type=None), "config.json has no model_type"),
    "config_unknown_model_type": (lambda d: edit_config(d, model_type="nosuchmodel"),
                                  "model type 'nosuchmodel' is unknown to transformers"),
    "config_wrong_value_type": (lambda d: edit_config(d, hidden_size="big"), "'hidden_size'"),
    "no_weights": (lambda d: (d / "model.safetensors").unlink(), "no weight files (model.safetensors"),
    "weights_garbage": (lambda d: (d / "model.safetensors").write_bytes(b"not safetensors" * 8),
                        "the model cannot be loaded (Error while deserializing header"),
    "weights_truncated": (lambda d: truncate(d / "model.safetensors", 4096),
                          "the model cannot be loaded (Error while deserializing header"),
    "weights_not_a_state_dict": (lambda d: ((d / "model.safetensors").unlink(),
                                            (d / "pytorch_model.bin").write_bytes(b"\x80\x04garbage")),
                                 "the model cannot be loaded ("),
    "weights_do_not_fit_config": (lambda d: edit_config(d, intermediate_size=40),
                                  "its weights do not fit its config.json (size mismatch)"),
    "a_file_not_a_directory": (None, "is a file; give the model's directory"),
}
TOKENIZER_CASES = {
    "no_tokenizer_files": (lambda d: [(d / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
                           "has no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)"),
    "tokenizer_config_only": (lambda d: (d / "tokenizer.json").unlink(),
                              "has tokenizer_config.json but no vocabulary file"),
    "tokenizer_json_corrupt": (lambda d: truncate(d / "tokenizer.json", 100), "tokenizer.json is not valid JSON"),
    "tokenizer_config_corrupt": (lambda d: (d / "tokenizer_config.json").write_text(""),
                                 "tokenizer_config.json is not valid JSON"),
    "tokenizer_config_not_utf8": (lambda d: (d / "tokenizer_config.json").write_bytes(b'{"x": "\xe9"}'),
                                  "tokenizer_config.json is not UTF-8 text"),
}
# config problems are found before anything loads, so every loader reports them the same way
CONFIG_CASES = [name for name in MODEL_DIR_CASES if name.startswith("config") or name in ("no_config", "no_weights",
                                                                                           "a_file_not_a_directory")]
WEIGHT_CASES = [name for name in MODEL_DIR_CASES if name not in CONFIG_CASES]


@pytest.fixture
def broken_copy(tiny_model_dir, tmp_path):
    def make(cases: dict, name: str) -> Path:
        folder = tmp_path / name
        breaker = cases[name][0]
        if breaker is None:  # a file where the directory should be
            folder.write_text("a model? no")
            return folder
        shutil.copytree(tiny_model_dir, folder)
        breaker(folder)
        return folder

    return make


def load_with(loader: str, folder: Path):
    path = check_model_path(str(folder), "--model_name_or_path")
    if loader == "tokenizer":
        return load_model_tokenizer(ModelArguments(model_name_or_path=path), path)
    if loader == "causal_lm":
        return load_causal_lm(path, flag="--model_name_or_path")
    return load_sequence_classifier(path, load_tokenizer(path), flag="--model_name_or_path")


def assert_user_error_line(error: pytest.ExceptionInfo, folder: Path, fragment: str) -> str:
    message = str(error.value)
    assert "\n" not in message and fragment in message, message
    assert str(folder) in message, message
    return message


@pytest.mark.parametrize("loader", ["tokenizer", "causal_lm"])
@pytest.mark.parametrize("case", CONFIG_CASES)
def test_broken_model_config_is_one_line_user_error(case, loader, broken_copy):
    folder = broken_copy(MODEL_DIR_CASES, case)
    with pytest.raises(UserError) as error:
        load_with(loader, folder)
    assert_user_error_line(error, folder, MODEL_DIR_CASES[case][1])


@pytest.mark.parametrize("loader", ["causal_lm", "sequence_classifier"])
@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_broken_model_weights_are_one_line_user_error(case, loader, broken_copy):
    folder = broken_copy(MODEL_DIR_CASES, case)
    with pytest.raises(UserError) as error:
        load_with(loader, folder)
    assert_user_error_line(error, folder, MODEL_DIR_CASES[case][1])
    assert error.value.args[0].startswith("--model_name_or_path")


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_broken_tokenizer_is_one_line_user_error(case, broken_copy):
    folder = broken_copy(TOKENIZER_CASES, case)
    with pytest.raises(UserError) as error:
        load_with("tokenizer", folder)
    message = assert_user_error_line(error, folder, TOKENIZER_CASES[case][1])
    assert message.endswith("or pass --tokenizer_name")  # the stage's other way out
    load_causal_lm(check_model_path(str(folder), "--model_name_or_path"))  # the model itself is fine


def test_tokenizer_name_pointing_at_a_dir_without_tokenizer(tiny_model_dir, tmp_path):
    empty = tmp_path / "tok"
    empty.mkdir()
    with pytest.raises(UserError, match=r"^tokenizer .*tok has no tokenizer files.*came from into it$"):
        load_model_tokenizer(ModelArguments(model_name_or_path=tiny_model_dir, tokenizer_name=str(empty)),
                             tiny_model_dir)


def test_intact_copy_loads(tiny_model_dir, tmp_path):
    folder = tmp_path / "intact"
    shutil.copytree(tiny_model_dir, folder)
    assert load_with("tokenizer", folder).pad_token is not None
    assert type(load_with("causal_lm", folder)).__name__ == "LlamaForCausalLM"


def test_unexpected_loading_errors_still_propagate(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    def out_of_memory(*_args, **_kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        load_pretrained(AutoModelForCausalLM, tiny_model_dir, "--model_name_or_path")

    def bug(*_args, **_kwargs):
        raise ValueError("a bug in the loader")

    from transformers import AutoTokenizer

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", bug)
    with pytest.raises(ValueError, match="a bug in the loader"):
        load_tokenizer(tiny_model_dir)


def test_hub_id_offline_is_one_line_user_error(monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"^--model_name_or_path no-such-org/no-such-model: the model cannot be loaded"):
        load_pretrained(AutoModelForCausalLM, "no-such-org/no-such-model", "--model_name_or_path")


def aten_ops(function) -> list[str]:
    """Names of the aten ops ``function()`` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    with Record() as record:
        function()
    return record.names


@pytest.mark.parametrize("grad", [False, True])
def test_frozen_lm_head_on_kept_positions_runs_one_mm_not_a_bmm_on_copied_weights(tiny_model_dir, grad):
    """A frozen head fed ``hidden[:, -k:]`` (logits_to_keep) made torch's matmul expand and copy its weight per
    batch row for a bmm (slow in bf16 on CPU); with the hook it folds into one mm, with the same logits, in
    inference and in a training forward (LoRA: input requires grad, head frozen)."""
    model = load_causal_lm(tiny_model_dir, dtype=torch.bfloat16).requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (3, 12))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(grad)

    def forward():
        with torch.set_grad_enabled(grad):
            return model(inputs_embeds=embeds, logits_to_keep=5).logits

    before = forward()
    assert "bmm" in aten_ops(forward)  # the slow path this guards against: if torch folds by itself, drop the hook
    fold_lm_head_input(model)
    fold_lm_head_input(model)  # once per head
    assert "bmm" not in aten_ops(forward)
    torch.testing.assert_close(forward(), before)
    if grad:
        forward().float().sum().backward()
        assert embeds.grad is not None and torch.isfinite(embeds.grad).all()
