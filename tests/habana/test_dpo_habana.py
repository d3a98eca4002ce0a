"""dpo_training.py on the Gaudi stack (optimum-habana 1.21 / transformers 4.55), Habana's software EMULATED.

The Gaudi user's single-card command (``--use_habana --use_lazy_mode``) must reach optimum-habana's
``GaudiTrainer`` (through our DPO subclass and reliability mixin) with fused Adam and clip-norm, and
every training forward must have ONE static shape: chosen + rejected rows padded to ``--max_length``,
for the policy and for the LoRA-disabled reference alike (one graph on a Gaudi). Nothing here
imports TRL: the Gaudi stack has none. Passing says nothing about real Gaudi hardware.
"""

from __future__ import annotations

import json
import math

from habana_helpers import check_ok, instances, only_record, run_emulated

SEQ = 64  # --max_length
BATCH = 2  # pairs per device batch: 2 x BATCH rows


def test_dpo_reaches_gaudi_trainer_with_static_shapes(tiny_model, demo_train, tmp_path):
    out = tmp_path / "out"
    result = run_emulated(
        ["dpo_training.py", "--model_name_or_path", tiny_model, "--train_file", demo_train,
         "--output_dir", str(out), "--log_level", "info", "--logging_steps", "1", "--max_steps", "3",
         "--per_device_train_batch_size", str(BATCH), "--per_device_eval_batch_size", str(BATCH),
         "--max_train_samples", "40", "--max_eval_samples", "4", "--validation_split_percentage", "10",
         "--max_length", str(SEQ), "--max_prompt_length", "40", "--beta", "0.1", "--loss_type", "sigmoid",
         "--report_to", "none", "--use_habana", "--use_lazy_mode"],
        tmp_path / "record",
    )
    check_ok(result)
    record = only_record(tmp_path / "record")
    (args,) = instances(record, "GaudiTrainingArguments")
    assert args["use_habana"] is True and args["use_lazy_mode"] is True
    trainers = [i for i in record["instances"] if i["class"].endswith("GaudiTrainer")]
    assert len(trainers) == 1 and trainers[0]["use_fused_adam"] is True, record["instances"]
    assert "DPO" in trainers[0]["class"], trainers[0]["class"]
    calls = record["calls"]
    assert calls["FusedAdamW"] == 1 and calls["FusedClipNorm.clip_norm"] == 3
    assert calls["mark_step"] >= 6  # after each backward and each optimizer step
    # Policy forwards (training) and the reference's (adapter disabled, no_grad): one shape, padded.
    shapes = {tuple(sorted((k, tuple(v)) for k, v in row["shapes"].items()))
              for row in record["input_shapes"] if not row["in_graph"]}
    assert {dict(s)["input_ids"] for s in shapes} == {(2 * BATCH, SEQ)}, shapes
    assert (out / "adapter_config.json").is_file() and (out / "tokenizer.json").is_file()
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert abs(history[0]["loss"] - math.log(2)) < 1e-4  # step 1: the LoRA policy is the reference
    assert all(k in history[0] for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"))
    results = json.loads((out / "eval_results.json").read_text())
    assert "eval_rewards/accuracies" in results and "eval_rewards/margins" in results
