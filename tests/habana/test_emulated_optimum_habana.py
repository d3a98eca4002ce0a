"""optimum-habana itself under the test-only CPU EMULATION of Habana's software (in-process).

Checks that the emulation is what it claims: optimum-habana imports, its GaudiTrainer trains a
model on the CPU with use_habana/use_lazy_mode on, and its Habana hooks reach the stub.
"""

from __future__ import annotations

import torch


def test_optimum_habana_imports_and_stub_is_labelled_emulation():
    import habana_frameworks
    import optimum.habana
    import transformers

    assert habana_frameworks.EMULATED is True  # the stub, never Habana's real package
    assert "EMULATION" in habana_frameworks.__doc__
    assert transformers.__version__.startswith("4.55.")
    assert optimum.habana.__version__ == "1.21.2"
    assert not hasattr(torch, "hpu")  # transformers/accelerate must not think an HPU is present
    from accelerate.utils import is_hpu_available

    assert is_hpu_available() is False


def test_gaudi_trainer_trains_on_cpu_through_the_gaudi_branches(tiny_model, tmp_path, emulation_record):
    from datasets import Dataset
    from optimum.habana import GaudiConfig, GaudiTrainer, GaudiTrainingArguments
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = model.lm_head.weight.detach().clone()
    rows = [{"input_ids": [5 + i, 6 + i, 7 + i, 8 + i], "labels": [5 + i, 6 + i, 7 + i, 8 + i]} for i in range(8)]
    args = GaudiTrainingArguments(
        output_dir=str(tmp_path), use_habana=True, use_lazy_mode=True, use_cpu=True, max_steps=3,
        per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1,
    )
    config = GaudiConfig()
    config.use_fused_adam = True
    config.use_fused_clip_norm = True
    trainer = GaudiTrainer(model=model, gaudi_config=config, args=args, train_dataset=Dataset.from_list(rows))
    result = trainer.train()

    assert args.device.type == "cpu" and args.use_habana and args.use_lazy_mode
    assert result.global_step == 3
    assert not torch.equal(before, model.lm_head.weight.detach())  # it trained
    calls = emulation_record["calls"]
    assert calls["FusedAdamW"] == 1 and type(trainer.optimizer.optimizer).__name__ == "FusedAdamW"
    assert calls["FusedClipNorm.clip_norm"] == 3
    assert calls["mark_step"] >= 6  # lazy mode: after backward and after each optimizer step
    assert {"GaudiTrainingArguments", "GaudiTrainer", "GaudiConfig"} <= {i["class"] for i in emulation_record["instances"]}


def test_eager_mode_gaudi_trainer_never_marks_steps(tiny_model, tmp_path, emulation_record):
    from datasets import Dataset
    from optimum.habana import GaudiConfig, GaudiTrainer, GaudiTrainingArguments
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}] * 4
    args = GaudiTrainingArguments(output_dir=str(tmp_path), use_habana=True, use_lazy_mode=False, use_cpu=True,
                                  max_steps=1, per_device_train_batch_size=4, report_to=[], save_strategy="no")
    GaudiTrainer(model=model, gaudi_config=GaudiConfig(), args=args, train_dataset=Dataset.from_list(rows)).train()
    assert emulation_record["calls"]["mark_step"] == 0
