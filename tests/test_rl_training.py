"""rl_training.py: prompt loading, prompt encoding against SFT and the reward model, the command line
(every PPOConfig field a flag, the reference's commands), and a happy-path run's outputs.

The PPO algorithm itself is tested in test_ppo.py; interruption and bad input in test_reliability.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import rl_training  # noqa: E402
from rlhf.data import DataArguments, prepare_examples  # noqa: E402
from rlhf.modeling import load_tokenizer  # noqa: E402
from rlhf.ppo import PPOConfig  # noqa: E402

DEMO_TRAIN = REPO / "data" / "demo" / "train.jsonl"


def write_pairs(path: Path, questions: list[str]) -> str:
    rows = [{"system": "", "question": q, "chosen": "Happy to help.", "rejected": "No."} for q in questions]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def small_config(**kwargs) -> PPOConfig:
    return PPOConfig(**{"batch_size": 2, "mini_batch_size": 1, "gradient_accumulation_steps": 1, "seed": 0, **kwargs})


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_repeated_prompts_are_used_once_and_never_both_trained_and_held_out(tokenizer, tmp_path):
    # Several preference pairs per prompt, as in data/demo/train.jsonl.
    questions = [f"Question {i}?" for i in range(12) for _ in range(3)]
    data = DataArguments(train_file=write_pairs(tmp_path / "train.jsonl", questions))
    prompts, held_out, _ = rl_training.load_prompts(data, small_config(), 2, tokenizer, world=1, rank=0)
    assert len(set(prompts)) == len(prompts) == 10
    assert len(set(held_out)) == len(held_out) == 2
    assert not set(prompts) & set(held_out)


def test_repeated_held_out_prompts_are_evaluated_once(tokenizer, tmp_path):
    data = DataArguments(
        train_file=write_pairs(tmp_path / "train.jsonl", [f"Train {i}?" for i in range(4)]),
        validation_file=write_pairs(tmp_path / "test.jsonl", ["Held out?", "Held out?", "Other?"]),
    )
    prompts, held_out, _ = rl_training.load_prompts(data, small_config(), 8, tokenizer, world=1, rank=0)
    assert len(prompts) == 4
    assert len(held_out) == 2 and held_out[0] != held_out[1]


# ---------------------------------------------------------------- one encoding for every stage


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory):
    """A Llama-style tokenizer: encoding with special tokens prepends BOS."""
    from rlhf.tiny_model import build_tiny_model

    path = build_tiny_model(str(tmp_path_factory.mktemp("bos") / "model"), seed=0, adds_bos=True)
    tokenizer = load_tokenizer(path)
    assert tokenizer("Hi")["input_ids"][0] == tokenizer.bos_token_id
    return tokenizer


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_ppo_prompts_and_reward_texts_are_encoded_as_sft_and_rm_trained_on_them(bos_tokenizer, template, tmp_path):
    from rlhf.reward import RewardScorer, tokenize_pair
    from rlhf.sft_data import tokenize_example
    from rlhf.tiny_model import build_tiny_model

    rows = [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()[:6]]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from datasets import Dataset

    examples, _ = prepare_examples(Dataset.from_list(rows), str(data), bos_tokenizer, template, allow_sft=False)
    ppo_ids = rl_training.prompt_token_ids(bos_tokenizer, examples["prompt"], max_length=512)
    for prompt, chosen, ids in zip(examples["prompt"], examples["chosen"], ppo_ids):
        sft = tokenize_example(prompt, chosen, bos_tokenizer, 512, 384, train_on_inputs=False)
        sft_prompt = [t for t, label in zip(sft["input_ids"], sft["labels"]) if label == -100]
        assert ids.tolist() == sft_prompt
        assert ids.tolist().count(bos_tokenizer.bos_token_id) == 1 and ids[0] == bos_tokenizer.bos_token_id

    # The reward model scores, for a response equal to a chosen answer, exactly the ids it was trained on.
    from transformers import AutoModelForSequenceClassification

    rm_dir = build_tiny_model(str(tmp_path / "rm"), seed=1, adds_bos=True)
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1)
    scorer = RewardScorer(reward_model, bos_tokenizer, max_length=512)
    for prompt, chosen in zip(examples["prompt"], examples["chosen"]):
        trained_on = tokenize_pair({"prompt": prompt, "chosen": chosen, "rejected": chosen}, bos_tokenizer, 512)
        scored = scorer.encode([prompt + chosen])["input_ids"][0].tolist()
        assert scored == trained_on["input_ids_chosen"]


# ---------------------------------------------------------------- the command line

REFERENCE_PPO = [
    "--log_with=wandb", "--model_name=llama2_7b_se_merged", "--reward_model_name=llama2_7b_rm",
    "--tokenizer_name=llama2_7b_se_merged", "--adafactor=False", "--save_freq=100", "--output_max_length=128",
    "--batch_size=8", "--gradient_accumulation_steps=8", "--batched_gen=True", "--ppo_epochs=4", "--seed=0",
    "--learning_rate=1.4e-5", "--early_stopping=True", "--output_dir=llama-se-rl-finetune",
]


def test_every_ppo_setting_is_one_flag_listed_once():
    result = subprocess.run([sys.executable, "rl_training.py", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    # The options section: one line per flag, indented by two spaces (the usage line lists them again,
    # and wrapped help text is indented further).
    flags = [line.split()[0].rstrip(",") for line in result.stdout.splitlines() if line.startswith("  --")]
    for f in fields(PPOConfig):
        assert flags.count(f"--{f.name}") == 1, f.name
    overlap = {f.name for f in fields(PPOConfig)} & {f.name for f in fields(rl_training.ScriptArguments)}
    assert not overlap


def test_reference_commands_parse_into_the_config():
    from rlhf.arguments import parse_stage_args

    parsed = parse_stage_args((rl_training.ScriptArguments, PPOConfig, DataArguments), False,
                              [*REFERENCE_PPO, "--device", "cpu"])
    args, config, _ = parsed.values
    assert (config.batch_size, config.gradient_accumulation_steps, config.mini_batch_size) == (8, 8, 1)
    assert config.learning_rate == 1.4e-5 and config.early_stopping and not config.adafactor
    assert args.batched_gen and args.log_with == "wandb" and args.save_freq == 100
    assert PPOConfig().batch_size == 32 and PPOConfig().gradient_accumulation_steps == 4  # the reference's defaults


# ---------------------------------------------------------------- a run, as a user makes it


def env(**extra) -> dict:
    values = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
    values.update(extra)
    return values


@pytest.fixture(scope="module")
def ppo_run(tiny_model_dir, tmp_path_factory):
    """A 4-step PPO run (random-init reward head) with a held-out evaluation, logged to wandb offline."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("ppo_run")
    rm_dir = root / "rm"
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(rm_dir)
    data = root / "train.jsonl"
    data.write_text("".join(DEMO_TRAIN.read_text().splitlines(keepends=True)[:60]))
    args = ["--model_name", tiny_model_dir, "--reward_model_name", str(rm_dir), "--train_file", str(data),
            "--device", "cpu", "--batch_size", "4", "--mini_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--ppo_epochs", "1", "--output_max_length", "8", "--steps", "4", "--save_freq", "2",
            "--eval_samples", "4", "--batched_gen", "True", "--missing_eos_penalty", "0.5", "--log_with", "wandb",
            "--best_of_n", "3", "--output_dir", str(root / "out")]
    # The token on the command line, as the reference's users pass it: wandb records sys.argv (issue 26).
    result = subprocess.run([sys.executable, "rl_training.py", *args, "--hf_access_token", SECRET], cwd=REPO,
                            capture_output=True, text=True, timeout=600, env=env(WANDB_MODE="offline"))
    assert result.returncode == 0, result.stderr[-4000:]
    return root / "out", args, result


SECRET = "hf_WANDBsecretTOKEN0123456789"


def test_run_writes_every_output(ppo_run):
    out, _, result = ppo_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("objective/raw_scores", "objective/eos_penalty", "objective/scores", "objective/kl",
                "objective/kl_coef", "objective/entropy", "policy/approxkl", "policy/clipfrac", "loss/policy",
                "loss/value", "response/length", "time/step_s", "time/generate_s", "time/score_s"):
        assert all(key in r for r in rows), key
    for name in ("adapter_model.safetensors", "value_head.safetensors", "training_curves.png", "eval_samples.jsonl",
                 "checkpoint-2", "checkpoint-4", "tokenizer_config.json"):
        assert (out / name).exists(), name
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "merged")
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"rm_score_before", "rm_score_after"} <= set(samples[0])


def test_summary_leads_with_the_reward_models_raw_score(ppo_run):
    out, _, result = ppo_run
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary)[0] == "result"
    result_block = summary["result"]
    assert list(result_block)[:2] == ["reward_score", "reward_source"]
    assert result_block["reward_source"] == "reward-model"
    score = result_block["reward_score"]
    assert score["before"] == pytest.approx(summary["eval_before"]["eval/raw_scores"])
    assert score["change"] == pytest.approx(score["after"] - score["before"])
    assert result_block["verdict"] == ("improved" if score["change"] > 0 else "WORSE" if score["change"] < 0
                                       else "unchanged")
    # The penalty is shown apart and is not in the reward-model score.
    penalty = result_block["eos_penalty"]
    assert summary["eval_after"]["eval/scores"] == pytest.approx(score["after"] - penalty["after"], abs=1e-5)
    # the whole run's wall time, so at least every step's time (a loop variable once shadowed it: last step only)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["wall_time_s"] >= sum(r["time/step_s"] for r in rows)
    last_line = [line for line in result.stderr.splitlines() if "Done: 4 steps" in line][-1]
    assert f"reward-model score {score['before']:.3f} -> {score['after']:.3f} ({result_block['verdict']}" in last_line
    # the change's paired standard error over the same held-out prompts, recomputed from the samples file
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    diffs = [s["rm_score_after"] - s["rm_score_before"] for s in samples]
    mean_diff = sum(diffs) / len(diffs)
    error = (sum((d - mean_diff) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5
    assert score["standard_error"] == pytest.approx(error)
    assert f"{score['change']:+.3f} +- {error:.3f}" in last_line


def test_best_of_n_baseline_is_reported_beside_the_result(ppo_run):
    out, _, result = ppo_run
    summary = json.loads((out / "summary.json").read_text())
    baseline, score = summary["result"]["best_of_n"], summary["result"]["reward_score"]
    assert baseline["n"] == 3 and baseline["beaten"] == (score["after"] > baseline["score"])
    last_line = [line for line in result.stderr.splitlines() if "Done: 4 steps" in line][-1]
    assert f"best-of-3 from the starting policy {baseline['score']:.3f}" in last_line
    # the margin over the baseline is paired per prompt, recomputed here from eval_samples.jsonl
    rows = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    diffs = [r["rm_score_after"] - r["rm_score_best_of_n_before"] for r in rows]
    mean_diff = sum(diffs) / len(diffs)
    assert baseline["margin"] == pytest.approx(mean_diff)
    assert baseline["margin"] == pytest.approx(score["after"] - baseline["score"], abs=1e-5)
    error = (sum((d - mean_diff) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5
    assert baseline["standard_error"] == pytest.approx(error)
    if baseline["beaten"]:
        assert f"beaten by RL by {baseline['margin']:+.3f} +- {error:.3f}" in last_line
    else:
        assert "NOT beaten by RL" in last_line
    from rlhf.report import build_report

    text, numbers = build_report(None, out)
    assert numbers["best_of_n"] == baseline and "| best-of-3 from the starting policy" in text
    assert f"after - best-of-n: {baseline['margin']:+.3f} +- {baseline['standard_error']:.3f}" in text


def test_best_of_n_keeps_the_best_response_of_each_prompt(tiny_model_dir):
    """The baseline is the mean over prompts of the best of its n samples (grouped per prompt, not mixed)."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.ppo import PolicyWithValueHead, PPOConfig, PPOTrainer
    from rlhf.reward_functions import CombinedReward

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    policy = PolicyWithValueHead(AutoModelForCausalLM.from_pretrained(tiny_model_dir), None,
                                 ref_model=AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    config = PPOConfig(batch_size=4, mini_batch_size=2, gradient_accumulation_steps=1, output_max_length=6,
                       advantage_estimator="grpo", num_generations=2)
    reward = CombinedReward(None, [("length", lambda prompts, responses, **_: [float(len(r)) for r in responses])])
    trainer = PPOTrainer(config, policy, tokenizer, reward, Accelerator(cpu=True))
    prompts = ["Hello there", "What is a cat?", "Tell me about Mars."]
    ids = [torch.tensor(tokenizer(p)["input_ids"]) for p in prompts]
    seen = []
    score_batch = trainer.score

    def recording_score(texts, responses, **kwargs):
        scores = score_batch(texts, responses, **kwargs)
        seen.extend({"prompt": t, "raw_score": float(r)} for t, r in zip(texts, scores.raw.tolist()))
        return scores

    trainer.score = recording_score
    score, per_prompt = rl_training.best_of_n(trainer, prompts, ids, {}, 4, trainer.config.batch_size)
    samples = seen
    assert [s["prompt"] for s in samples] == [p for p in prompts for _ in range(4)]
    best = [max(s["raw_score"] for s in samples[i * 4 : i * 4 + 4]) for i in range(3)]
    assert per_prompt == pytest.approx(best)
    assert score == pytest.approx(sum(best) / 3)
    assert score > sum(s["raw_score"] for s in samples) / len(samples)  # lengths vary: the best beats the mean


def test_finished_fraction_is_reported_before_and_after(ppo_run):
    """The fraction ending with EOS agrees with the per-answer flags and with the EOS penalty, which is applied
    to exactly the answers that did not finish (two independent counts of the same thing)."""
    out, _, result = ppo_run
    summary = json.loads((out / "summary.json").read_text())
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    finished, length, penalty = (summary["result"][k] for k in ("finished", "response_length", "eos_penalty"))
    for when in ("before", "after"):
        flags = [s[f"finished_{when}"] for s in samples]
        assert finished[when] == pytest.approx(sum(flags) / len(flags))
        assert penalty[when] == pytest.approx(0.5 * (1 - finished[when]))
        assert length[when] == pytest.approx(sum(s[f"length_{when}"] for s in samples) / len(samples))
        assert all(s[f"length_{when}"] <= 8 for s in samples)
        assert all(s[f"length_{when}"] == 8 for s in samples if not s[f"finished_{when}"])
    last_line = [line for line in result.stderr.splitlines() if "Done: 4 steps" in line][-1]
    assert (f"ending with EOS (not cut at --output_max_length) {100 * finished['before']:.0f}% -> "
            f"{100 * finished['after']:.0f}%") in last_line
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["response/ended_with_eos"] <= 1 for r in rows)


def test_a_dominating_eos_penalty_is_warned_about_at_start(ppo_run):
    _, _, result = ppo_run  # 8 new tokens from a random tiny model: hardly any response ends
    warning = [line for line in result.stderr.splitlines() if "without EOS" in line]
    assert len(warning) == 1 and "--missing_eos_penalty 0.5 will drive learning" in warning[0]


def test_wandb_offline_run_holds_the_ppo_metrics(ppo_run):
    out, _, _ = ppo_run
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list(out.iterdir())
    # wandb >= 0.2x writes its records from a Go core and ships no Python reader for them; the
    # history records hold each logged key as text, once per logged step.
    records = runs[0].read_bytes()
    for key in (b"objective/raw_scores", b"objective/kl_coef", b"loss/value"):
        assert records.count(key) >= 4, (key, records.count(key))


def test_token_reaches_no_file_of_the_wandb_run(ppo_run):
    """Tracker config, wandb run files and metadata, summaries, checkpoints, logs: no token anywhere."""
    out, _, result = ppo_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".wandb") for p in files) and any(p.parent.name.startswith("checkpoint-") for p in files)
    leaked = [str(p.relative_to(out)) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked
    assert SECRET not in result.stdout and SECRET not in result.stderr


def test_resuming_a_finished_run_changes_nothing(ppo_run):
    out, args, _ = ppo_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    result = subprocess.run([sys.executable, "rl_training.py", *args, "--resume_from_checkpoint", "true"], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env=env(WANDB_MODE="offline"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already finished at step 4" in result.stderr and "nothing to do" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_log_with_a_missing_package_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    args = rl_training.ScriptArguments(log_with="wandb")
    from rlhf.errors import UserError

    with pytest.raises(UserError, match="--log_with wandb: the wandb package is not installed"):
        args.check()


def test_grpo_with_a_reward_function_and_no_reward_model(tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(DEMO_TRAIN.read_text().splitlines(keepends=True)[:40]))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "rl_training.py", "--model_name", tiny_model_dir, "--reward_fn", "rlhf.demo_rule:rule_reward",
         "--advantage_estimator", "grpo", "--num_generations", "2", "--train_file", str(data), "--device", "cpu",
         "--batch_size", "4", "--mini_batch_size", "2", "--gradient_accumulation_steps", "1", "--ppo_epochs", "1",
         "--output_max_length", "8", "--steps", "2", "--eval_samples", "2", "--batched_gen", "True",
         "--use_kl_loss", "--kl_coef", "0.05", "--output_dir", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env())
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["result"]["reward_source"] == "--reward_fn rlhf.demo_rule:rule_reward"
    assert summary["algorithm"] == "grpo" and summary["precision"] == "fp32"  # the report's heading and table
    assert "GRPO: 2 steps of 4 rollouts" in result.stderr and "PPO:" not in result.stderr
    assert 0.0 <= summary["result"]["reward_score"]["after"] <= 1.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "loss/value" not in rows[0] and "loss/kl" in rows[0]
    assert rows[0]["objective/kl_coef"] == 0.05
    assert (out / "adapter_model.safetensors").is_file() and not (out / "value_head.safetensors").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--advantage_estimator", "grpo", "--num_generations", "1"], "--num_generations 1: grpo needs at least 2"),
    (["--reward_fn", "rlhf_nosuch_rules:score"], "--reward_fn rlhf_nosuch_rules:score: importing"),
    (["--top_k", "50"], "--top_k 50"),
    (["--best_of_n", "1"], "--best_of_n 1: use 0 (off) or n >= 2"),
    (["--eval_batch_size", "-1"], "--eval_batch_size -1 must be >= 0"),
])
def test_bad_rl_flags_exit_2_with_one_line_before_any_model_loads(flags, fragment, tmp_path):
    # The model path does not exist: a check that ran after loading would report that instead.
    result = subprocess.run(
        [sys.executable, "rl_training.py", "--model_name", str(tmp_path / "no_model"), "--reward_model_name",
         str(tmp_path / "no_rm"), "--train_file", str(DEMO_TRAIN), "--output_dir", str(tmp_path / "out"),
         "--device", "cpu", "--batch_size", "4", "--mini_batch_size", "2", "--gradient_accumulation_steps", "1",
         *flags], cwd=REPO, capture_output=True, text=True, timeout=300, env=env())
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and fragment in lines[-1], lines[-3:]
