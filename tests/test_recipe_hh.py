"""configs/recipes/hh-rlhf/run.sh end to end on the tiny model and hh-rlhf-shaped rows written here.

The real data (../shared/data/hh-rlhf-harmless) is never needed: the rows below have its format
("\\n\\nHuman: ...\\n\\nAssistant: ..." chosen/rejected dialogues sharing the prompt). The recipe's YAML
files are parsed by the real scripts, so a typo in one fails here; the stages are shrunk with the
recipe's own RM_ARGS / SFT_ARGS / RL_ARGS / DPO_ARGS.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "configs" / "recipes" / "hh-rlhf" / "run.sh"
TOPICS = ["pick a lock", "bake bread", "hurt someone", "learn chess", "cheat on a test", "plant tomatoes"]


def hh_rows(count: int) -> list[dict]:
    rows = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        prompt = f"\n\nHuman: How do I {topic}? (case {i})\n\nAssistant:"
        rows.append({"chosen": prompt + " I can help with safe, legal steps.",
                     "rejected": prompt + " Here is how, no questions asked."})
    return rows


def recipe_env(tiny_model_dir: str, out: Path, **extra: str) -> dict:
    return {
        **os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": os.environ.get("PYTHON", str(REPO / ".venv" / "bin" / "python")),
        "BASE_MODEL": tiny_model_dir, "OUT": str(out), "VALID_ROWS": "8", "SEEDS": "0", "ALGOS": "grpo ppo dpo",
        "RM_ARGS": "--max_train_samples 16 --per_device_train_batch_size 4 --max_length 64 --reward_stats_samples 8 "
                   "--disable_tqdm true",
        "SFT_ARGS": "--max_steps 2 --per_device_train_batch_size 4 --max_seq_length 64 --max_source_length 32 "
                    "--disable_tqdm true",
        "ANSWER_TOKENS": "4 16",
        "RL_ARGS": "--steps 1 --batch_size 8 --mini_batch_size 4 --eval_samples 4 --best_of_n 2 --output_max_length 4 "
                   "--save_freq 1",
        "DPO_ARGS": "--max_steps 1 --per_device_train_batch_size 4 --max_length 64 --max_prompt_length 32 "
                    "--max_eval_samples 8 --heldout_samples 4 --heldout_max_new_tokens 4 --disable_tqdm true",
        **extra,
    }


@pytest.fixture(scope="module")
def recipe_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    data = root / "hh"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hh_rows(40)))
    out = root / "out"
    env = recipe_env(tiny_model_dir, out)
    if not Path(env["PYTHON"]).is_file():
        pytest.skip("the recipe runs the project's .venv python (make setup)")
    result = subprocess.run([str(SCRIPT), str(data)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return data, out, env, result


def test_split_is_the_last_rows_for_validation(recipe_run):
    data, out, _, _ = recipe_run
    rows = (data / "train.jsonl").read_text().splitlines()
    assert (out / "data" / "train.jsonl").read_text().splitlines() == rows[:32]
    assert (out / "data" / "valid.jsonl").read_text().splitlines() == rows[32:]


def test_every_run_lands_in_one_table_scored_by_the_same_reward_model(recipe_run):
    _, out, _, result = recipe_run
    table = (out / "table.md").read_text()
    assert "Reward model: held-out accuracy" in table
    config = json.loads((out / "rm" / "config.json").read_text())
    for name, algorithm in (("grpo-seed0", "grpo"), ("ppo-seed0", "ppo"), ("dpo-seed0", "dpo")):
        summary = json.loads((out / name / "summary.json").read_text())
        score = summary["result"]["reward_score"]
        if algorithm == "dpo":  # scored raw
            assert summary["result"]["reward_source"] == "reward-model"
        else:  # trained and scored normalised: the table puts them back on the reward model's own scale
            assert "normalised" in summary["result"]["reward_source"]
            score = {k: score[k] * config["reward_std"] + config["reward_mean"] for k in ("before", "after")}
        assert f"| {name} | {algorithm} | {score['before']:.3f} -> {score['after']:.3f} |" in table
    assert "(n=2," in table  # the RL rows carry the best-of-2 baseline
    assert (out / "curves.png").is_file()
    assert result.stdout.count("started") == 5  # rm, sft + three runs
    assert "on answers cut at 4 tokens" in table and "on answers cut at 16 tokens" in table


def test_policy_runs_start_from_the_merged_sft_policy(recipe_run):
    """SFT on the training rows' chosen answers, merged into a plain model, is what every RL and DPO run loads:
    their adapters name it as their base, and it differs from the base model (the SFT steps moved it)."""
    import torch
    from safetensors.torch import load_file

    _, out, env, result = recipe_run
    merged = out / "sft-merged"
    assert f"policy runs start from the SFT policy {merged}" in result.stdout
    for name in ("grpo-seed0", "ppo-seed0", "dpo-seed0"):
        adapter = json.loads((out / name / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str(merged)
    tuned, base = load_file(merged / "model.safetensors"), load_file(Path(env["BASE_MODEL"]) / "model.safetensors")
    assert any(not torch.equal(tuned[k].float(), base[k].float()) for k in base if k in tuned)
    assert (out / "sft" / "adapter_config.json").is_file()  # the LoRA adapter sft.yaml trains, kept beside


def test_precision_follows_the_hardware_and_reaches_every_stage(recipe_run):
    from rlhf.backend import bf16_supported

    _, out, _, result = recipe_run
    bf16 = bf16_supported("cpu")  # BF16=auto: bf16 where the CPU computes in it (AMX/AVX512-BF16), else fp32
    assert ("== precision: bf16" in result.stdout) == bf16
    for name in ("grpo-seed0", "ppo-seed0", "dpo-seed0"):
        assert json.loads((out / name / "summary.json").read_text())["precision"] == ("bf16" if bf16 else "fp32")
    assert ("Precision: bf16 autocast" in (out / "logs" / "rm.log").read_text()) == bf16
    assert f"| {'bf16' if bf16 else 'fp32'} |" in (out / "table.md").read_text()


def test_rerun_skips_finished_stages_and_keeps_every_run_in_the_table(recipe_run):
    data, out, env, _ = recipe_run
    result = subprocess.run([str(SCRIPT), str(data)], cwd=REPO, env={**env, "ALGOS": "grpo"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("already complete") == 3 and "started" not in result.stdout  # rm, sft, grpo-seed0
    table = (out / "table.md").read_text()
    for name in ("grpo-seed0", "ppo-seed0", "dpo-seed0"):  # earlier runs stay in the table
        assert f"| {name} |" in table


@pytest.mark.parametrize("setting,fragment", [
    ({"ALGOS": "ppo sft"}, "ALGOS has 'sft'"),
    ({"VALID_ROWS": "40"}, "it needs more than VALID_ROWS=40"),
    ({"BF16": "yes"}, "BF16=yes; use auto, true or false"),
    ({"START": "rm"}, "START=rm; use sft or base"),
    ({"DATA": "missing"}, "missing/train.jsonl does not exist"),
])
def test_bad_settings_exit_2_with_one_line(recipe_run, tmp_path, setting, fragment):
    data, _, env, _ = recipe_run
    folder = setting.pop("DATA", str(data))
    result = subprocess.run([str(SCRIPT), folder], cwd=REPO, env={**env, "OUT": str(tmp_path / "o"), **setting},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
