"""rlhf/reward_functions.py: importing --reward_fn, passing dataset columns, weights, and the one-line failures."""

from __future__ import annotations

import pytest
import torch

from rlhf.errors import TrainingDiverged, UserError
from rlhf.reward_functions import CombinedReward, import_reward_fn


def test_demo_rule_imports_and_scores():
    rule = import_reward_fn("rlhf.demo_rule:rule_reward")
    reward = CombinedReward(None, [("rlhf.demo_rule:rule_reward", rule)])
    scores = reward(["Question: What is Mars?\n\nAnswer: "], ["Great question! Mars is a planet."])
    assert scores.shape == (1,) and 0.0 <= scores.item() <= 1.0


def test_file_path_spec_and_columns_by_name(tmp_path):
    (tmp_path / "checker.py").write_text(
        "def exact(prompts, responses, answer):\n"
        "    return [float(r.strip() == a) for r, a in zip(responses, answer)]\n"
        "def everything(prompts, responses, **columns):\n"
        "    return [float(len(columns)) for _ in responses]\n"
    )
    exact = import_reward_fn(f"{tmp_path}/checker.py:exact")
    everything = import_reward_fn(f"{tmp_path}/checker.py:everything")
    columns = {"answer": ["4", "5"], "question": ["2+2?", "2+3?"]}
    reward = CombinedReward(None, [("exact", exact), ("everything", everything)], weights=[2.0, 0.5])
    scores = reward(["p", "p"], ["4", "6"], columns=columns)
    assert scores.tolist() == pytest.approx([2.0 * 1 + 0.5 * 2, 2.0 * 0 + 0.5 * 2])  # answer only vs all columns


def test_reward_model_and_function_are_weighted():
    model = lambda prompts, responses: torch.tensor([1.0, -1.0])  # noqa: E731 - a reward model's raw logits
    reward = CombinedReward(model, [("length", lambda p, r: [len(x) for x in r])], weights=[0.5, 1.0])
    assert reward(["a", "b"], ["xy", "z"]).tolist() == pytest.approx([0.5 + 2, -0.5 + 1])
    with pytest.raises(UserError, match="--reward_weights has 1 values for 2 rewards"):
        CombinedReward(model, [("length", len)], weights=[1.0])


@pytest.mark.parametrize("spec, fragment", [
    ("no_colon", "write it as module:function"),
    ("rlhf_nosuch_module:f", "importing rlhf_nosuch_module failed (ModuleNotFoundError"),
    ("rlhf.demo_rule:nosuch", "has no callable nosuch"),
    ("rlhf.demo_rule:TOPICS", "has no callable TOPICS"),
    ("/nonexistent/rules.py:f", "no such file"),
])
def test_bad_spec_is_a_user_error(spec, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        import_reward_fn(spec)


def fail(prompts, responses):
    raise KeyError("answer")


@pytest.mark.parametrize("function, fragment", [
    (fail, "raised KeyError: 'answer' at step 7"),
    (lambda p, r: [1.0], "returned 1 scores for 2 responses at step 7"),
    (lambda p, r: ["good", "bad"], "returned list"),
    (lambda p, r: 3.0, "returned float"),
    (lambda p, r: [float("inf"), 0.0], "infinite score at step 7"),
])
def test_misbehaving_function_stops_with_exit_3_naming_it_and_the_step(function, fragment):
    reward = CombinedReward(None, [("mine:f", function)])
    with pytest.raises(TrainingDiverged, match="--reward_fn mine:f") as caught:
        reward(["p", "q"], ["a", "b"], step=7)
    assert fragment in str(caught.value)
