"""rlhf.run_table: the comparison table reads each run's own numbers and says plainly what happened."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.errors import UserError
from rlhf.run_table import build_table

REPO = Path(__file__).resolve().parents[1]


def write_run(directory: Path, algorithm: str, before: float, after: float, best: float | None = None,
              steps: int = 20, wall: float | None = 600.0, per_prompt_changes: list[float] | None = None,
              finished: tuple[float, float] | None = None) -> Path:
    """A finished run's files; ``per_prompt_changes``: eval_samples.jsonl rows whose scores move by these
    (their mean should be after - before, as a real run's are)."""
    directory.mkdir(parents=True)
    if per_prompt_changes is not None:
        rows = [{"prompt": f"p{i}", "rm_score_before": before, "rm_score_after": before + c}
                for i, c in enumerate(per_prompt_changes)]
        (directory / "eval_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = {
        "reward_score": {"before": before, "after": after, "change": after - before},
        "reward_source": "reward-model",
        "kl_to_reference": {"before": 0.0, "after": 1.25, "change": 1.25},
        "response_length": {"before": 47.0, "after": 45.5, "change": -1.5},
    }
    if finished is not None:
        result["finished"] = {"before": finished[0], "after": finished[1], "change": finished[1] - finished[0]}
    if best is not None:
        result["best_of_n"] = {"n": 4, "score": best, "beaten": after > best}
    summary = {"result": result, "algorithm": algorithm, "steps": steps,
               **({"wall_time_s": wall} if wall is not None else {})}
    (directory / "summary.json").write_text(json.dumps(summary))
    rows = [{"step": s, "objective/raw_scores": before + s * 0.01, "objective/kl": 0.1 * s} for s in range(1, 4)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def test_rows_lead_with_the_raw_score_and_say_when_the_baseline_was_not_beaten(tmp_path):
    runs = [write_run(tmp_path / "grpo-seed0", "grpo", 0.50, 0.90, best=0.80, finished=(0.625, 0.25)),
            write_run(tmp_path / "grpo-seed1", "grpo", 0.60, 0.70, best=0.85),
            write_run(tmp_path / "dpo-seed0", "dpo", 0.40, 0.30, wall=None)]
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "eval_results.json").write_text(json.dumps({"eval_accuracy": 0.6912}))
    table = build_table(runs, tmp_path / "rm")
    assert "held-out accuracy 0.691" in table
    assert ("| grpo-seed0 | grpo | 0.500 -> 0.900 | +0.400 | 0.800 (n=4, beaten) | 1.25 | 47.0 -> 45.5 | 62% -> 25% "
            "| n/a | 20 | 10.0 min |") in table
    assert "| 47.0 -> 45.5 | n/a -> n/a | n/a | 20 |" in table  # a run written before the finish fraction was recorded
    assert "0.850 (n=4, NOT beaten)" in table
    assert "| dpo-seed0 | dpo | 0.400 -> 0.300 | -0.100 | n/a |" in table and "| n/a |" in table
    assert ("- grpo: mean change +0.250 over 2 run(s), spread 0.300; raised in every run, but by less than the "
            "runs' spread") in table
    assert "- dpo: mean change -0.100 over 1 run(s), spread 0.000; LOWERED in every run" in table


def test_mixed_signs_read_as_noise(tmp_path):
    runs = [write_run(tmp_path / "ppo-seed0", "ppo", 0.5, 0.6), write_run(tmp_path / "ppo-seed1", "ppo", 0.5, 0.4)]
    assert "mixed: not distinguishable from noise" in build_table(runs, None)
    steady = [write_run(tmp_path / "rloo-seed0", "rloo", 0.5, 0.9), write_run(tmp_path / "rloo-seed1", "rloo", 0.5, 0.8)]
    assert "spread 0.100; raised in every run, by more than the runs' spread" in build_table(steady, None)


def test_change_carries_its_paired_standard_error_and_the_verdict_weighs_it(tmp_path):
    """s.e. = stdev(after - before per prompt) / sqrt(prompts); an algorithm's = sqrt(sum s.e.^2) / runs."""
    steady = [write_run(tmp_path / "rloo-seed0", "rloo", 0.5, 0.75, per_prompt_changes=[0.1, 0.3, 0.2, 0.4]),
              write_run(tmp_path / "rloo-seed1", "rloo", 0.5, 0.75, per_prompt_changes=[0.2, 0.3, 0.25, 0.25])]
    table = build_table(steady, None)
    assert "| +0.250 +- 0.065 |" in table and "| +0.250 +- 0.020 |" in table
    assert ("- rloo: mean change +0.250 +- 0.034 over 2 run(s), spread 0.000; raised in every run, by more than "
            "the runs' spread; beyond twice the evaluation's standard error (0.068)") in table
    noisy = [write_run(tmp_path / "grpo-seed0", "grpo", 0.5, 0.7, per_prompt_changes=[1.0, -0.5, 0.5, -0.2]),
             write_run(tmp_path / "grpo-seed1", "grpo", 0.5, 0.71, per_prompt_changes=[1.0, -0.5, 0.5, -0.16])]
    line = next(l for l in build_table(noisy, None).splitlines() if l.startswith("- grpo"))
    assert "raised in every run, by more than the runs' spread; within twice" in line
    assert line.endswith("not distinguishable from evaluation noise")


def test_normalised_runs_are_put_back_on_the_reward_models_scale(tmp_path):
    """A --normalize_reward run's scores z map to z * std + mean (changes: * std), so DPO's raw rows compare."""
    run = write_run(tmp_path / "ppo-seed0", "ppo", 0.0, 0.5, best=1.0, per_prompt_changes=[0.25, 0.75])
    summary = json.loads((run / "summary.json").read_text())
    summary["result"]["reward_source"] = "reward-model (normalised with its stored mean/std)"
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(UserError, match="pass --rm_dir"):
        build_table([run], None)
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "eval_results.json").write_text(json.dumps({"eval_accuracy": 0.7}))
    (tmp_path / "rm" / "config.json").write_text(json.dumps({"reward_mean": 2.0, "reward_std": 4.0}))
    table = build_table([run], tmp_path / "rm")
    # s.e. in normalised units stdev(0.25, 0.75) / sqrt(2) = 0.25, times std 4
    assert "| ppo-seed0 | ppo | 2.000 -> 4.000 | +2.000 +- 1.000 | 6.000 (n=4, NOT beaten) |" in table


def test_a_run_without_a_reward_model_score_is_refused_with_the_fix(tmp_path):
    (tmp_path / "dpo").mkdir()
    (tmp_path / "dpo" / "summary.json").write_text(json.dumps({"algorithm": "dpo", "eval_before": {}}))
    with pytest.raises(UserError, match="--heldout_reward_model"):
        build_table([tmp_path / "dpo"], None)
    with pytest.raises(UserError, match="is .* a finished"):
        build_table([tmp_path / "missing"], None)


def test_cli_writes_the_table_and_one_plot_of_all_runs(tmp_path):
    runs = [write_run(tmp_path / f"rloo-seed{s}", "rloo", 0.5, 0.7 + s / 10, best=0.6) for s in (0, 1)]
    output = tmp_path / "table.md"
    result = subprocess.run([sys.executable, "-m", "rlhf.run_table", "--runs", *map(str, runs), "--output", str(output)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert output.read_text() in result.stdout and "rloo-seed1" in output.read_text()
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_baseline_margin_is_paired_and_collapsed_answers_show(tmp_path):
    """The best-of-n cell carries the run's paired margin (after - best-of-n per prompt, in RM units) and says
    'within noise' inside two standard errors; the distinct-answers cell counts answers after training,
    whitespace-normalised, so a policy that says "I don't know." to every prompt reads 1/4."""
    clear = write_run(tmp_path / "grpo-seed0", "grpo", 0.2, 1.2, best=0.7)
    close = write_run(tmp_path / "grpo-seed1", "grpo", 0.2, 0.75, best=0.7)
    for run, margin, error, answers in ((clear, 0.5, 0.07, ["I don't know."] * 3 + ["I  don't know. "]),
                                        (close, 0.05, 0.04, ["a", "b", "c", "a"])):
        summary = json.loads((run / "summary.json").read_text())
        summary["result"]["best_of_n"].update(margin=margin, standard_error=error)
        summary["result"]["reward_source"] = "reward-model (normalised with its stored mean/std)"
        (run / "summary.json").write_text(json.dumps(summary))
        rows = [{"prompt": f"p{i}", "response_after": a, "rm_score_before": 0.2, "rm_score_after": 0.3}
                for i, a in enumerate(answers)]
        (run / "eval_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "eval_results.json").write_text(json.dumps({"eval_accuracy": 0.683}))
    (rm / "config.json").write_text(json.dumps({"reward_mean": 1.0, "reward_std": 2.0}))
    (rm / "accuracy_by_answer_length.json").write_text(json.dumps(
        {"pairs": 300, "whole_answers": {"accuracy": 0.687}, "answers_cut_at_128": {"accuracy": 0.673, "cut": 0.11},
         "answers_cut_at_48": {"accuracy": 0.57, "cut": 0.5}}))
    table = build_table([clear, close], rm)
    assert ("held-out accuracy 0.683 (" + str(rm) + "); on answers cut at 48 tokens 0.570 (50% of pairs cut); "
            "on answers cut at 128 tokens 0.673 (11% of pairs cut)") in table
    # scores z * 2 + 1, margins and errors * 2
    assert "| 2.400 (n=4, beaten by +1.000 +- 0.140) |" in table and "| 62% -> 25% |" not in table
    assert "| 2.400 (n=4, beaten by +0.100 +- 0.080, within noise) |" in table
    assert "| n/a -> n/a | 1/4 | 20 |" in table and "| n/a -> n/a | 3/4 | 20 |" in table
