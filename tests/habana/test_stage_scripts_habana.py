"""The stage scripts end to end on the Gaudi stack, with Habana's software EMULATED on the CPU.

Each script runs in a subprocess whose ``sitecustomize`` (tests/habana/emulation) installs the
test-only emulation; the emulation records which Gaudi classes were instantiated, the Habana
calls (mark_step, fused AdamW, fused clip-norm, HPU graphs) and the shapes of the tensors that
entered the model. Passing shows that the Gaudi users' commands parse and reach optimum-habana's
Gaudi code path with static shapes; it does not show anything about real Gaudi hardware.
"""

from __future__ import annotations

import json

import pytest

from habana_helpers import REPO, check_ok, instances, only_record, run_emulated, training_shapes

SEQ = 64  # --max_seq_length / --max_length of the runs below


@pytest.fixture(scope="module")
def sft_lazy(tiny_model, demo_train, tmp_path_factory):
    """The reference's single-card Gaudi SFT command (tiny sizes): --device hpu --use_habana --use_lazy_mode."""
    root = tmp_path_factory.mktemp("sft_lazy")
    out = root / "out"
    result = run_emulated(
        ["finetune_clm.py", "--model_name_or_path", tiny_model, "--train_file", demo_train,
         "--output_dir", str(out), "--do_train", "--overwrite_output_dir", "--peft", "lora",
         "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-4",
         "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "2000", "--save_total_limit", "1",
         "--logging_steps", "1", "--log_level", "info", "--use_fast_tokenizer", "false",
         "--evaluation_strategy", "no", "--use_auth_token", "True",
         "--max_seq_length", str(SEQ), "--max_source_length", "32",
         "--device", "hpu", "--use_habana", "--use_lazy_mode"],
        root / "record",
    )
    check_ok(result)
    return out, only_record(root / "record"), result


def test_sft_reaches_gaudi_trainer_in_lazy_mode(sft_lazy):
    out, record, result = sft_lazy
    (args,) = instances(record, "GaudiTrainingArguments")
    assert args["use_habana"] is True and args["use_lazy_mode"] is True
    (trainer,) = instances(record, "GaudiTrainer")
    assert trainer["use_fused_adam"] is True and trainer["use_fused_clip_norm"] is True
    assert instances(record, "GaudiConfig")
    assert record["env"]["PT_HPU_LAZY_MODE"] == "1"
    # Habana's bridge reads PT_HPU_LAZY_MODE when first imported: it must be set by then.
    assert [e for e in record["events"] if e[0] == "import habana_frameworks.torch"] == [["import habana_frameworks.torch", "1"]]
    calls = record["calls"]
    assert calls["FusedAdamW"] == 1
    assert calls["FusedClipNorm.clip_norm"] == 3  # one per optimizer step
    assert calls["mark_step"] >= 3 * 2 + 3  # after each backward (2 micro-batches) and each step
    assert "Backend: hpu" in result.stdout + result.stderr
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "train_results.json").is_file()


def test_sft_inputs_have_static_shapes(sft_lazy):
    _, record, _ = sft_lazy
    shapes = training_shapes(record)
    assert len(shapes) == 1, shapes  # one shape: one graph on a Gaudi
    (shape,) = shapes
    assert dict(shape)["input_ids"] == (2, SEQ) and dict(shape)["attention_mask"] == (2, SEQ), shape


def test_sft_packing_eager_mode_static_shapes_and_no_mark_step(tiny_model, demo_train, tmp_path):
    """--dataset_concatenation blocks of --max_seq_length; without --use_lazy_mode: eager (PT_HPU_LAZY_MODE=0)."""
    out = tmp_path / "out"
    result = run_emulated(
        ["finetune_clm.py", "--model_name_or_path", tiny_model, "--train_file", demo_train,
         "--output_dir", str(out), "--do_train", "--dataset_concatenation", "--per_device_train_batch_size", "2",
         "--max_steps", "2", "--max_seq_length", str(SEQ), "--max_source_length", "32", "--report_to", "none",
         "--use_habana", "--device", "hpu"],
        tmp_path / "record",
    )
    check_ok(result)
    record = only_record(tmp_path / "record")
    (args,) = instances(record, "GaudiTrainingArguments")
    assert args["use_habana"] is True and args["use_lazy_mode"] is False
    assert record["env"]["PT_HPU_LAZY_MODE"] == "0"
    assert [e for e in record["events"] if e[0] == "import habana_frameworks.torch"] == [["import habana_frameworks.torch", "0"]]
    assert record["calls"].get("mark_step", 0) == 0
    shapes = training_shapes(record)
    assert len(shapes) == 1 and dict(next(iter(shapes)))["input_ids"] == (2, SEQ), shapes


def test_merge_adapter_on_gaudi_stack_matches_adapter_logits(sft_lazy, tiny_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter, _, _ = sft_lazy
    merged_dir = tmp_path / "merged"
    result = run_emulated(["merge_peft_adapter.py", "--adapter_model_name", str(adapter),
                           "--output_name", str(merged_dir)], tmp_path / "record")
    check_ok(result)
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    ids = torch.tensor([[1, 5, 9, 30, 41, 7]])
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(adapter)).eval()
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-4)


def _needs(script: str) -> None:
    if not (REPO / script).is_file():
        pytest.skip(f"{script} is not in the tree yet")


@pytest.fixture(scope="module")
def rm_lazy(tiny_model, demo_train, tmp_path_factory):
    _needs("reward_modeling.py")
    root = tmp_path_factory.mktemp("rm_lazy")
    out = root / "out"
    result = run_emulated(
        ["reward_modeling.py", "--model_name_or_path", tiny_model, "--train_file", demo_train,
         "--output_dir", str(out), "--log_level", "info", "--num_train_epochs", "1", "--logging_steps", "1",
         "--per_device_train_batch_size", "4", "--max_steps", "3", "--max_train_samples", "40",
         "--max_length", str(SEQ), "--use_habana", "--use_lazy_mode"],
        root / "record",
    )
    check_ok(result)
    return out, only_record(root / "record")


def test_reward_model_reaches_gaudi_trainer_with_static_shapes(rm_lazy):
    out, record = rm_lazy
    (args,) = instances(record, "GaudiTrainingArguments")
    assert args["use_habana"] is True and args["use_lazy_mode"] is True
    trainers = [i for i in record["instances"] if i["class"].endswith("GaudiTrainer")]
    assert len(trainers) == 1 and trainers[0]["use_fused_adam"] is True, record["instances"]
    assert record["calls"]["FusedAdamW"] == 1 and record["calls"]["mark_step"] >= 6
    shapes = training_shapes(record)
    assert len(shapes) == 1, shapes  # chosen + rejected of 4 pairs, always padded to --max_length
    assert dict(next(iter(shapes)))["input_ids"] == (8, SEQ)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_ppo_uses_gaudi_accelerator_hpu_graphs_and_static_shapes(rm_lazy, tiny_model, demo_train, tmp_path, estimator):
    _needs("rl_training.py")
    rm_dir, _ = rm_lazy
    out = tmp_path / "out"
    # grpo: 2 prompts x 2 responses per step, still one static shape per forward kind.
    group = ["--advantage_estimator", "grpo", "--num_generations", "2"] if estimator == "grpo" else []
    result = run_emulated(
        ["rl_training.py", "--model_name", tiny_model, "--reward_model_name", str(rm_dir),
         "--train_file", demo_train, "--output_dir", str(out), "--batch_size", "4", "--mini_batch_size", "2",
         "--gradient_accumulation_steps", "1", "--output_max_length", "8", "--input_max_length", "48",
         "--steps", "2", "--batched_gen", "True", "--ppo_epochs", "1", "--eval_samples", "0",
         "--save_freq", "1", "--use_habana", "--use_lazy_mode", *group],
        tmp_path / "record",
    )
    check_ok(result)
    record = only_record(tmp_path / "record")
    assert instances(record, "GaudiAccelerator"), record["instances"]
    calls = record["calls"]
    assert calls["wrap_in_hpu_graph"] >= 1 and calls["hpu_graph_forward"] >= 1
    assert calls["mark_step"] >= 2
    # Forwards outside generation: policy on prompt+response padded to 48 + 8, reward model on
    # --pad_max_len (default 48 + 8): one sequence length each.
    lengths = {row["shapes"]["input_ids"][1]
               for row in record["input_shapes"] if not row["in_graph"]}
    assert lengths == {56}, lengths
    # Generation runs through the (emulated) HPU graph; its prompt pass has the static prompt width.
    prompt_passes = [row for row in record["input_shapes"] if row["in_graph"] and not row["decode_step"]]
    assert prompt_passes and {row["shapes"]["input_ids"][1] for row in prompt_passes} == {48}
    # Training forwards never run through a graph.
    assert not [row for row in record["input_shapes"] if row["in_graph"] and row["training"]]
    assert (out / "metrics.jsonl").is_file()
