"""dpo_training.py end to end on the tiny model and the demo preference data.

One subprocess run (the CLI as users run it) trains a LoRA adapter for a few steps and evaluates on
data/demo/test.jsonl; a full fine-tune against precomputed reference log-probs, its resume, and the
bad inputs run in-process through ``run_cli(main)``, which is what the script's ``__main__`` does
(one stderr line, exit 2, no traceback).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dpo_training  # noqa: E402
from rlhf.errors import run_cli  # noqa: E402

TRAIN = REPO / "data" / "demo" / "train.jsonl"
TEST = REPO / "data" / "demo" / "test.jsonl"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
QUIET = ["--report_to", "none", "--disable_tqdm", "true"]
SMALL = ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16", "--max_length", "96",
         "--max_eval_samples", "16", "--learning_rate", "1e-3"]
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def run_main(monkeypatch, argv: list[str]) -> int:
    monkeypatch.setattr(sys, "argv", ["dpo_training.py", *argv])
    return run_cli(dpo_training.main)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("dpo") / "out"
    command = [
        sys.executable, str(REPO / "dpo_training.py"), "--model_name_or_path", tiny_model_dir,
        "--train_file", str(TRAIN), "--validation_file", str(TEST), "--output_dir", str(output),
        "--max_train_samples", "64", "--max_steps", "4", "--logging_steps", "2", "--save_strategy", "no",
        "--heldout_samples", "4",
        "--heldout_max_new_tokens", "8", *SMALL, *QUIET,
    ]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result


def test_cli_writes_adapter_tokenizer_metrics_and_plot(trained):
    output, result = trained
    assert (output / "adapter_config.json").is_file() and (output / "adapter_model.safetensors").is_file()
    assert not (output / "model.safetensors").exists()  # LoRA: the adapter only, no second model
    assert (output / "tokenizer.json").is_file() and (output / "train_results.json").is_file()
    assert (output / "training_curves.png").stat().st_size > 10_000
    results = json.loads((output / "eval_results.json").read_text())
    assert results["eval_samples"] == 16
    for key in REWARD_KEYS:
        assert math.isfinite(results[f"eval_{key}"]), key
    assert 0 <= results["eval_rewards/accuracies"] <= 1
    assert results["eval_rewards/margins"] == pytest.approx(
        results["eval_rewards/chosen"] - results["eval_rewards/rejected"], abs=1e-6)
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    train_logs = [row for row in history if "loss" in row]
    assert [row["step"] for row in train_logs] == [2, 4]
    assert all(key in row for row in train_logs for key in (*REWARD_KEYS, "logps/chosen", "logps/rejected"))
    assert "reference: the adapter-disabled model" in result.stdout + result.stderr


def test_cli_writes_the_heldout_summary_the_report_reads(trained):
    output, _ = trained
    summary = json.loads((output / "summary.json").read_text())
    assert summary["algorithm"] == "dpo" and summary["steps"] == 4 and summary["precision"] == "fp32"
    assert 0 < summary["wall_time_s"] < 3600  # the whole invocation, for the recipe table's wall-time column
    # Before training the LoRA policy IS the reference: zero KL.
    assert summary["eval_before"]["eval/kl"] == pytest.approx(0.0, abs=1e-4)
    assert math.isfinite(summary["eval_after"]["eval/kl"])
    assert 1 <= summary["eval_after"]["eval/response_length"] <= 8
    samples = [json.loads(line) for line in (output / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and len({s["prompt"] for s in samples}) == 4
    assert all(isinstance(s["response_before"], str) and isinstance(s["response_after"], str) for s in samples)


def test_full_finetune_with_precomputed_reference_then_resume(tiny_model_dir, tmp_path, monkeypatch):
    """--peft none --precompute_ref_log_probs: one model loaded (no copy), first loss exactly log 2
    (policy == reference), a full model saved; resuming continues at the checkpoint's step."""
    loads = []
    real_load = dpo_training.load_causal_lm
    monkeypatch.setattr(dpo_training, "load_causal_lm", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    output = tmp_path / "out"
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file", str(TRAIN), "--max_train_samples", "24",
            "--validation_split_percentage", "0", "--output_dir", str(output), "--peft", "none",
            "--precompute_ref_log_probs", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2",
            *SMALL, *QUIET]
    assert run_main(monkeypatch, [*argv, "--max_steps", "2"]) == 0
    assert len(loads) == 1
    assert (output / "model.safetensors").is_file() and (output / "checkpoint-2" / "COMPLETE").is_file()
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert run_main(monkeypatch, [*argv, "--max_steps", "3", "--resume_from_checkpoint", "true"]) == 0
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 3


# ---------------------------------------------------------------- bad inputs: exit 2, one line, no model loaded


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("a model or tokenizer was loaded before the bad input was reported")

    monkeypatch.setattr(dpo_training, "load_causal_lm", refuse)
    monkeypatch.setattr(dpo_training, "load_model_tokenizer", refuse)


def sft_only_file(tmp_path) -> str:
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Hi {i}?", "completion": "Hello."}) + "\n" for i in range(60)))
    return str(path)


@pytest.mark.parametrize("extra,fragment", [
    (["--beta", "0"], "--beta 0.0 must be a positive number"),
    (["--beta", "-0.5"], "--beta -0.5"),
    (["--loss_type", "kto"], "--loss_type 'kto' is not one of sigmoid, ipo, robust"),
    (["--loss_type", "ipo", "--label_smoothing", "0.1"], "not ipo"),
    (["--max_prompt_length", "96"], "leaves no room for the answer"),
    (["--heldout_samples", "4", "--validation_split_percentage", "0"], "--heldout_samples needs held-out prompts"),
    (["--heldout_reward_model", "rm"], "--heldout_reward_model scores the held-out responses; also pass"),
    (["--heldout_reward_model", "TINY", "--heldout_samples", "4", "--validation_file", str(TEST)],
     "a reward model must be a one-output sequence classifier"),
    ("NO_PAIRS", "no known format in columns ['completion', 'prompt']"),
])
def test_bad_inputs_exit_2_with_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys, no_model_loading, extra,
                                         fragment):
    train = sft_only_file(tmp_path) if extra == "NO_PAIRS" else str(TRAIN)
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file", train, "--output_dir", str(tmp_path / "out"),
            *SMALL, *QUIET, *([] if extra == "NO_PAIRS" else [tiny_model_dir if e == "TINY" else e for e in extra])]
    assert run_main(monkeypatch, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert "Traceback" not in err[0]


def test_heldout_reward_model_scores_the_responses_raw(tiny_model_dir, tmp_path, monkeypatch):
    """--heldout_reward_model: the summary's result holds the RM's raw score of the held-out answers before
    and after, each equal to what transformers' own sequence-classifier head gives that prompt + answer."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.tiny_model import build_tiny_reward_model

    reward_dir = build_tiny_reward_model(tiny_model_dir, str(tmp_path / "rm"))
    output = tmp_path / "out"
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file", str(TRAIN), "--validation_file", str(TEST),
            "--max_train_samples", "16", "--max_steps", "2", "--save_strategy", "no", "--output_dir", str(output),
            "--heldout_samples", "4", "--heldout_max_new_tokens", "8", "--heldout_reward_model", reward_dir,
            *SMALL, *QUIET, "--max_eval_samples", "2"]
    assert run_main(monkeypatch, argv) == 0
    # --max_eval_samples caps the pairs DPO evaluates, not the held-out prompts (they were cut to 2 with it)
    assert json.loads((output / "eval_results.json").read_text())["eval_samples"] == 2
    summary = json.loads((output / "summary.json").read_text())
    score = summary["result"]["reward_score"]
    assert summary["result"]["reward_source"] == "reward-model"
    assert score["change"] == pytest.approx(score["after"] - score["before"])
    samples = [json.loads(line) for line in (output / "eval_samples.jsonl").read_text().splitlines()]
    assert len({s["prompt"] for s in samples}) == 4
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    oracle = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    for when in ("before", "after"):
        with torch.no_grad():
            expected = [oracle(**tokenizer(s["prompt"] + s[f"response_{when}"], return_tensors="pt")).logits.item()
                        for s in samples]
        assert [s[f"rm_score_{when}"] for s in samples] == pytest.approx(expected, abs=1e-4)
        assert score[when] == pytest.approx(sum(expected) / len(expected), abs=1e-4)


def test_report_reads_the_dpo_summary_without_a_reward_model(trained):
    from rlhf.report import build_report

    output, _ = trained
    text, numbers = build_report(None, output)
    assert numbers["algorithm"] == "dpo" and numbers["heldout_prompts"] == 4
    assert "| held-out metric | before DPO | after DPO | change +- paired standard error |" in text
    assert "No reward model" in text and "| mean reward-model score | n/a | n/a | n/a |" in text
    assert "rule_score" in numbers["rule_before"] and "rule_score" in numbers["rule_after"]
    assert str(output / "training_curves.png") in text


def test_dpo_learns_to_prefer_the_chosen_answers(tiny_model_dir, tmp_path, monkeypatch):
    """A few full fine-tuning steps on 8 pairs: the implicit reward ranks chosen above rejected on them
    (measured: accuracy 1, margin 1.6, loss 0.21) and the loss falls well below log 2."""
    rows = TRAIN.read_text().splitlines()[:8]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(rows) + "\n")
    output = tmp_path / "out"
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file", str(pairs), "--validation_file", str(pairs),
            "--output_dir", str(output), "--peft", "none", "--max_steps", "12", "--logging_steps", "4",
            "--save_strategy", "no", "--beta", "0.1", *SMALL, *QUIET]
    assert run_main(monkeypatch, argv) == 0
    results = json.loads((output / "eval_results.json").read_text())
    assert results["eval_rewards/accuracies"] >= 0.875
    assert results["eval_rewards/margins"] > 0.5
    assert results["eval_loss"] < 0.5 * math.log(2)
