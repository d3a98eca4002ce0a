"""rlhf/modeling.py: LoRA merging (the one ``merge_lora``) on the tiny model, in-process."""

from __future__ import annotations

import pytest
import torch

from rlhf.modeling import LoraArguments, load_causal_lm, load_sequence_classifier, load_tokenizer, lora_config, merge_lora


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
