"""PPO for causal language models (stage 3 of the pipeline), written here on purpose.

Why our own: TRL removed its PPO in trl 1.13, and the last releases that had one either need a
second full model copy for the value function (trl 1.12's ``experimental.ppo``, which also
cannot resume) or are tied to old transformers (trl <= 0.11's ``generate()/step()`` API that the
reference pipeline used). This module keeps that old, well-known API and algorithm (TRL 0.11's
``PPOTrainer``; "The N Implementation Details of RLHF with PPO", Huang et al. 2022; Ziegler et
al. 2019) in a few short, tested functions. It imports neither trl nor anything that differs
between transformers 4.55 / peft 0.17 (Gaudi stack) and transformers 5 / peft 0.21 (main stack).

Pieces (each a short function, unit-tested):
    masked_mean / masked_var / masked_whiten        statistics over real (mask=1) entries only
    logprobs_from_logits / entropy_from_logits      token log-probs and entropy from logits
    truncate_after_eos                              cut sampled responses after the first EOS
    compute_rewards                                 per-token KL penalty + score on the last token
    compute_gae                                     generalised advantage estimation (PPO)
    group_advantages                                GRPO / RLOO baselines from k responses per prompt
    k3_kl                                           KL estimate for the KL-in-the-loss variant
    AdaptiveKLController / FixedKLController        the KL coefficient beta
    clipped_policy_loss / clipped_value_loss        PPO's clipped surrogate and value losses
    ValueHead / PolicyWithValueHead                 one forward gives logits and values; the
                                                    reference is the same model, adapter disabled
    PPOConfig                                       every PPO setting, once (it is the CLI)
    PPOTrainer                                      generate, score, step, evaluate, checkpoints

The loop (``rl_training.py``), TRL 0.11 style::

    trainer = PPOTrainer(config, policy, tokenizer, reward_fn, accelerator)
    responses = trainer.generate(prompt_ids)            # list of 1-D tensors, cut after EOS
    scores = trainer.score(prompt_texts, responses)     # Scores(shaped, raw, eos_penalty)
    stats = trainer.step(prompt_ids, responses, scores)

Under DeepSpeed (``accelerator`` built with ``rlhf.zero.ppo_deepspeed_plugin``) the trainer drives the
engine ``prepare`` returns: ``engine.backward`` per minibatch, ``engine.step`` (clipping included) at
the end of each of PPO's accumulation windows, generation from gathered ZeRO-3 weights, saves gathered
on every rank (``save_policy``) and the engine's own checkpoint (``save_state`` / ``load_state``).

Every log-prob (rollout, reference, update) is ``log_softmax(logits / temperature)``, the
distribution the responses were sampled from, and old and new log-probs come from the same
dropout-free forward, so the ratio is exactly 1 until the first optimizer step of a PPO step.

Layout of a batch: prompts are LEFT-padded to a common width P and responses RIGHT-padded to a
width R, so response token t of every row sits in column P + t; the logits that predict it (and
the value of the state before it) are in column P + t - 1. Position ids come from the attention
mask (``cumsum - 1``), exactly as ``generate`` computes them, so padding never shifts positions.
Masks always come from lengths/positions, never from comparing ids with the pad id (the pad id
may equal the EOS id, as in SmolLM2).
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from rlhf.errors import UserError
from rlhf.modeling import merge_lora, position_ids_from_mask
from rlhf.reward import pad_sequences
from rlhf.zero import (
    PPOEngineSteps,
    deepspeed_engine,
    frozen_under_zero3,
    full_parameters,
    gathered_state_dict,
    is_partitioned,
    load_engine_state,
    plain_copy,
    save_engine_state,
)

VALUE_HEAD_FILE = "value_head.safetensors"
TRAINER_STATE_FILE = "ppo_state.pt"  # in a checkpoint: step, KL controller, optimizer, rank 0's RNG
RANK_RNG_FILE = "rng_state_{rank}.pth"  # in a checkpoint: the RNG state of each other rank

# --------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1 (over all dims, or along ``dim``)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


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
    """Normalise masked entries to mean 0 / variance 1 (mean kept if not ``shift_mean``).

    Entries where ``mask`` is 0 are returned unchanged.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, x)


# --------------------------------------------------------------------------------------------
# Log-probabilities, entropy, EOS handling
# --------------------------------------------------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., labels]`` computed in float32; shape of ``labels``."""
    logits = logits.float()
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution given by ``logits`` (last dim), float32."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def truncate_after_eos(
    response_ids: torch.Tensor, eos_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep each row up to and including its first EOS; pad (and mask) what follows.

    Returns ``(ids, mask, ended_with_eos)``: ``ids`` like ``response_ids`` with positions after
    the first EOS set to ``pad_token_id``, ``mask`` (long, 1 = real token, built from positions,
    so it is right even when the pad id equals the EOS id) and a bool per row telling whether
    the response contains an EOS (i.e. finished rather than running out of tokens).
    """
    batch, width = response_ids.shape
    is_eos = response_ids == eos_token_id
    ended = is_eos.any(dim=1)
    first_eos = torch.where(ended, is_eos.long().argmax(dim=1), torch.full_like(ended, width, dtype=torch.long))
    positions = torch.arange(width, device=response_ids.device).expand(batch, width)
    mask = (positions <= first_eos.unsqueeze(1)).long()
    ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_token_id))
    return ids, mask, ended


# --------------------------------------------------------------------------------------------
# Rewards and advantages (float32)
# --------------------------------------------------------------------------------------------


def compute_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards ``-kl_coef * (logp - ref_logp)``, plus ``scores`` on each row's last real token.

    Returns ``(rewards, non_score_reward, kl)``, all (batch, width) float32 and zero on padding.
    """
    mask = mask.float()
    kl = (logprobs.float() - ref_logprobs.float()) * mask
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    positions = torch.arange(mask.shape[1], device=mask.device, dtype=torch.float32)
    last = (mask * (positions + 1)).argmax(dim=1)  # index of the last 1 in each row
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.float().to(rewards.device)
    return rewards, non_score_reward, kl


def compute_gae(
    values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` (V beyond the last real token is 0) and
    ``A_t = delta_t + gamma * lam * A_{t+1}``. Returns ``(advantages, returns)`` where
    ``returns = A + V`` uses the raw advantages and ``advantages`` are then whitened over the
    masked entries (``masked_whiten``). Both detached, float32.
    """
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


def group_advantages(returns: torch.Tensor, group_size: int, estimator: str, eps: float = 1e-4) -> torch.Tensor:
    """Critic-free advantage of each response, from the returns of the ``group_size`` responses to
    the same prompt (consecutive rows).

    ``grpo``: ``(R - mean(group)) / (std(group) + eps)`` (Shao et al. 2024; std with Bessel's
    correction, as TRL's GRPOTrainer). ``rloo``: ``R - mean(other k - 1 responses)`` (Ahmadian et
    al. 2024). A group whose returns are all equal carries no signal: advantage 0 for both.
    """
    if group_size < 2 or returns.numel() % group_size:
        raise ValueError(f"{returns.numel()} returns do not form groups of {group_size} >= 2")
    groups = returns.float().reshape(-1, group_size)
    if estimator == "grpo":
        advantages = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + eps)
    elif estimator == "rloo":
        advantages = groups - (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    else:
        raise ValueError(f"unknown critic-free estimator {estimator!r}")
    return advantages.reshape(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate ``exp(ref - logp) - (ref - logp) - 1`` (Schulman's k3:
    unbiased, never negative), as GRPO puts it in the loss."""
    log_ratio = ref_logprobs.float() - logprobs.float()
    return torch.exp(log_ratio) - log_ratio - 1


# --------------------------------------------------------------------------------------------
# KL controllers
# --------------------------------------------------------------------------------------------


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, section 2.2).

    ``update(kl, n)``: ``e = clip(kl / target - 1, -0.2, 0.2)``; ``value *= 1 + e * n / horizon``.
    ``kl`` is the mean per-sequence KL of the batch and ``n`` the number of samples it covered.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = float(np.clip(current_kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        """Restore the coefficient reached; ``target`` and ``horizon`` stay as constructed (from the
        command line of the resumed run), so a resume with a new ``--target`` uses it."""
        self.value = float(state["value"])


class FixedKLController:
    """Constant KL coefficient; ``update`` does nothing."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def clipped_policy_loss(
    new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    cliprange: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, averaged over masked tokens; ``(loss, stats)`` with ``policy/approxkl``
    (0.5 * mean (log ratio)^2), ``policy/clipfrac`` and ``policy/ratio_mean``."""
    mask = mask.float()
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses1, pg_losses2), mask)
    stats = {
        "loss/policy": pg_loss.detach(),
        "policy/approxkl": 0.5 * masked_mean(log_ratio.detach() ** 2, mask),
        "policy/clipfrac": masked_mean((pg_losses2 > pg_losses1).float(), mask).detach(),
        "policy/ratio_mean": masked_mean(ratio.detach(), mask),
    }
    return pg_loss, stats


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
    cliprange_value: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``0.5 * max((V - R)^2, (clip(V, V_old +- c) - R)^2)`` averaged over masked tokens; ``(loss, stats)``
    with ``loss/value``, ``value/clipfrac`` and ``value/error`` (mean squared error against the returns)."""
    mask = mask.float()
    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (values_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    stats = {
        "loss/value": vf_loss.detach(),
        "value/clipfrac": masked_mean((vf_losses2 > vf_losses1).float(), mask).detach(),
        "value/error": masked_mean((values.detach() - returns) ** 2, mask),
    }
    return vf_loss, stats


# --------------------------------------------------------------------------------------------
# Model wrappers
# --------------------------------------------------------------------------------------------


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is part of both stacks; tolerate its absence for full fine-tuning
        return False
    return isinstance(model, PeftModel)


def _keep_kwargs(model: nn.Module, logits_to_keep: int) -> dict:
    """``{"logits_to_keep": n}`` when ``model``'s forward takes it (transformers causal LMs since 4.50),
    else ``{}`` (callers then slice the full logits)."""
    if not logits_to_keep:
        return {}
    import inspect

    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, nn.Module):  # DDP and similar wrappers
        inner = inner.module
    if _is_peft_model(inner):
        inner = inner.get_base_model()
    try:
        accepted = "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        accepted = False
    return {"logits_to_keep": logits_to_keep} if accepted else {}


class ValueHead(nn.Module):
    """Scalar value per position from the last hidden state: ``Linear(dropout(h))`` in float32, zero-initialised."""

    def __init__(self, hidden_size: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.summary = nn.Linear(hidden_size, 1)
        # Zero init: values start at 0, so early advantages are the plain rewards-to-go instead
        # of being drowned in the noise of a random head (as in OpenAI's lm-human-preferences).
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states.to(self.summary.weight.dtype)
        return self.summary(self.dropout(hidden_states)).squeeze(-1)


class PolicyWithValueHead(nn.Module):
    """A causal LM (plain or a peft ``PeftModel``) plus a ``ValueHead``.

    ``forward`` returns ``(logits, values)`` from ONE pass of the LM (values from the last
    hidden state). ``reference_logits`` gives the frozen reference policy's logits: the same
    model with its LoRA adapter disabled when ``model`` is a ``PeftModel`` (no second copy),
    otherwise the separate frozen ``ref_model`` (full fine-tuning). The reference model is
    deliberately not a submodule: it is not trained, saved or wrapped by DDP.
    """

    def __init__(self, model: nn.Module, value_head: Optional[ValueHead] = None, ref_model: Optional[nn.Module] = None):
        super().__init__()
        self.model = model
        self.value_head = value_head  # None: no critic (GRPO, RLOO)
        self.ref_model = ref_model

    @property
    def ref_model(self) -> Optional[nn.Module]:
        return self._ref_holder[0]

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "ref_model":  # keep it out of nn.Module's registry (parameters, state_dict, DDP)
            if value is not None:
                value.eval()
                value.requires_grad_(False)
            object.__setattr__(self, "_ref_holder", [value])
        else:
            super().__setattr__(name, value)

    @property
    def is_peft(self) -> bool:
        return _is_peft_model(self.model)

    @property
    def config(self):
        """The language model's config (accelerate sizes DeepSpeed's buckets from its hidden size)."""
        return self.model.config

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, values)`` for every position, or for the last ``logits_to_keep`` positions only (> 0):
        then the LM head runs on those positions alone (no vocabulary-sized work for prompt tokens)."""
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=self.value_head is not None,
            use_cache=False,
            return_dict=True,
            **_keep_kwargs(self.model, logits_to_keep),
        )
        logits = out.logits[:, -logits_to_keep:] if logits_to_keep else out.logits
        if self.value_head is None:
            return logits, None
        hidden = out.hidden_states[-1]
        hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        return logits, self.value_head(hidden)

    @torch.no_grad()
    def reference_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """The reference policy's logits (all positions, or the last ``logits_to_keep``)."""
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if self.is_peft:
            with self.model.disable_adapter():
                logits = self.model(**kwargs, **_keep_kwargs(self.model, logits_to_keep)).logits
        elif self.ref_model is None:
            raise UserError(
                "full fine-tuning PPO needs a frozen reference model; pass ref_model=... or use LoRA (--peft lora)"
            )
        else:
            logits = self.ref_model(**kwargs, **_keep_kwargs(self.ref_model, logits_to_keep)).logits
        return logits[:, -logits_to_keep:] if logits_to_keep else logits

    def save_pretrained(self, output_dir: str, state_dict: Optional[dict] = None, **kwargs) -> None:
        """Save the model (only the adapter for a ``PeftModel``) and, with a critic, ``value_head.safetensors``.

        ``state_dict``: this module's weights to write instead of its own (ZeRO-3: gathered from the
        partitions, ``rlhf.zero.gathered_state_dict``); the adapter's alone are enough for a ``PeftModel``."""
        from rlhf.zero import check_no_placeholders

        os.makedirs(output_dir, exist_ok=True)
        if state_dict is None:
            check_no_placeholders(self.model.state_dict(), f"the policy to {output_dir}")
            self.model.save_pretrained(output_dir, **kwargs)
            if self.value_head is not None:
                save_value_head(self.value_head.state_dict(), output_dir)
            return
        self.model.save_pretrained(output_dir, state_dict=_submodule_state(state_dict, "model"), **kwargs)
        if self.value_head is not None:
            save_value_head(_submodule_state(state_dict, "value_head"), output_dir)


def _submodule_state(state_dict: dict, prefix: str) -> dict:
    return {name[len(prefix) + 1 :]: tensor for name, tensor in state_dict.items() if name.startswith(prefix + ".")}


def save_value_head(state_dict: dict, output_dir: str) -> str:
    """Write a ``ValueHead``'s ``state_dict()`` (refusing ZeRO-3 placeholders) to ``value_head.safetensors``."""
    from safetensors.torch import save_file

    from rlhf.zero import check_no_placeholders

    check_no_placeholders(state_dict, "the value head")
    path = os.path.join(output_dir, VALUE_HEAD_FILE)
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, path)
    return path


def load_value_head(value_head: ValueHead, path: str) -> ValueHead:
    """Load weights saved by ``save_value_head`` (``path`` is the file or its directory)."""
    from safetensors.torch import load_file

    if os.path.isdir(path):
        path = os.path.join(path, VALUE_HEAD_FILE)
    if not os.path.isfile(path):
        raise UserError(f"no value head at {path}; point to a PPO checkpoint directory that has {VALUE_HEAD_FILE}")
    value_head.load_state_dict(load_file(path, device=str(value_head.summary.weight.device)))
    return value_head


# --------------------------------------------------------------------------------------------
# Config: every PPO setting, declared once. rl_training.py parses this dataclass itself from the
# command line (TRL's convention: the config is the CLI), so the help text here is the --help.
# --------------------------------------------------------------------------------------------


ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo")


def _flag(default, text: str):
    return field(default=default, metadata={"help": text})


@dataclass
class PPOConfig:
    """PPO hyper-parameters. Names as in TRL 0.11's ``PPOConfig``; defaults as the reference script's.

    Batch semantics (TRL 0.11): each ``step`` takes ``batch_size`` rollouts (per process). They
    are shuffled every PPO epoch and cut into minibatches of ``mini_batch_size``; gradients of
    ``gradient_accumulation_steps`` minibatches are accumulated per optimizer step, so ``batch_size``
    must be a multiple of ``mini_batch_size * gradient_accumulation_steps``.

    Sampling: responses are sampled from ``softmax(logits / temperature)`` and every log-prob PPO
    uses (rollout, reference, update) comes from that same distribution. Top-k / top-p truncate it,
    which the log-probs cannot follow (training would be off-policy), so they are refused.
    """

    # rollouts and optimisation
    batch_size: int = _flag(32, "Rollouts per PPO step, per process.")
    mini_batch_size: int = _flag(1, "Rollouts per PPO minibatch (one forward/backward).")
    gradient_accumulation_steps: int = _flag(4, "Minibatches per optimizer step.")
    ppo_epochs: int = _flag(4, "Optimisation epochs over each batch of rollouts.")
    learning_rate: float = _flag(1.41e-5, "Adam (or Adafactor) learning rate.")
    adafactor: bool = _flag(False, "Use Adafactor instead of Adam.")
    max_grad_norm: float | None = _flag(1.0, "Clip the gradient norm to this (unset: no clipping).")
    seed: int = _flag(0, "Random seed (sampling, shuffling, LoRA and value-head initialisation).")
    # estimator
    advantage_estimator: str = field(default="gae", metadata={
        "help": "gae: PPO with a value head; grpo / rloo: critic-free, from --num_generations responses per prompt.",
        "choices": ADVANTAGE_ESTIMATORS})
    num_generations: int = _flag(1, "Responses sampled per prompt (>= 2 for grpo and rloo); --batch_size counts responses.")
    # KL to the reference
    init_kl_coef: float = field(default=0.2, metadata={
        "help": "(Initial) KL coefficient beta: per-token reward penalty, or the loss weight with --use_kl_loss.",
        "aliases": ["--kl_coef"]})
    use_kl_loss: bool = _flag(False, "KL to the reference as a k3 loss term (GRPO's way), not a reward penalty.")
    adap_kl_ctrl: bool = _flag(True, "Adapt the KL coefficient toward --target (else keep it fixed).")
    target: float = _flag(6.0, "Target KL (nats per response) of the adaptive controller.")
    horizon: float = _flag(10000.0, "Horizon (in rollouts) of the adaptive controller.")
    # advantages and losses
    gamma: float = _flag(1.0, "Discount factor.")
    lam: float = _flag(0.95, "GAE lambda.")
    cliprange: float = _flag(0.2, "Clip range of the policy ratio.")
    cliprange_value: float = _flag(0.2, "Clip range of the value predictions.")
    vf_coef: float = _flag(0.1, "Weight of the value loss.")
    whiten_rewards: bool = _flag(False, "Whiten per-token rewards before GAE.")
    early_stopping: bool = _flag(False, "Stop a step's epochs once a minibatch's approx. KL > 1.5 * --target_kl.")
    target_kl: float = _flag(0.1, "KL threshold for --early_stopping.")
    ratio_threshold: float = _flag(10.0, "Skip a minibatch whose mean policy ratio exceeds this.")
    # scores
    reward_baseline: float = _flag(0.0, "Subtracted from every reward score.")
    missing_eos_penalty: float | None = _flag(None, "Subtracted from the score of a response without EOS.")
    score_clip: float | None = _flag(None, "Clip scores to [-c, c].")
    # sampling
    input_max_length: int = _flag(512, "Longest prompt in tokens (longer prompts keep their end).")
    output_max_length: int = _flag(128, "Most new tokens per response.")
    output_min_length: int | None = _flag(
        None, "If set, draw each generation batch's length limit from [min, max) (the reference's LengthSampler)."
    )
    temperature: float = _flag(1.0, "Sampling temperature; log-probs are computed at the same temperature.")
    top_k: int = _flag(0, "Must stay 0: top-k sampling makes PPO off-policy.")
    top_p: float = _flag(1.0, "Must stay 1.0: nucleus sampling makes PPO off-policy.")
    # static shapes (HPU graphs)
    pad_for_acceleration: bool = _flag(False, "Static shapes: pad prompts and responses to fixed widths (on HPU: always).")
    pad_max_input_len: int | None = _flag(None, "Static prompt width (default --input_max_length).")
    pad_to_multiple_of: int | None = _flag(None, "Round padded widths up to a multiple of this (fewer shapes).")

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(message)

        for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs",
                     "input_max_length", "output_max_length"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"--{name} {value} is invalid; use an integer >= 1")
        backward = self.mini_batch_size * self.gradient_accumulation_steps
        need(
            self.batch_size % backward == 0,
            f"--batch_size {self.batch_size} is not a multiple of --mini_batch_size x --gradient_accumulation_steps "
            f"= {self.mini_batch_size} x {self.gradient_accumulation_steps} = {backward}; "
            f"use e.g. --batch_size {max(backward, self.batch_size // backward * backward)}",
        )
        for name in ("learning_rate", "target", "horizon", "cliprange", "cliprange_value", "target_kl",
                     "ratio_threshold", "temperature"):
            value = getattr(self, name)
            need(value > 0 and math.isfinite(value), f"--{name} {value} is invalid; use a positive number")
        for name in ("init_kl_coef", "vf_coef"):
            value = getattr(self, name)
            need(value >= 0 and math.isfinite(value), f"--{name} {value} is invalid; use a number >= 0")
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            need(0 <= value <= 1, f"--{name} {value} is out of range; use 0 <= {name} <= 1")
        for name in ("max_grad_norm", "score_clip"):
            value = getattr(self, name)
            need(value is None or value > 0, f"--{name} {value} is invalid; use a positive number or leave it unset")
        need(
            self.missing_eos_penalty is None or self.missing_eos_penalty >= 0,
            f"--missing_eos_penalty {self.missing_eos_penalty} is negative; use a number >= 0 (it is subtracted)",
        )
        need(math.isfinite(self.reward_baseline), f"--reward_baseline {self.reward_baseline} is not a finite number")
        need(
            self.output_min_length is None or 1 <= self.output_min_length < self.output_max_length,
            f"--output_min_length {self.output_min_length} must be >= 1 and below --output_max_length "
            f"{self.output_max_length}",
        )
        need(self.advantage_estimator in ADVANTAGE_ESTIMATORS,
             f"--advantage_estimator {self.advantage_estimator} is unknown; use one of {', '.join(ADVANTAGE_ESTIMATORS)}")
        need(isinstance(self.num_generations, int) and self.num_generations >= (1 if self.has_critic else 2),
             f"--num_generations {self.num_generations}: {self.advantage_estimator} needs at least "
             f"{1 if self.has_critic else 2} responses per prompt; use e.g. --num_generations 4")
        need(self.batch_size % self.num_generations == 0,
             f"--batch_size {self.batch_size} is not a multiple of --num_generations {self.num_generations} "
             "(it counts responses: prompts x generations)")
        need(
            self.top_k == 0 and self.top_p == 1.0,
            f"--top_k {self.top_k} --top_p {self.top_p}: truncated sampling makes PPO off-policy (its log-probs "
            "cover the whole vocabulary); keep --top_k 0 --top_p 1.0 and use --temperature",
        )
        for name in ("pad_max_input_len", "pad_to_multiple_of"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, int) and value >= 1),
                 f"--{name} {value} is invalid; use an integer >= 1 or leave it unset")

    @property
    def backward_batch_size(self) -> int:
        return self.mini_batch_size * self.gradient_accumulation_steps

    @property
    def has_critic(self) -> bool:
        """GAE needs a value head; GRPO and RLOO take their baseline from the other responses to the prompt."""
        return self.advantage_estimator == "gae"

    @property
    def algorithm(self) -> str:
        """The method's name for logs, progress bars and plot titles: PPO, GRPO or RLOO."""
        return "PPO" if self.advantage_estimator == "gae" else self.advantage_estimator.upper()

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size // self.num_generations

    def generation_kwargs(self) -> dict:
        """``generate`` settings for sampling from ``softmax(logits / temperature)``, nothing truncated."""
        return {"max_new_tokens": self.output_max_length, "do_sample": True, "temperature": self.temperature,
                "top_k": 0, "top_p": 1.0}


class LengthSampler:
    """Draws a ``max_new_tokens`` uniformly from ``[min_value, max_value)`` (TRL's LengthSampler)."""

    def __init__(self, min_value: int, max_value: int):
        if not 1 <= min_value < max_value:
            raise UserError(f"output length range [{min_value}, {max_value}) is empty; use 1 <= min < max")
        self.values = list(range(min_value, max_value))

    def __call__(self) -> int:
        return int(np.random.choice(self.values))


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------


class Scores(NamedTuple):
    """What ``PPOTrainer.score`` returns, per response (float32, on CPU).

    ``shaped`` is what PPO optimises; ``raw`` is the reward function's own output (the reward
    model's score), the number a user judges the run by; ``eos_penalty`` is the part of
    ``raw - shaped`` that the missing-EOS penalty took away."""

    shaped: torch.Tensor
    raw: torch.Tensor
    eos_penalty: torch.Tensor


def _no_op() -> None:
    pass


def _round_up(n: int, multiple: Optional[int]) -> int:
    return n if not multiple else -(-n // multiple) * multiple


class PPOTrainer:
    """Rollout + PPO update for a ``PolicyWithValueHead``.

    Args:
        config: ``PPOConfig``.
        policy: the trained model with its value head (LoRA via peft, or a full model with a frozen
            ``ref_model`` set on the policy).
        tokenizer: its tokenizer; ``eos_token_id`` required, ``pad_token_id`` defaults to EOS.
        reward_fn: ``callable(prompts: list[str], responses: list[str]) -> list[float] | Tensor``
            (a rule, or ``rlhf.reward.RewardScorer``); used by ``score``.
        accelerator: ``accelerate.Accelerator`` (one process: free) or optimum-habana's
            ``GaudiAccelerator``, created with ``gradient_accumulation_steps=1`` (PPO accumulates
            itself). The trainer prepares policy and optimizer with it, uses its ``backward`` /
            ``clip_grad_norm_`` (under DeepSpeed: the engine's backward and step) and averages stats
            and early-stop decisions over processes.
        optimizer: defaults to Adam (or Adafactor with ``config.adafactor``) on the trainable parameters.
        mark_step: called after each backward and optimizer step (HPU lazy mode); default no-op.
    """

    def __init__(
        self,
        config: PPOConfig,
        policy: PolicyWithValueHead,
        tokenizer,
        reward_fn: Callable[[list[str], list[str]], Any],
        accelerator,
        optimizer: Optional[torch.optim.Optimizer] = None,
        mark_step: Optional[Callable[[], None]] = None,
    ):
        self.config = config
        self.policy = policy
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.accelerator = accelerator
        self.mark_step = mark_step or _no_op

        self.eos_token_id = tokenizer.eos_token_id
        if self.eos_token_id is None:
            raise UserError("the tokenizer has no eos_token; set one (tokenizer.eos_token = ...) before PPO")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        if config.has_critic != (policy.value_head is not None):
            raise UserError(
                f"--advantage_estimator {config.advantage_estimator} "
                + ("needs a value head (PolicyWithValueHead(model, ValueHead(hidden_size)))" if config.has_critic
                   else "trains no value head; build the policy without one")
            )
        if not policy.is_peft and policy.ref_model is None:
            raise UserError(
                "full fine-tuning PPO needs a frozen reference model (policy.ref_model); or use LoRA (--peft lora)"
            )
        if getattr(accelerator, "gradient_accumulation_steps", 1) != 1:
            raise UserError(
                "create the Accelerator with gradient_accumulation_steps=1; PPO accumulates over "
                "--gradient_accumulation_steps itself"
            )
        self.num_processes = accelerator.num_processes
        self.model, self.optimizer = accelerator.prepare(policy, optimizer or make_optimizer(policy, config))
        self.device = accelerator.device
        # Under DeepSpeed the engine runs backward and step, PPO ending each accumulation window.
        self.engine = deepspeed_engine(self.model)
        self._engine_steps = PPOEngineSteps(self.engine) if self.engine is not None else None
        if policy.ref_model is not None:
            policy.ref_model = frozen_under_zero3(policy.ref_model.to(self.device), accelerator)
        # Seeded after prepare (a DeepSpeed engine draws random numbers as it starts): the same sampling with it or without
        _set_seed(config.seed + accelerator.process_index)
        self._shuffle = torch.Generator().manual_seed(config.seed + accelerator.process_index)
        if config.adap_kl_ctrl:
            self.kl_ctl = AdaptiveKLController(config.init_kl_coef, config.target, config.horizon)
        else:
            self.kl_ctl = FixedKLController(config.init_kl_coef)
        self.current_step = 0

    # ---------------------------------------------------------------- padding helpers

    def _prompt_width(self, longest: int) -> int:
        cfg = self.config
        if cfg.pad_for_acceleration:
            fixed = cfg.pad_max_input_len or cfg.input_max_length
            if longest > fixed:
                raise UserError(
                    f"a prompt has {longest} tokens, more than --pad_max_input_len {fixed}; "
                    "raise --pad_max_input_len or truncate prompts"
                )
            longest = fixed
        return _round_up(longest, cfg.pad_to_multiple_of)

    def _response_width(self, longest: int) -> int:
        if self.config.pad_for_acceleration:
            longest = max(longest, self.config.output_max_length)
        return _round_up(longest, self.config.pad_to_multiple_of)

    def _pad(self, rows: Sequence[torch.Tensor], width: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        padded = pad_sequences(rows, self.pad_token_id, side=side, pad_to=width, device=self.device)
        return padded["input_ids"], padded["attention_mask"]

    # ---------------------------------------------------------------- rollout

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[torch.Tensor],
        length_sampler: Optional[Callable[[], int]] = None,
        batch_size: Optional[int] = None,
        **overrides,
    ) -> list[torch.Tensor]:
        """Sample one response per prompt (1-D token id tensors), KV cache, left-padded, no dropout.

        ``length_sampler`` draws ``max_new_tokens`` per generation batch; ``batch_size`` splits the
        prompts into generation batches (None: all at once); ``overrides`` change the config's
        generation settings (benchmarks only: anything but the temperature makes PPO off-policy).
        Returns 1-D tensors, each cut right after its first EOS (EOS included).
        """
        rows = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompts]
        if any(r.numel() == 0 for r in rows):
            raise UserError("an empty prompt reached PPO; drop empty prompts from the dataset")
        kwargs = {**self.config.generation_kwargs(), **overrides, "use_cache": True,
                  "pad_token_id": self.pad_token_id, "eos_token_id": self.eos_token_id}
        was_training = self.policy.training
        self.policy.eval()
        responses: list[torch.Tensor] = []
        step = batch_size or len(rows)
        try:
            with full_parameters(self.policy.model, self.engine):  # ZeRO-3: the whole weights, gathered once
                for i in range(0, len(rows), step):
                    chunk = rows[i : i + step]
                    if length_sampler is not None:
                        kwargs["max_new_tokens"] = int(length_sampler())
                    width = self._prompt_width(max(r.numel() for r in chunk))
                    input_ids, mask = self._pad(chunk, width, "left")
                    output = self.policy.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
                    if not isinstance(output, torch.Tensor):  # return_dict_in_generate=True
                        output = output.sequences
                    ids, response_mask, _ = truncate_after_eos(output[:, width:], self.eos_token_id,
                                                               self.pad_token_id)
                    lengths = response_mask.sum(1).tolist()
                    responses.extend(ids[j, : lengths[j]] for j in range(len(chunk)))
        finally:
            self.policy.train(was_training)
            self.mark_step()
        return responses

    def ended_with_eos(self, responses: Sequence[torch.Tensor]) -> torch.Tensor:
        """Bool per response from ``generate``: True if it finished with EOS (not cut by length)."""
        last = [r[-1:] if r.numel() else r.new_full((1,), -1) for r in responses]
        return (torch.cat(last) == self.eos_token_id).cpu()

    def decode_responses(self, responses: Sequence[torch.Tensor]) -> list[str]:
        return self.tokenizer.batch_decode([r.tolist() for r in responses], skip_special_tokens=True)

    def score(self, prompts: list[str], responses: Sequence[torch.Tensor], **reward_kwargs) -> Scores:
        """Score decoded ``responses`` (from ``generate``) to their ``prompts`` (texts) with ``reward_fn``
        (``reward_kwargs`` passed on, e.g. ``rlhf.reward_functions.CombinedReward``'s ``columns``).

        ``shaped = raw - reward_baseline``, minus ``missing_eos_penalty`` for responses without EOS,
        clipped to ``score_clip``."""
        texts = self.decode_responses(responses)
        raw = self.reward_fn(list(prompts), texts, **reward_kwargs)
        raw = torch.as_tensor(raw.detach().cpu() if isinstance(raw, torch.Tensor) else raw, dtype=torch.float32)
        raw = raw.reshape(-1)
        if raw.numel() != len(texts):
            raise ValueError(f"reward_fn returned {raw.numel()} scores for {len(texts)} responses")
        penalty = torch.zeros_like(raw)
        if self.config.missing_eos_penalty is not None:
            penalty = torch.where(self.ended_with_eos(responses), penalty, penalty + self.config.missing_eos_penalty)
        shaped = raw - self.config.reward_baseline - penalty
        if self.config.score_clip is not None:
            shaped = shaped.clamp(-self.config.score_clip, self.config.score_clip)
        return Scores(shaped=shaped, raw=raw, eos_penalty=penalty)

    # ---------------------------------------------------------------- forward passes

    def _build_batch(self, prompts: list[torch.Tensor], responses: list[torch.Tensor]) -> dict[str, Any]:
        """Concatenate left-padded prompts (width P) and right-padded responses (width R)."""
        prompt_ids, prompt_mask = self._pad(prompts, self._prompt_width(max(p.numel() for p in prompts)), "left")
        response_ids, response_mask = self._pad(responses, self._response_width(max(r.numel() for r in responses)),
                                                "right")
        attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
        return {
            "input_ids": torch.cat([prompt_ids, response_ids], dim=1),
            "attention_mask": attention_mask,
            "position_ids": position_ids_from_mask(attention_mask),
            "response_ids": response_ids,
            "response_mask": response_mask,
        }

    @staticmethod
    def _response_slice(tensor: torch.Tensor, response_width: int) -> torch.Tensor:
        """Columns whose outputs predict response tokens 0..R-1 (and the values of those states).

        They are the last R + 1 columns but the very last, so this works on full-width outputs and on
        outputs computed for the last R + 1 positions only (``logits_to_keep``).
        """
        return tensor[:, -(response_width + 1) : -1]

    def _sampling_logits(self, logits: torch.Tensor, response_width: int) -> torch.Tensor:
        """The response positions' logits of the distribution responses are sampled from (``/ temperature``)."""
        return self._response_slice(logits, response_width).float() / self.config.temperature

    def _policy_pass(self, batch: dict[str, Any], rows) -> tuple[torch.Tensor, torch.Tensor]:
        """(sampling logits, values) at the response positions of ``rows``, through ``self.model``.

        The one computation behind the old log-probs (rollout) and the new ones (update): both run
        with dropout off (eval mode), so the ratio is exactly 1 before the first update of a step
        whatever ``lora_dropout`` is."""
        r = batch["response_ids"].shape[1]
        # Logits only for the R + 1 positions that predict response tokens: no LM-head work for prompts.
        logits, values = self.model(batch["input_ids"][rows], batch["attention_mask"][rows],
                                    batch["position_ids"][rows], logits_to_keep=r + 1)
        values = self._response_slice(values, r).float() if values is not None else None
        return self._sampling_logits(logits, r), values

    @torch.no_grad()
    def _rollout_forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Old log-probs, values, reference log-probs and entropies of the sampled responses."""
        was_training = self.policy.training
        self.policy.eval()
        r = batch["response_ids"].shape[1]
        parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "ref_logprobs": [], "values": [], "entropy": []}
        try:
            for i in range(0, batch["input_ids"].shape[0], self.config.mini_batch_size):
                rows = slice(i, i + self.config.mini_batch_size)
                labels = batch["response_ids"][rows]
                logits, values = self._policy_pass(batch, rows)
                parts["logprobs"].append(logprobs_from_logits(logits, labels))
                parts["entropy"].append(entropy_from_logits(logits))
                if values is not None:
                    parts["values"].append(values)
                ref_logits = self.policy.reference_logits(batch["input_ids"][rows], batch["attention_mask"][rows],
                                                          batch["position_ids"][rows], logits_to_keep=r + 1)
                parts["ref_logprobs"].append(logprobs_from_logits(self._sampling_logits(ref_logits, r), labels))
        finally:
            self.policy.train(was_training)
            self.mark_step()
        return {k: torch.cat(v) for k, v in parts.items() if v}  # no "values" without a critic

    def _reduce(self, values: dict[str, float]) -> dict[str, float]:
        """Mean of each value over processes (no-op for one process)."""
        if self.num_processes == 1 or not values:
            return values
        keys = sorted(values)
        tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float32, device=self.device)
        tensor = self.accelerator.reduce(tensor, reduction="mean")
        return dict(zip(keys, tensor.tolist()))

    def _backward(self, loss: torch.Tensor) -> None:
        if self._engine_steps is not None:
            self._engine_steps.backward(loss)
        else:
            self.accelerator.backward(loss)
        self.mark_step()

    def _optimizer_step(self) -> float:
        """End of an accumulation window: clip, step, zero the gradients; returns the norm before clipping."""
        if self._engine_steps is not None:
            return self._engine_steps.step()  # the engine clips to its gradient_clipping (= --max_grad_norm)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else float("inf")
        grad_norm = self.accelerator.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.mark_step()
        return float(grad_norm)

    # ---------------------------------------------------------------- PPO step

    def step(
        self,
        prompt_ids: Sequence[torch.Tensor],
        response_ids: Sequence[torch.Tensor],
        scores: Union[Scores, Sequence[float], torch.Tensor],
        timings: Optional[dict[str, float]] = None,
    ) -> dict[str, float]:
        """One PPO optimisation step on ``batch_size`` rollouts; returns the step's stats.

        ``prompt_ids``: unpadded 1-D prompt tensors; ``response_ids``: responses as returned by
        ``generate``; ``scores``: ``score``'s result (or one float per rollout, taken as raw and
        shaped alike); ``timings``: the caller's ``time/*_s`` for generation and scoring, added
        to the stats and to ``time/step_s``.
        """
        start = time.perf_counter()
        cfg = self.config
        if not isinstance(scores, Scores):
            flat = torch.as_tensor(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores,
                                   dtype=torch.float32).reshape(-1)
            scores = Scores(shaped=flat, raw=flat, eos_penalty=torch.zeros_like(flat))
        prompts = [torch.as_tensor(p, dtype=torch.long).reshape(-1).to(self.device) for p in prompt_ids]
        responses = [torch.as_tensor(r, dtype=torch.long).reshape(-1).to(self.device) for r in response_ids]
        shaped = scores.shaped.to(self.device)
        if not len(prompts) == len(responses) == shaped.numel() == cfg.batch_size:
            raise ValueError(
                f"step needs batch_size={cfg.batch_size} prompts, responses and scores; got "
                f"{len(prompts)}, {len(responses)}, {shaped.numel()}"
            )
        if any(r.numel() == 0 for r in responses):
            raise ValueError("step got an empty response; every response needs at least one token")

        # 1. Rollout forward (no grad): old log-probs, values, reference log-probs.
        batch = self._build_batch(prompts, responses)
        rollout = self._rollout_forward(batch)
        mask = batch["response_mask"].float()
        forward_s = time.perf_counter() - start

        # 2. Rewards and advantages, float32. The KL to the reference is a per-token reward penalty,
        # or (use_kl_loss) a loss term below instead.
        kl_coef = self.kl_ctl.value
        rewards, non_score_reward, kl = compute_rewards(
            shaped, rollout["logprobs"], rollout["ref_logprobs"], mask, 0.0 if cfg.use_kl_loss else kl_coef
        )
        returns = None
        if cfg.has_critic:
            if cfg.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = compute_gae(rollout["values"], rewards, mask, cfg.gamma, cfg.lam)
        else:  # one advantage per response, from its group's returns, on every one of its tokens
            advantages = group_advantages(rewards.sum(1), cfg.num_generations, cfg.advantage_estimator)
            advantages = advantages.unsqueeze(1) * mask

        # 3. PPO epochs over shuffled minibatches with gradient accumulation. Eval mode, as the
        # rollout forward: the same dropout-free computation gives old and new log-probs.
        update_start = time.perf_counter()
        mb_stats: list[dict[str, float]] = []
        grad_norms: list[float] = []
        skipped, early_stopped = 0, False
        self.policy.eval()
        self.optimizer.zero_grad(set_to_none=True)
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.batch_size, generator=self._shuffle).to(self.device)
            for b in range(0, cfg.batch_size, cfg.backward_batch_size):
                did_backward = False
                for m in range(b, b + cfg.backward_batch_size, cfg.mini_batch_size):
                    idx = order[m : m + cfg.mini_batch_size]
                    logits, values = self._policy_pass(batch, idx)
                    new_logprobs = logprobs_from_logits(logits, batch["response_ids"][idx])
                    loss, stats = clipped_policy_loss(new_logprobs, rollout["logprobs"][idx], advantages[idx],
                                                      mask[idx], cfg.cliprange)
                    if cfg.has_critic:
                        value_loss, value_stats = clipped_value_loss(values, rollout["values"][idx], returns[idx],
                                                                     mask[idx], cfg.cliprange_value)
                        loss = loss + cfg.vf_coef * value_loss
                        stats.update(value_stats)
                    if cfg.use_kl_loss:
                        kl_loss = masked_mean(k3_kl(new_logprobs, rollout["ref_logprobs"][idx]), mask[idx])
                        loss = loss + kl_coef * kl_loss
                        stats["loss/kl"] = kl_loss.detach()
                    stats["loss/total"] = loss.detach()
                    stats["policy/entropy"] = masked_mean(entropy_from_logits(logits.detach()), mask[idx])
                    stats = dict(zip(stats, torch.stack([v.detach().float() for v in stats.values()]).tolist()))
                    decide = self._reduce({k: stats[k] for k in ("policy/approxkl", "policy/ratio_mean")})
                    mb_stats.append(stats)
                    if cfg.early_stopping and decide["policy/approxkl"] > 1.5 * cfg.target_kl:
                        early_stopped = True  # stop before pushing the policy further away
                        break
                    if not decide["policy/ratio_mean"] <= cfg.ratio_threshold:  # also catches NaN
                        skipped += 1
                        continue
                    self._backward(loss / cfg.gradient_accumulation_steps)
                    did_backward = True
                if early_stopped:
                    self.optimizer.zero_grad(set_to_none=True)  # drop a partial accumulation
                    break
                if did_backward:
                    grad_norms.append(self._optimizer_step())
            if early_stopped:
                break
        self.policy.train()
        update_s = time.perf_counter() - update_start

        # 4. Stats (averaged over processes), then the KL controller update. The reward model's
        # raw score comes first: it is the result; the shaped score is what PPO optimised.
        lengths = mask.sum(1)
        kl_per_seq = kl.sum(1)
        non_score_per_seq = non_score_reward.sum(1)
        stats: dict[str, float] = {
            "objective/raw_scores": scores.raw.mean().item(),
            "objective/eos_penalty": scores.eos_penalty.mean().item(),
            "objective/scores": shaped.mean().item(),
            "objective/kl": kl_per_seq.mean().item(),
            "objective/kl_coef": kl_coef,
            "objective/entropy": (-rollout["logprobs"] * mask).sum(1).mean().item(),
            "objective/token_entropy": masked_mean(rollout["entropy"], mask).item(),
            "objective/non_score_reward": non_score_per_seq.mean().item(),
            "objective/rlhf_reward": (shaped + non_score_per_seq).mean().item(),
            "response/length": lengths.mean().item(),
            "response/ended_with_eos": self.ended_with_eos(responses).float().mean().item(),
            "ppo/early_stopped": float(early_stopped),
            "ppo/skipped_minibatches": float(skipped),
            "ppo/minibatches": float(len(mb_stats)),
            "ppo/optimizer_steps": float(len(grad_norms)),
            "ppo/grad_norm": float(np.mean(grad_norms)) if grad_norms else 0.0,
            "ppo/learning_rate": float(self.optimizer.param_groups[0]["lr"]),
            "ppo/first_minibatch_approxkl": mb_stats[0]["policy/approxkl"],
        }
        if cfg.has_critic:
            stats["value/mean"] = masked_mean(rollout["values"], mask).item()
            stats["returns/mean"] = masked_mean(returns, mask).item()
        else:
            stats["advantages/zero_groups"] = float((advantages.abs().sum(1).reshape(-1, cfg.num_generations)
                                                     .sum(1) == 0).float().mean())
        for key in mb_stats[0]:
            stats[key] = float(np.mean([s[key] for s in mb_stats]))
        stats = self._reduce(stats)
        stats["objective/kl_coef"] = kl_coef
        self.kl_ctl.update(stats["objective/kl"], cfg.batch_size * self.num_processes)
        self.current_step += 1

        timings = dict(timings or {})
        stats.update(timings)
        stats.update({
            "time/forward_s": forward_s,
            "time/update_s": update_s,
            "time/step_s": sum(timings.values()) + time.perf_counter() - start,
        })
        return stats

    # ---------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, prompt_texts: list[str], prompt_ids: list[torch.Tensor], batch_size: Optional[int] = None,
                 columns: Optional[dict[str, list]] = None):
        """Held-out metrics and samples, no update. Samples with the current settings (global RNG).

        Returns ``(metrics, samples)``. Metrics, the reward model's raw score first: ``eval/raw_scores``,
        ``eval/eos_penalty``, ``eval/scores`` (what PPO optimises), ``eval/kl`` (mean per-response KL
        to the reference), ``eval/response_length``. Samples: this process's ``{"prompt",
        "response", "raw_score", "score", "kl"}`` dicts. ``columns``: the prompts' other dataset columns,
        passed to the reward function as ``columns=`` (sliced per batch).
        """
        size = batch_size or self.config.batch_size
        totals = dict.fromkeys(("eval/raw_scores", "eval/eos_penalty", "eval/scores", "eval/kl",
                                "eval/response_length"), 0.0)
        samples: list[dict] = []
        for i in range(0, len(prompt_ids), size):
            chunk = [p.to(self.device) for p in prompt_ids[i : i + size]]
            texts = prompt_texts[i : i + size]
            responses = self.generate(chunk)
            extra = {"columns": {k: v[i : i + size] for k, v in columns.items()}} if columns else {}
            scores = self.score(texts, responses, **extra)
            batch = self._build_batch(chunk, responses)
            rollout = self._rollout_forward(batch)
            mask = batch["response_mask"].float()
            kl = ((rollout["logprobs"] - rollout["ref_logprobs"]) * mask).sum(1)
            totals["eval/raw_scores"] += scores.raw.sum().item()
            totals["eval/eos_penalty"] += scores.eos_penalty.sum().item()
            totals["eval/scores"] += scores.shaped.sum().item()
            totals["eval/kl"] += kl.sum().item()
            totals["eval/response_length"] += mask.sum().item()
            samples += [
                {"prompt": p, "response": r, "raw_score": float(raw), "score": float(sc), "kl": float(k)}
                for p, r, raw, sc, k in zip(texts, self.decode_responses(responses), scores.raw.tolist(),
                                            scores.shaped.tolist(), kl.tolist())
            ]
        metrics = self._reduce({k: v / max(len(prompt_ids), 1) for k, v in totals.items()})
        return metrics, samples

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """Optimizer, KL controller, step counter and RNG states (python, numpy, torch, shuffle).

        Holds only tensors and plain Python values, so ``torch.load(weights_only=True)`` reads it.
        Model weights (adapter + value head) are saved separately: ``policy.save_pretrained``.
        """
        np_state = np.random.get_state()
        rng = {
            "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *[_plain(x) for x in np_state[2:]]],
            "torch": torch.get_rng_state(),
            "shuffle": self._shuffle.get_state(),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "step": self.current_step,
            "kl_ctl": self.kl_ctl.state_dict(),
            # Under DeepSpeed the engine saves its partitioned optimizer itself (save_state).
            "optimizer": self.optimizer.state_dict() if self.engine is None else None,
            "rng": rng,
            "config": asdict(self.config),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` saved (after loading the model weights).

        Only state is restored (the KL coefficient reached, not the controller's settings): flags
        given to the resumed command, such as a new ``--target``, take effect."""
        self.current_step = int(state["step"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        if state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        elif self.engine is None:
            raise UserError("this checkpoint was written by a DeepSpeed run (its optimizer state is the engine's); "
                            "resume it with the same --deepspeed config")
        rng = state["rng"]
        random.setstate(_as_tuple(rng["python"]))
        kind, keys, *rest = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
        torch.set_rng_state(rng["torch"])
        self._shuffle.set_state(rng["shuffle"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


    def save_state(self, folder) -> None:
        """Everything but the policy's weights into checkpoint ``folder``; call on EVERY process.

        ``ppo_state.pt`` (main process: ``state_dict()``), ``rng_state_<rank>.pth`` (each other rank's
        RNG: each samples and shuffles with its own) and, under DeepSpeed, the engine's own checkpoint
        (every rank writes its optimizer partition)."""
        folder = Path(folder)
        state = self.state_dict()
        if self.engine is not None:
            save_engine_state(self.engine, folder)
        rank = self.accelerator.process_index
        if rank == 0:
            torch.save(state, folder / TRAINER_STATE_FILE)
        else:
            torch.save({"rng": state["rng"]}, folder / RANK_RNG_FILE.format(rank=rank))

    def load_state(self, folder) -> None:
        """Restore what ``save_state`` wrote (after the policy's weights were loaded); every process."""
        folder = Path(folder)
        state = torch.load(folder / TRAINER_STATE_FILE, weights_only=True)
        own_rng = folder / RANK_RNG_FILE.format(rank=self.accelerator.process_index)
        if own_rng.is_file():  # absent for rank 0, and in checkpoints written before ranks kept their own
            state["rng"] = torch.load(own_rng, weights_only=True)["rng"]
        if self.engine is not None:
            load_engine_state(self.engine, folder)
        self.load_state_dict(state)

    def save_policy(self, output_dir, merged_dir=None) -> None:
        """The adapter (or the full weights) and value head into ``output_dir``; with ``merged_dir`` also the
        policy with LoRA merged, for ``from_pretrained``. Call on EVERY process; the main one writes.

        Under ZeRO-3 the weights are first gathered from every rank's partitions (a collective), the
        main process holding a CPU copy: of the trained weights alone when nothing is merged."""
        is_main = self.accelerator.is_main_process
        partitioned = any(is_partitioned(p) for p in self.policy.parameters())
        state = None
        if partitioned:
            trained_only = self.policy.is_peft and merged_dir is None
            state = gathered_state_dict(self.policy, is_main, trainable_only=trained_only)
        if not is_main:
            return
        self.policy.save_pretrained(str(output_dir), state_dict=state)
        if merged_dir is not None:
            model = plain_copy(self.policy.model, _submodule_state(state, "model")) if partitioned else self.policy.model
            merge_lora(model).save_pretrained(merged_dir)


def make_optimizer(policy: nn.Module, config: PPOConfig) -> torch.optim.Optimizer:
    """Adam, or Adafactor with ``config.adafactor``, on the policy's trainable parameters."""
    params = [p for p in policy.parameters() if p.requires_grad]
    if not params:
        raise UserError("the policy has no trainable parameters; add a LoRA adapter or unfreeze the model")
    if config.adafactor:
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=config.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)
    return torch.optim.Adam(params, lr=config.learning_rate)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _plain(x):
    return x.item() if hasattr(x, "item") else x


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
