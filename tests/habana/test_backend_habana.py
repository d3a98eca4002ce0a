"""rlhf/ backend choice, argument parsing and compat on the Gaudi stack (transformers 4.55),
in-process, with Habana's software EMULATED (test-only; see emulation/habana_emulation.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rlhf.arguments import parse_stage_args
from rlhf.backend import Backend, BackendArguments, resolve_backend


@pytest.fixture(autouse=True)
def _lazy_mode_env(monkeypatch):
    monkeypatch.delenv("PT_HPU_LAZY_MODE", raising=False)  # resolve_backend sets it; undone after each test


def test_use_habana_picks_gaudi_classes_and_sets_lazy_mode():
    from optimum.habana import GaudiConfig, GaudiTrainer, GaudiTrainingArguments

    backend = resolve_backend(BackendArguments(device="hpu", use_habana=True, use_lazy_mode=True))
    assert backend.is_gaudi and backend.device == "hpu"
    import os

    assert os.environ["PT_HPU_LAZY_MODE"] == "1"
    assert backend.trainer_classes() == (GaudiTrainer, GaudiTrainingArguments)
    config = backend.trainer_kwargs(None)["gaudi_config"]
    assert isinstance(config, GaudiConfig) and config.use_fused_adam and config.use_fused_clip_norm
    eager = resolve_backend(BackendArguments(use_habana=True))
    assert os.environ["PT_HPU_LAZY_MODE"] == "0" and eager.mark_step()() is None


def test_cpu_request_keeps_transformers_trainer_even_with_optimum_habana_installed():
    from transformers import Trainer, TrainingArguments

    backend = resolve_backend(BackendArguments(device="cpu"))
    assert not backend.is_gaudi
    assert backend.trainer_classes() == (Trainer, TrainingArguments)
    assert backend.trainer_kwargs(None) == {}


def test_auto_without_habana_software_is_cpu(monkeypatch):
    import rlhf.backend as backend_module

    monkeypatch.setattr(backend_module, "habana_software_present", lambda: False)
    assert resolve_backend(BackendArguments()).device == "cpu"


def test_mark_step_and_accelerator_on_gaudi(emulation_record):
    from optimum.habana.accelerate import GaudiAccelerator

    backend = Backend(device="hpu", use_lazy_mode=True)
    backend.mark_step()()
    backend.mark_step()()
    assert emulation_record["calls"]["mark_step"] == 2
    accelerator = backend.make_accelerator()
    assert isinstance(accelerator, GaudiAccelerator)
    assert accelerator.device.type == "cpu"  # emulation: no HPU device behind it


def test_wrap_for_generation_graphs_generate_only(tiny_model, emulation_record):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf.modeling import LoraArguments, lora_config

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), lora_config(LoraArguments(), "CAUSAL_LM"))
    assert Backend(device="cpu").wrap_for_generation(model) is model and "generate" not in model.__dict__
    assert Backend(device="hpu", use_lazy_mode=False).wrap_for_generation(model) is model
    assert emulation_record["calls"]["wrap_in_hpu_graph"] == 0

    backend = Backend(device="hpu", use_lazy_mode=True)
    assert backend.wrap_for_generation(model) is model
    backend.wrap_for_generation(model)  # twice: still wrapped once
    assert emulation_record["calls"]["wrap_in_hpu_graph"] == 1
    ids = torch.tensor([[1, 5, 9, 30]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (1, 7)
    assert emulation_record["calls"]["hpu_graph_forward"] == 3  # prompt pass + 2 decode steps
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()  # training forward: plain, not graphed
    assert emulation_record["calls"]["hpu_graph_forward"] == 3


def test_gaudi_training_args_parse_reference_flags(tmp_path):
    """4.55's TrainingArguments still has overwrite_output_dir, GaudiTrainingArguments has
    use_habana / use_lazy_mode / gaudi_config_name: each is parsed once and shared."""
    from optimum.habana import GaudiConfig, GaudiTrainingArguments

    from rlhf.training import RunArguments

    config_dir = tmp_path / "gaudi_config"
    GaudiConfig(use_fused_adam=False, use_fused_clip_norm=True).save_pretrained(config_dir)
    parsed = parse_stage_args(
        (RunArguments,), True,
        ["--output_dir", str(tmp_path / "out"), "--overwrite_output_dir", "--evaluation_strategy", "no",
         "--use_auth_token", "True", "--device", "hpu", "--use_habana", "--use_lazy_mode",
         "--gaudi_config_name", str(config_dir)],
    )
    run_args, training_args = parsed.values
    assert isinstance(training_args, GaudiTrainingArguments)
    assert run_args.overwrite_output_dir is True and training_args.overwrite_output_dir is True
    assert training_args.use_habana is True and training_args.use_lazy_mode is True
    assert training_args.gaudi_config_name == str(config_dir)
    assert parsed.backend.gaudi_config().use_fused_adam is False


def test_compat_on_transformers_4_55(tiny_model, tmp_path):
    from rlhf.compat import IS_TRANSFORMERS_5, dtype_kwargs
    from rlhf.modeling import load_causal_lm, load_tokenizer

    assert not IS_TRANSFORMERS_5
    assert dtype_kwargs(torch.bfloat16) == {"torch_dtype": torch.bfloat16}
    assert next(load_causal_lm(tiny_model, dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16
    # A tokenizer saved by transformers 5 records class TokenizersBackend, unknown to 4.55.
    v5 = tmp_path / "v5_tokenizer"
    shutil.copytree(tiny_model, v5)
    config = json.loads((v5 / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "TokenizersBackend"
    (v5 / "tokenizer_config.json").write_text(json.dumps(config))
    reference = load_tokenizer(tiny_model)
    tokenizer = load_tokenizer(str(v5))
    text = "What is Mars? Mars is a planet."
    assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    assert tokenizer.eos_token == reference.eos_token and tokenizer.pad_token is not None
