"""rlhf/advantages.py: where the KL goes for the critic-free estimators, and --scale_rewards."""

from __future__ import annotations

import pytest
import torch

from rlhf.advantages import ADVANTAGE_ESTIMATORS, AdvantageInputs, group_advantages


def inputs(scores, kl_per_seq, beta, estimator_kwargs=None):
    """One token per response carries the whole sequence KL (the estimators only use its sum)."""
    kl = torch.zeros(len(scores), 3)
    kl[:, 0] = torch.tensor(kl_per_seq)
    return AdvantageInputs(scores=torch.tensor(scores), kl=kl, mask=torch.ones(len(scores), 3), kl_coef=beta,
                           group_size=4, **(estimator_kwargs or {}))


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_equal_scores_get_advantages_of_the_kl_terms_size(estimator):
    # The case: scores [1, 1, 1, 1], KL 0.083-0.102, beta 0.05. Dividing the KL by the group's std
    # (as before) gave [-0.40, -0.01, -0.72, 1.13]; its weight must be beta.
    kl = [0.090, 0.083, 0.102, 0.095]
    advantages, returns = ADVANTAGE_ESTIMATORS[estimator](inputs([1.0] * 4, kl, 0.05))
    assert returns is None
    per_response = advantages[:, 0]
    assert per_response.abs().max() < 0.05 * 0.02, per_response  # beta x the KL's spread (0.019)
    assert torch.equal(advantages[:, 1], per_response)  # every token of a response, the same advantage
    assert per_response.argmax() == 1 and per_response.argmin() == 2  # less KL is better
    centred = -0.05 * (torch.tensor(kl) - sum(kl) / 4)
    expected = centred * (4 / 3 if estimator == "rloo" else 1)  # leave-one-out: mean of the other three
    torch.testing.assert_close(per_response, expected)


def test_grpo_kl_weight_does_not_depend_on_the_score_spread():
    kl = [0.3, 0.1, 0.2, 0.6]
    for scores in ([0.0, 1.0, 0.5, 0.2], [0.0, 0.001, 0.0005, 0.0002]):  # the second: std 1000x smaller
        with_kl = ADVANTAGE_ESTIMATORS["grpo"](inputs(scores, kl, 0.1))[0][:, 0]
        without = ADVANTAGE_ESTIMATORS["grpo"](inputs(scores, kl, 0.0))[0][:, 0]
        torch.testing.assert_close(with_kl - without, -0.1 * (torch.tensor(kl) - 0.3))


def test_scale_rewards_group_batch_none():
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 30.0])
    groups = returns.reshape(2, 4)
    centred = groups - groups.mean(1, keepdim=True)
    torch.testing.assert_close(group_advantages(returns, 4, "grpo", scale_rewards="none"), centred.reshape(-1))
    torch.testing.assert_close(group_advantages(returns, 4, "grpo", scale_rewards="batch"),
                               (centred / (returns.std() + 1e-4)).reshape(-1))
    torch.testing.assert_close(group_advantages(returns, 4, "grpo", scale_rewards="group"),
                               (centred / (groups.std(1, keepdim=True) + 1e-4)).reshape(-1))
    with pytest.raises(ValueError):
        group_advantages(returns, 4, "grpo", scale_rewards="global")
