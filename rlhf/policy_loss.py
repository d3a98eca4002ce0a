"""Policy losses and their aggregation, as registered pure functions (verl's ``core_algos`` layout).

Two registries, each entry one short function:

``POLICY_LOSSES`` (``--importance_sampling_level``): the per-token clipped surrogate.
    token      PPO's ratio per token (Schulman et al. 2017), clip-higher via ``epsilon_high`` (DAPO)
    sequence   GSPO (Zheng et al. 2025): one ratio per sequence, the geometric mean of its token ratios

``LOSS_AGGREGATIONS`` (``--loss_type``, TRL 1.16 ``GRPOConfig``'s names and meanings): how per-token
losses become the number that is differentiated, for ONE minibatch of an accumulation window, so that
the window's minibatches summed give the window's objective whatever the split.
    dapo       sum over the window's tokens / the window's token count (all processes): a token mean
               over everything one optimizer step sees. Split-invariant.
    grpo       mean over the window's sequences of each sequence's token mean (length-biased: a short
               answer's tokens weigh more). Split-invariant for equal minibatches.
    dr_grpo    sum over tokens / (sequences in the window x max completion length) (Liu et al. 2025).
    bnpo       each minibatch's own token mean, divided by the accumulation steps: what the reference
               (TRL 0.11's PPO, ``masked_mean`` per minibatch) did. NOT split-invariant: with
               ``--mini_batch_size 1`` it is a per-sequence mean, with the whole window one token mean.

Both registries return plain tensors; the loss statistics that early stopping and the ratio-explosion
skip read come back as a typed ``PolicyLossResult``, not as dict keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rlhf.sequences import masked_mean

POLICY_LOSSES: dict[str, Callable[..., "PolicyLossResult"]] = {}
LOSS_AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {}


def register_policy_loss(name: str):
    def register(fn):
        POLICY_LOSSES[name] = fn
        return fn

    return register


def register_aggregation(name: str):
    def register(fn):
        LOSS_AGGREGATIONS[name] = fn
        return fn

    return register


@dataclass(frozen=True)
class LossWindow:
    """Normalisers of one accumulation window (the minibatches of one optimizer step).

    ``tokens``: loss tokens in the window on every process, divided by the number of processes
    (gradients are averaged over processes, so this makes the step a token mean over all of them,
    as TRL's ``num_items_in_batch / num_processes``); ``sequences``: sequences per process in the
    window; ``minibatches``: the accumulation steps; ``max_length``: the completion length limit."""

    tokens: float
    sequences: int
    minibatches: int
    max_length: int


@dataclass
class PolicyLossResult:
    """Per-token policy loss (B, T) (or (B, T) broadcast from a per-sequence ratio) and its statistics
    over the minibatch's loss tokens (detached floats-as-tensors)."""

    per_token_loss: torch.Tensor
    ratio: torch.Tensor  # the importance weights, differentiable: (B, T) per token, (B, 1) per sequence
    approxkl: torch.Tensor
    clipfrac: torch.Tensor
    ratio_mean: torch.Tensor


def _clipped(log_weights: torch.Tensor, log_ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
             epsilon_low: float, epsilon_high: float) -> PolicyLossResult:
    ratio = torch.exp(log_weights)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    loss1 = -advantages * ratio
    loss2 = -advantages * clipped
    per_token = torch.max(loss1, loss2).expand_as(mask) if ratio.shape != mask.shape else torch.max(loss1, loss2)
    mask = mask.float()
    return PolicyLossResult(
        per_token_loss=per_token,
        ratio=ratio,
        approxkl=0.5 * masked_mean(log_ratio.detach() ** 2, mask),
        clipfrac=masked_mean((loss2 > loss1).float().expand_as(mask), mask).detach(),
        ratio_mean=masked_mean(ratio.detach().expand_as(mask), mask),
    )


@register_policy_loss("token")
def token_clipped_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                       mask: torch.Tensor, epsilon_low: float, epsilon_high: float) -> PolicyLossResult:
    """PPO's clipped surrogate with one importance ratio per token; ``advantages`` (B, T)."""
    log_ratio = new_logprobs - old_logprobs
    return _clipped(log_ratio, log_ratio, advantages, mask, epsilon_low, epsilon_high)


@register_policy_loss("sequence")
def sequence_clipped_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                          mask: torch.Tensor, epsilon_low: float, epsilon_high: float) -> PolicyLossResult:
    """GSPO: the ratio of a sequence is ``exp(mean_t log ratio_t)`` over its tokens, clipped once per sequence
    (GSPO's paper uses a far smaller epsilon than PPO's, e.g. 3e-4 / 4e-4)."""
    log_ratio = new_logprobs - old_logprobs
    log_weights = masked_mean(log_ratio, mask, dim=-1).unsqueeze(-1)
    return _clipped(log_weights, log_ratio, advantages, mask, epsilon_low, epsilon_high)


@register_aggregation("dapo")
def dapo(per_token: torch.Tensor, mask: torch.Tensor, window: LossWindow) -> torch.Tensor:
    return (per_token * mask).sum() / max(window.tokens, 1.0)


@register_aggregation("grpo")
def grpo(per_token: torch.Tensor, mask: torch.Tensor, window: LossWindow) -> torch.Tensor:
    return masked_mean(per_token, mask, dim=-1).sum() / window.sequences


@register_aggregation("dr_grpo")
def dr_grpo(per_token: torch.Tensor, mask: torch.Tensor, window: LossWindow) -> torch.Tensor:
    return (per_token * mask).sum() / (window.sequences * window.max_length)


@register_aggregation("bnpo")
def bnpo(per_token: torch.Tensor, mask: torch.Tensor, window: LossWindow) -> torch.Tensor:
    return masked_mean(per_token, mask) / window.minibatches


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate ``exp(ref - logp) - (ref - logp) - 1`` (Schulman's k3:
    unbiased, never negative), as GRPO puts it in the loss."""
    log_ratio = ref_logprobs.float() - logprobs.float()
    return torch.exp(log_ratio) - log_ratio - 1


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       cliprange_value: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``0.5 * max((V - R)^2, (clip(V, V_old +- c) - R)^2)`` (aggregate it like the policy loss),
    and where the clipped term was the larger (bool, for ``value/clipfrac``)."""
    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped, clipped = (values - returns) ** 2, (values_clipped - returns) ** 2
    return 0.5 * torch.max(unclipped, clipped), (clipped > unclipped).detach()
