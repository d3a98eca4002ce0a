"""Rewards and advantage estimators (float32), each estimator one registered function.

``ADVANTAGE_ESTIMATORS`` (``--advantage_estimator``): ``fn(inputs: AdvantageInputs) -> (advantages (B, T),
returns (B, T) or None)``.

    gae    PPO with a value head: per-token rewards ``-beta * KL_t`` plus the score on the last token,
           generalised advantage estimation, whitened (TRL 0.11 / Ziegler et al. 2019).
    grpo   critic-free (Shao et al. 2024): the scores standardised within each prompt's group
           (``--scale_rewards group|batch|none``; ``none`` is Dr. GRPO). With the KL in the reward
           its penalty ``-beta * KL(sequence)`` is centred within the group and ADDED after the
           scaling, so its weight is beta whatever the group's spread: dividing it by the std too made a
           group of equal scores get O(1) advantages from KL noise alone, and beta / std unbounded.
    rloo   critic-free (Ahmadian et al. 2024): ``R - mean(the other k - 1 returns)`` with
           ``R = score - beta * KL(sequence)`` (the KL folded into the reward before the leave-one-out
           baseline, as TRL's RLOO: no scaling, so beta keeps its meaning).

With ``--use_kl_loss`` beta is 0 here and the KL is a loss term (``rlhf.policy_loss.k3_kl``) instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from rlhf.sequences import masked_mean

ADVANTAGE_ESTIMATORS: dict[str, Callable[["AdvantageInputs"], tuple[torch.Tensor, Optional[torch.Tensor]]]] = {}
SCALE_REWARDS = ("group", "batch", "none")


def register_estimator(name: str):
    def register(fn):
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return register


@dataclass
class AdvantageInputs:
    """What an estimator may read. ``kl``: per-token ``logp - ref_logp`` (B, T), zero on padding;
    ``kl_coef``: beta of the reward penalty (0 when the KL is a loss term); ``values``: the critic's
    (B, T), None without one; ``group_size``: consecutive rows answering the same prompt."""

    scores: torch.Tensor
    kl: torch.Tensor
    mask: torch.Tensor
    kl_coef: float
    values: Optional[torch.Tensor] = None
    group_size: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    scale_rewards: str = "group"


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over masked entries; Bessel-corrected when ``unbiased`` (and n > 1)."""
    count = mask.sum()
    if count == 0:
        raise ValueError("masked_var needs at least one entry with mask=1")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased and count > 1:
        var = var * count / (count - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise masked entries to mean 0 / variance 1 (mean kept if not ``shift_mean``); others unchanged."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, x)


def compute_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                    kl_coef: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards ``-kl_coef * (logp - ref_logp)``, plus ``scores`` on each row's last real token.

    Returns ``(rewards, non_score_reward, kl)``, all (batch, width) float32 and zero on padding."""
    kl = (logprobs.float() - ref_logprobs.float()) * mask.float()
    non_score_reward = -kl_coef * kl
    return score_on_last_token(non_score_reward, scores, mask), non_score_reward, kl


def score_on_last_token(per_token: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A copy of ``per_token`` with each row's score added on its last real token (mask from lengths)."""
    positions = torch.arange(mask.shape[1], device=mask.device, dtype=torch.float32)
    last = (mask.float() * (positions + 1)).argmax(dim=1)  # index of the last 1 in each row
    rewards = per_token.clone()
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += scores.float().to(rewards.device)
    return rewards


def compute_gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` (V beyond the last real token is 0) and
    ``A_t = delta_t + gamma * lam * A_{t+1}``. Returns ``(advantages, returns)`` where
    ``returns = A + V`` uses the raw advantages and ``advantages`` are then whitened over the
    masked entries (``masked_whiten``). Both detached, float32."""
    mask = mask.float()
    values = values.float() * mask
    rewards = rewards.float() * mask
    width = rewards.shape[1]
    last_gae = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask
    returns = advantages + values
    advantages = masked_whiten(advantages, mask)
    return advantages.detach(), returns.detach()


def _groups(values: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2 or values.numel() % group_size:
        raise ValueError(f"{values.numel()} returns do not form groups of {group_size} >= 2")
    return values.float().reshape(-1, group_size)


def group_advantages(returns: torch.Tensor, group_size: int, estimator: str, eps: float = 1e-4,
                     scale_rewards: str = "group") -> torch.Tensor:
    """Critic-free advantage of each response from the returns of its group (consecutive rows).

    ``grpo``: ``(R - mean(group)) / (std + eps)``, std of the group (``scale_rewards="group"``, Bessel's
    correction, as TRL), of the whole batch (``"batch"``) or 1 (``"none"``). ``rloo``: ``R - mean(other
    k - 1)``. A group whose returns are all equal carries no signal: advantage 0 for both."""
    groups = _groups(returns, group_size)
    if estimator == "rloo":
        return (groups - (groups.sum(1, keepdim=True) - groups) / (group_size - 1)).reshape(-1)
    if estimator != "grpo":
        raise ValueError(f"unknown critic-free estimator {estimator!r}")
    centred = groups - groups.mean(1, keepdim=True)
    if scale_rewards == "group":
        centred = centred / (groups.std(1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        centred = centred / (groups.reshape(-1).std() + eps)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, not {scale_rewards!r}")
    return centred.reshape(-1)


@register_estimator("gae")
def gae_advantages(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    mask = inputs.mask.float()
    rewards = score_on_last_token(-inputs.kl_coef * inputs.kl, inputs.scores, mask)
    if inputs.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    return compute_gae(inputs.values, rewards, mask, inputs.gamma, inputs.lam)


@register_estimator("grpo")
def grpo_advantages(inputs: AdvantageInputs) -> tuple[torch.Tensor, None]:
    penalty = -inputs.kl_coef * inputs.kl.sum(1)
    advantages = group_advantages(inputs.scores, inputs.group_size, "grpo", scale_rewards=inputs.scale_rewards)
    groups = _groups(penalty, inputs.group_size)
    advantages = advantages + (groups - groups.mean(1, keepdim=True)).reshape(-1)  # beta's weight, unscaled
    return advantages.unsqueeze(1) * inputs.mask.float(), None


@register_estimator("rloo")
def rloo_advantages(inputs: AdvantageInputs) -> tuple[torch.Tensor, None]:
    returns = inputs.scores.float() - inputs.kl_coef * inputs.kl.sum(1)
    advantages = group_advantages(returns, inputs.group_size, "rloo")
    return advantages.unsqueeze(1) * inputs.mask.float(), None
