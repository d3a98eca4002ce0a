"""configs/deepspeed/zero2.json and zero3.json: structure, stage, and that transformers can fill every "auto".

No engine is built here (``tests/test_deepspeed.py`` trains with both configs); what is checked:

* the files parse and hold the keys transformers' ``HfTrainerDeepSpeedConfig`` fills from
  ``TrainingArguments`` (batch sizes, accumulation, clipping, bf16/fp16) with ``"auto"``;
* the ZeRO stage and that offloading is off;
* transformers' own fill-in code (``trainer_config_process`` / ``trainer_config_finalize``, run on
  accelerate's DeepSpeed-free config reader) replaces every ``"auto"`` and finds no mismatch;
* with DeepSpeed installed, ``TrainingArguments(deepspeed=path)`` accepts the file (skipped otherwise).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {2: REPO / "configs" / "deepspeed" / "zero2.json", 3: REPO / "configs" / "deepspeed" / "zero3.json"}
# Keys HfTrainerDeepSpeedConfig.trainer_config_process fills from TrainingArguments; "auto" keeps them in step.
TRAINER_FILLED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                  "gradient_clipping", "bf16.enabled", "fp16.enabled")
ZERO3_AUTO = ("zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
              "zero_optimization.stage3_param_persistence_threshold")
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def load(stage: int) -> dict:
    return json.loads(CONFIGS[stage].read_text())


def value(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"{dotted} missing"
        node = node[part]
    return node


def autos(node, prefix: str = "") -> list[str]:
    """Dotted paths of every "auto" value left in a config."""
    if isinstance(node, dict):
        return [path for key, child in node.items() for path in autos(child, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


@pytest.mark.parametrize("stage", [2, 3])
def test_parses_with_stage_and_trainer_keys_auto(stage):
    config = load(stage)
    assert value(config, "zero_optimization.stage") == stage
    for key in TRAINER_FILLED:
        assert value(config, key) == "auto", key
    # No optimizer/scheduler section: the Trainer builds them from --learning_rate, --lr_scheduler_type, ...
    assert "optimizer" not in config and "scheduler" not in config


@pytest.mark.parametrize("stage", [2, 3])
def test_offload_is_off(stage):
    zero = load(stage)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "none"
    if stage == 3:
        assert zero["offload_param"]["device"] == "none"
    else:
        assert "offload_param" not in zero  # a stage-3 option


def test_zero3_saves_whole_weights_and_sizes_from_model():
    zero = load(3)["zero_optimization"]
    # save_model() must write full 16-bit weights, not only DeepSpeed's partitioned checkpoint
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    for key in ZERO3_AUTO:
        assert value(load(3), key) == "auto"
    assert not any(k.startswith("stage3_") for k in load(2)["zero_optimization"])


def _probe_class():
    """transformers' fill-in methods on accelerate's config reader (neither needs deepspeed)."""
    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    methods = {name: HfTrainerDeepSpeedConfig.__dict__[name]
               for name in ("dtype", "is_auto", "fill_match", "fill_only", "trainer_config_process",
                            "trainer_config_finalize")}
    return type("FillProbe", (HfDeepSpeedConfig,), methods)


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("bf16", [False, True])
def test_transformers_fills_every_auto(stage, bf16, tmp_path):
    import torch
    from transformers import TrainingArguments

    probe = _probe_class()(str(CONFIGS[stage]))
    probe._dtype, probe.mismatches = None, []
    assert probe.is_zero3() == (stage == 3) and not probe.is_offload()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=8,
                             max_grad_norm=0.5, report_to="none", use_cpu=True)
    args.bf16 = bf16  # set after construction: bf16 on CPU is refused by some torch builds' checks
    probe.trainer_config_process(args)
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=64))
    probe.trainer_config_finalize(args, model, num_training_steps=100)
    config = probe.config
    assert autos(config) == []
    assert not probe.mismatches
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 8
    assert config["train_batch_size"] == args.world_size * 4 * 8
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is bf16 and config["fp16"]["enabled"] is False
    assert probe.dtype() == (torch.bfloat16 if bf16 else torch.float32)
    assert config["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    if stage == 3:
        assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 640


@pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed is not installed (pip install -r requirements-deepspeed.txt)")
@pytest.mark.parametrize("stage", [2, 3])
def test_training_arguments_accept_the_file(stage, tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), deepspeed=str(CONFIGS[stage]), report_to="none")
    assert args.hf_deepspeed_config.is_zero3() == (stage == 3)


def test_missing_deepspeed_or_file_is_a_user_error(monkeypatch):
    """``--deepspeed`` on a machine without DeepSpeed: one line saying what to install, not a traceback."""
    import importlib.util as util

    from rlhf.arguments import check_deepspeed_flag
    from rlhf.errors import UserError

    with pytest.raises(UserError, match="no such file"):
        check_deepspeed_flag(["--deepspeed", "configs/deepspeed/zero9.json"])
    real_find_spec = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a))
    for argv in (["--deepspeed", str(CONFIGS[2])], [f"--deepspeed={CONFIGS[3]}"]):
        with pytest.raises(UserError, match="pip install deepspeed"):
            check_deepspeed_flag(argv)
    check_deepspeed_flag(["--learning_rate", "1e-4"])  # no --deepspeed: nothing to check
