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
