"""Unit tests of rlhf.report's result block (the end-to-end report is exercised in test_rl_training.py)."""
from rlhf.report import heldout_result


def test_result_block_leads_with_raw_score_and_says_worse():
    before = {"eval/raw_scores": 0.8, "eval/kl": 0.0, "eval/response_length": 30.0, "eval/scores": 1.0}
    after = {"eval/raw_scores": 0.6, "eval/kl": 0.4, "eval/response_length": 20.0, "eval/scores": 2.0}
    result = heldout_result(before, after, "reward-model", extra={"training_score": "eval/scores"})
    assert list(result) == ["reward_score", "reward_source", "kl_to_reference", "response_length",
                            "training_score", "verdict"]
    assert abs(result["reward_score"]["change"] - (0.6 - 0.8)) < 1e-12
    assert result["training_score"]["change"] == 1.0
    assert result["verdict"] == "WORSE"  # the shaped training score rose; the raw score decides


def test_result_block_without_a_score_is_not_evaluated():
    result = heldout_result({}, {"eval/response_length": 12.0}, "reward-function")
    assert result["reward_score"] == {"before": None, "after": None, "change": None}
    assert result["response_length"]["after"] == 12.0
    assert result["verdict"] == "not evaluated"


def test_paired_change_is_the_mean_difference_and_its_standard_error():
    from rlhf.report import paired_change

    delta, error = paired_change([0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 4.0, 3.0])  # differences 1, 0, 2, 0
    assert abs(delta - 0.75) < 1e-12
    assert abs(error - (((0.25**2 + 0.75**2 + 1.25**2 + 0.75**2) / 3) ** 0.5) / 2) < 1e-12
    assert paired_change([1.0], [2.0]) is None


def _write_run(run_dir, before_scores, after_scores, before_text, after_text):
    import json

    run_dir.mkdir()
    samples = [{"prompt": "<|im_start|>user\nWhat do camels eat?<|im_end|>\n<|im_start|>assistant\n",
                "response_before": before_text, "response_after": after_text,
                "rm_score_before": b, "rm_score_after": a} for b, a in zip(before_scores, after_scores)]
    (run_dir / "eval_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    summary = {"steps": 3, "paths": {},
               "eval_before": {"eval/raw_scores": sum(before_scores) / len(before_scores)},
               "eval_after": {"eval/raw_scores": sum(after_scores) / len(after_scores)}}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_report_marks_a_change_inside_two_standard_errors_as_noise(tmp_path):
    from rlhf.report import build_report

    _write_run(tmp_path / "noise", [0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.2], "Camels eat grass.", "Camels eat grass.")
    text, numbers = build_report(None, tmp_path / "noise")
    assert abs(numbers["reward_change"]["mean"] - 0.05) < 1e-12
    assert "| +0.050 +- " in text and "(within noise)" in text
    assert numbers["rule_change"] == {"mean": 0.0, "standard_error": 0.0}  # same answers: no change, no error

    _write_run(tmp_path / "real", [0.0, 0.1, 0.2, 0.3], [1.0, 1.2, 1.1, 1.3], "Camels eat grass.", "Camels eat grass.")
    text, numbers = build_report(None, tmp_path / "real")
    row = next(line for line in text.splitlines() if line.startswith("| mean reward-model score"))
    assert "+1.000 +- " in row and "within noise" not in row
