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
    logprobs_and_entropy                            token log-probs and entropy from one log_softmax
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
from tqdm.auto import tqdm

from rlhf.advantages import ADVANTAGE_ESTIMATORS, SCALE_REWARDS, AdvantageInputs
from rlhf.errors import UserError
from rlhf.modeling import fold_lm_head_input, merge_lora, position_ids_from_mask
from rlhf.policy_loss import (
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    LossWindow,
    PolicyLossResult,
    clipped_value_loss,
    k3_kl,
)
from rlhf.rollout import HFEngine, Rollout, RolloutEngine, SamplingParams
from rlhf.sequences import (
    ends_with_eos,
    is_peft_model,
    logprobs_and_entropy,
    logprobs_from_logits,
    masked_mean,
    pad_sequences,
    padded_width,
)
from rlhf.strategy import strategy_for
from rlhf.zero import frozen_under_zero3, plain_copy

VALUE_HEAD_FILE = "value_head.safetensors"
TRAINER_STATE_FILE = "ppo_state.pt"  # in a checkpoint: step, KL controller, optimizer, rank 0's RNG
RANK_RNG_FILE = "rng_state_{rank}.pth"  # in a checkpoint: the RNG state of each other rank

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
# Model wrappers
# --------------------------------------------------------------------------------------------


def _last_columns(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """``tensor[:, -n:]`` (all of it when ``n`` is 0), without a slice when the width is already ``n``:
    even a full-width slice records a backward that zero-fills a logits-sized gradient."""
    return tensor if not n or tensor.shape[1] == n else tensor[:, -n:]


def _keep_kwargs(model: nn.Module, logits_to_keep: int) -> dict:
    """``{"logits_to_keep": n}`` when ``model``'s forward takes it (transformers causal LMs since 4.50),
    else ``{}`` (callers then slice the full logits)."""
    if not logits_to_keep:
        return {}
    import inspect

    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, nn.Module):  # DDP and similar wrappers
        inner = inner.module
    if is_peft_model(inner):
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
        fold_lm_head_input(model)

    @property
    def ref_model(self) -> Optional[nn.Module]:
        return self._ref_holder[0]

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "ref_model":  # keep it out of nn.Module's registry (parameters, state_dict, DDP)
            if value is not None:
                value.eval()
                value.requires_grad_(False)
                fold_lm_head_input(value)
            object.__setattr__(self, "_ref_holder", [value])
        else:
            super().__setattr__(name, value)

    @property
    def is_peft(self) -> bool:
        return is_peft_model(self.model)

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
        logits = _last_columns(out.logits, logits_to_keep)
        if self.value_head is None:
            return logits, None
        return logits, self.value_head(_last_columns(out.hidden_states[-1], logits_to_keep))

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
        return _last_columns(logits, logits_to_keep)

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
        "choices": tuple(ADVANTAGE_ESTIMATORS)})
    num_generations: int = _flag(1, "Responses sampled per prompt (>= 2 for grpo and rloo); --batch_size counts responses.")
    # KL to the reference
    init_kl_coef: float = field(default=0.2, metadata={
        "help": "(Initial) KL coefficient beta: per-token reward penalty, or the loss weight with --use_kl_loss.",
        "aliases": ["--kl_coef"]})
    use_kl_loss: bool = _flag(False, "KL to the reference as a k3 loss term (GRPO's way), not a reward penalty.")
    use_bias_correction_kl: bool = _flag(True, "With --use_kl_loss: multiply the k3 term by the importance ratio, "
                                         "so its gradient is the unbiased reverse-KL gradient (TRL 1.16's default, "
                                         "DeepSeek-V3.2).")
    adap_kl_ctrl: bool = _flag(True, "Adapt the KL coefficient toward --target (else keep it fixed).")
    target: float = _flag(6.0, "Target KL (nats per response) of the adaptive controller.")
    horizon: float = _flag(10000.0, "Horizon (in rollouts) of the adaptive controller.")
    # advantages and losses
    gamma: float = _flag(1.0, "Discount factor.")
    lam: float = _flag(0.95, "GAE lambda.")
    cliprange: float = field(default=0.2, metadata={
        "help": "Clip range of the policy ratio (TRL's epsilon; the lower bound when --epsilon_high is set).",
        "aliases": ["--epsilon"]})
    epsilon_high: float | None = _flag(None, "Upper clip of the ratio, 1 + epsilon_high (DAPO's clip-higher, "
                                       "e.g. 0.28); unset: --cliprange.")
    loss_type: str | None = field(default=None, metadata={
        "help": "How per-token losses are averaged (TRL GRPOConfig's names): dapo = token mean over each optimizer "
                "step's whole batch (all processes), whatever the minibatch split; grpo = mean of per-sequence "
                "means (length-biased); dr_grpo = token sum / (sequences x --output_max_length); bnpo = each "
                "minibatch's token mean / accumulation steps (the reference's; depends on --mini_batch_size). "
                "Default: dapo for grpo/rloo, bnpo for gae (the reference PPO's, kept).",
        "choices": tuple(LOSS_AGGREGATIONS)})
    importance_sampling_level: str = field(default="token", metadata={
        "help": "token: one ratio per token (PPO); sequence: one per sequence, the geometric mean (GSPO).",
        "choices": tuple(POLICY_LOSSES)})
    scale_rewards: str = field(default="group", metadata={
        "help": "GRPO's score scaling: by the group's std (group), the batch's (batch), or none (Dr. GRPO).",
        "choices": SCALE_REWARDS})
    mask_truncated_completions: bool = _flag(False, "Leave responses that hit --output_max_length without EOS "
                                             "out of the loss (DAPO).")
    entropy_coef: float = _flag(0.0, "Entropy bonus: the loss minus entropy_coef x the mean token entropy (over each optimizer step's "
                                "tokens, whatever --loss_type).")
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
    # rollout engine (rlhf.rollout)
    rollout_engine: str = field(default="hf", metadata={
        "help": "What samples the rollouts: hf (transformers' generate on the policy) or vllm (colocated vLLM, "
                "weights pushed after every step; make setup-vllm).", "choices": ("hf", "vllm")})
    use_vllm: bool = _flag(False, "TRL's spelling of --rollout_engine vllm.")
    vllm_gpu_memory_utilization: float = _flag(0.3, "vLLM: fraction of GPU memory for its weights and KV cache.")
    vllm_tensor_parallel_size: int = _flag(1, "vLLM: tensor-parallel size.")
    vllm_kv_cache_gb: float = _flag(2.0, "vLLM on CPU: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE).")
    vllm_importance_sampling_correction: bool = _flag(
        True, "With an engine other than the policy itself (vllm): weight each token's loss by "
              "min(exp(logp_trainer - logp_sampler), cap), TRL's truncated importance sampling.")
    vllm_importance_sampling_cap: float = _flag(3.0, "Cap of that importance weight.")
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
        if self.use_vllm:
            self.rollout_engine = "vllm"
        need(self.loss_type is None or self.loss_type in LOSS_AGGREGATIONS,
             f"--loss_type {self.loss_type} is unknown; use one of {', '.join(LOSS_AGGREGATIONS)}")
        need(self.importance_sampling_level in POLICY_LOSSES,
             f"--importance_sampling_level {self.importance_sampling_level} is unknown; use token or sequence")
        need(self.scale_rewards in SCALE_REWARDS,
             f"--scale_rewards {self.scale_rewards} is unknown; use one of {', '.join(SCALE_REWARDS)}")
        need(self.scale_rewards == "group" or self.advantage_estimator == "grpo",
             f"--scale_rewards {self.scale_rewards} applies to --advantage_estimator grpo only; drop it")
        need(self.epsilon_high is None or (self.epsilon_high > 0 and math.isfinite(self.epsilon_high)),
             f"--epsilon_high {self.epsilon_high} is invalid; use a positive number (e.g. 0.28) or leave it unset")
        need(self.entropy_coef >= 0 and math.isfinite(self.entropy_coef),
             f"--entropy_coef {self.entropy_coef} is invalid; use a number >= 0")
        need(self.vllm_importance_sampling_cap >= 1,
             f"--vllm_importance_sampling_cap {self.vllm_importance_sampling_cap} is below 1; use e.g. 3.0")
        need(0 < self.vllm_gpu_memory_utilization <= 1,
             f"--vllm_gpu_memory_utilization {self.vllm_gpu_memory_utilization} is out of range; use 0 < u <= 1")
        need(isinstance(self.vllm_tensor_parallel_size, int) and self.vllm_tensor_parallel_size >= 1,
             f"--vllm_tensor_parallel_size {self.vllm_tensor_parallel_size} is invalid; use an integer >= 1")
        need(self.vllm_kv_cache_gb > 0, f"--vllm_kv_cache_gb {self.vllm_kv_cache_gb} is invalid; use a positive number")
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

    @property
    def resolved_loss_type(self) -> str:
        """--loss_type, or its default: dapo for the critic-free estimators (TRL's), bnpo for gae (the reference's)."""
        return self.loss_type or ("bnpo" if self.has_critic else "dapo")


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


@dataclass
class Experience:
    """One batch of rollouts made ready for the update (``PPOTrainer.make_experience``); (B, R) tensors.

    ``mask``: the response tokens; ``loss_mask``: those the loss counts (``mask`` without truncated
    responses under ``--mask_truncated_completions``); ``kl``: per-token ``logp - ref_logp``;
    ``kl_coef``: the beta in force; ``sampler_logprobs``: the rollout engine's own log-probs (None if
    not given); ``is_weights``: the truncated importance-sampling correction (None when off)."""

    batch: dict[str, Any]
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: Optional[torch.Tensor]
    entropy: torch.Tensor
    advantages: torch.Tensor
    returns: Optional[torch.Tensor]
    mask: torch.Tensor
    loss_mask: torch.Tensor
    kl: torch.Tensor
    kl_coef: float
    ended_with_eos: torch.Tensor
    sampler_logprobs: Optional[torch.Tensor] = None
    is_weights: Optional[torch.Tensor] = None


def _no_op() -> None:
    pass


class PPOTrainer:
    """Rollout + PPO/GRPO/RLOO update for a ``PolicyWithValueHead``.

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
        wrap_for_generation: the backend's HPU-graph wrapper for the default ``hf`` engine's ``generate``
            (``Backend.wrap_for_generation``); None: none.
        rollout_engine: what samples (``rlhf.rollout``); default the ``hf`` engine on the policy itself.
            The trainer pushes the policy's weights to it after every step.
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
        rollout_engine: Optional[RolloutEngine] = None,
        wrap_for_generation: Optional[Callable] = None,
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
        # accelerate/DDP/Gaudi or the DeepSpeed engine (the trainer ending each accumulation window)
        self.strategy = strategy_for(accelerator, self.model, config.max_grad_norm, self.mark_step)
        self.engine = self.strategy.engine  # the DeepSpeed engine, None without
        if policy.ref_model is not None:
            policy.ref_model = frozen_under_zero3(policy.ref_model.to(self.device), accelerator)
        self.rollout_engine = rollout_engine or HFEngine(
            policy.model, self.eos_token_id, self.pad_token_id, self.device, deepspeed_engine=self.engine,
            static_prompt_width=self._static_prompt_width, pad_to_multiple_of=config.pad_to_multiple_of,
            mark_step=self.mark_step, wrap_for_generation=wrap_for_generation)
        if rollout_engine is not None and self.engine is not None:
            # built before prepare: the push gathers ZeRO-3 weights either way; with the engine it also lifts the
            # engine's fetch/release hooks during the gather, as the hf engine's generation does
            rollout_engine.deepspeed_engine = self.engine
        if not self.rollout_engine.samples_from_policy:
            self.rollout_engine.push_weights(policy.model)  # a resumed adapter (or LoRA's init), before sampling
        # Seeded after prepare (a DeepSpeed engine draws random numbers as it starts): the same sampling with it or without
        _set_seed(config.seed + accelerator.process_index)
        self._shuffle = torch.Generator().manual_seed(config.seed + accelerator.process_index)
        if config.adap_kl_ctrl:
            self.kl_ctl = AdaptiveKLController(config.init_kl_coef, config.target, config.horizon)
        else:
            self.kl_ctl = FixedKLController(config.init_kl_coef)
        self.current_step = 0

    # ---------------------------------------------------------------- padding helpers

    @property
    def _static_prompt_width(self) -> Optional[int]:
        cfg = self.config
        return (cfg.pad_max_input_len or cfg.input_max_length) if cfg.pad_for_acceleration else None

    def _response_width(self, longest: int) -> int:
        if self.config.pad_for_acceleration:
            longest = max(longest, self.config.output_max_length)
        return padded_width(longest, multiple=self.config.pad_to_multiple_of)

    def _pad(self, rows: Sequence[torch.Tensor], width: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        padded = pad_sequences(rows, self.pad_token_id, side=side, pad_to=width, device=self.device)
        return padded["input_ids"], padded["attention_mask"]

    # ---------------------------------------------------------------- rollout

    def rollout(
        self,
        prompts: Sequence[torch.Tensor],
        length_sampler: Optional[Callable[[], int]] = None,
        batch_size: Optional[int] = None,
        min_new_tokens: int = 0,
    ) -> Rollout:
        """Sample one response per prompt with the rollout engine: responses (1-D, cut after the first EOS)
        and the engine's own log-probs of their tokens.

        ``length_sampler`` draws ``max_new_tokens`` per call; ``batch_size`` splits the prompts into
        generation batches (None: all at once); ``min_new_tokens`` forces lengths (benchmarks only: it
        suppresses EOS, so the samples are no longer from the policy)."""
        max_new = int(length_sampler()) if length_sampler is not None else self.config.output_max_length
        sampling = SamplingParams(max_new_tokens=max_new, temperature=self.config.temperature,
                                  min_new_tokens=min_new_tokens)
        return self.rollout_engine.generate(prompts, sampling, batch_size=batch_size)

    def generate(self, prompts: Sequence[torch.Tensor], length_sampler: Optional[Callable[[], int]] = None,
                 batch_size: Optional[int] = None, min_new_tokens: int = 0) -> list[torch.Tensor]:
        """``rollout(...).responses``: 1-D tensors, each cut right after its first EOS (EOS included)."""
        return self.rollout(prompts, length_sampler, batch_size, min_new_tokens).responses

    def ended_with_eos(self, responses: Sequence[torch.Tensor]) -> torch.Tensor:
        """Bool per response from ``generate``: True if it finished with EOS (not cut by length)."""
        return ends_with_eos(responses, self.eos_token_id)

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

    def build_batch(self, prompts: list[torch.Tensor], responses: list[torch.Tensor]) -> dict[str, Any]:
        """Concatenate left-padded prompts (width P) and right-padded responses (width R)."""
        longest_prompt = max(p.numel() for p in prompts)
        prompt_width = padded_width(longest_prompt, self._static_prompt_width, self.config.pad_to_multiple_of)
        prompt_ids, prompt_mask = self._pad(prompts, prompt_width, "left")
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
    def _response_inputs(batch: dict[str, Any], rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``rows``' full-width inputs: every forward keeps the batch's one padded width (static shapes on HPU)."""
        return batch["input_ids"][rows], batch["attention_mask"][rows], batch["position_ids"][rows]

    @staticmethod
    def _padded_labels(response_ids: torch.Tensor) -> torch.Tensor:
        """Response ids plus a dummy label for the last position, which predicts no response token.

        The model's last R + 1 outputs are reduced over the vocabulary with these, and the dummy column
        is dropped only then (``[:, :-1]`` of a (B, R + 1) tensor): slicing the logits instead would cost a
        logits-sized zero-filled gradient in the backward."""
        return torch.nn.functional.pad(response_ids, (0, 1))

    def _sampling_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits of the distribution responses are sampled from (``/ temperature``), float32."""
        logits = logits.float()
        return logits if self.config.temperature == 1.0 else logits / self.config.temperature

    def policy_pass(self, batch: dict[str, Any], rows) -> tuple[torch.Tensor, torch.Tensor]:
        """(sampling logits at the last R + 1 positions, values at the R response positions) of ``rows``,
        through ``self.model``; the logits' last position predicts nothing (see ``_padded_labels``).

        The one computation behind the old log-probs (rollout) and the new ones (update): both run
        with dropout off (eval mode), so the ratio is exactly 1 before the first update of a step
        whatever ``lora_dropout`` is."""
        r = batch["response_ids"].shape[1]
        # Logits only for the R + 1 positions that end the sequence: no LM-head work for prompts.
        logits, values = self.model(*self._response_inputs(batch, rows), logits_to_keep=r + 1)
        return self._sampling_logits(logits), values[:, :-1].float() if values is not None else None

    def response_logprobs_and_entropy(self, logits: torch.Tensor, response_ids: torch.Tensor,
                                      entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Per response token: log-prob and entropy from ``policy_pass``'s logits."""
        logprobs, entropy = logprobs_and_entropy(logits, self._padded_labels(response_ids), entropy_grad)
        return logprobs[:, :-1], entropy[:, :-1]

    def response_logprobs(self, logits: torch.Tensor, response_ids: torch.Tensor) -> torch.Tensor:
        """Per response token: log-prob only (the reference: no entropy pass over the vocabulary)."""
        return logprobs_from_logits(logits, self._padded_labels(response_ids))[:, :-1]

    @torch.no_grad()
    def rollout_forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Old log-probs, values, reference log-probs and entropies of the sampled responses."""
        was_training = self.policy.training
        self.policy.eval()
        r = batch["response_ids"].shape[1]
        parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "ref_logprobs": [], "values": [], "entropy": []}
        try:
            for i in range(0, batch["input_ids"].shape[0], self.config.mini_batch_size):
                rows = slice(i, i + self.config.mini_batch_size)
                labels = batch["response_ids"][rows]
                logits, values = self.policy_pass(batch, rows)
                logprobs, entropy = self.response_logprobs_and_entropy(logits, labels)
                parts["logprobs"].append(logprobs)
                parts["entropy"].append(entropy)
                if values is not None:
                    parts["values"].append(values)
                ref_logits = self.policy.reference_logits(*self._response_inputs(batch, rows), logits_to_keep=r + 1)
                parts["ref_logprobs"].append(self.response_logprobs(self._sampling_logits(ref_logits), labels))
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
        return dict(zip(keys, self.strategy.reduce(tensor).tolist()))

    def _optimizer_step(self) -> float:
        """End of an accumulation window: clip, step, zero the gradients; returns the norm before clipping."""
        return self.strategy.optimizer_step([p for p in self.policy.parameters() if p.requires_grad], self.optimizer)

    # ---------------------------------------------------------------- experience

    def make_experience(
        self,
        prompt_ids: Sequence[torch.Tensor],
        response_ids: Sequence[torch.Tensor],
        scores: Union[Scores, Sequence[float], torch.Tensor],
        sampler_logprobs: Optional[Sequence[torch.Tensor]] = None,
    ) -> tuple[Experience, Scores]:
        """Rollout forward (no grad: old log-probs, values, reference log-probs), then advantages."""
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

        batch = self.build_batch(prompts, responses)
        rollout = self.rollout_forward(batch)
        mask = batch["response_mask"].float()
        ended = self.ended_with_eos(responses).to(self.device)
        loss_mask = mask * ended.unsqueeze(1).float() if cfg.mask_truncated_completions else mask
        kl = (rollout["logprobs"] - rollout["ref_logprobs"]) * mask
        kl_coef = self.kl_ctl.value
        # The KL to the reference is a reward penalty (its weight beta whatever the estimator), or
        # (use_kl_loss) a k3 loss term in the update instead.
        advantages, returns = ADVANTAGE_ESTIMATORS[cfg.advantage_estimator](AdvantageInputs(
            scores=shaped, kl=kl, mask=mask, kl_coef=0.0 if cfg.use_kl_loss else kl_coef,
            values=rollout.get("values"), group_size=cfg.num_generations, gamma=cfg.gamma, lam=cfg.lam,
            whiten_rewards=cfg.whiten_rewards, scale_rewards=cfg.scale_rewards))
        sampled, weights = None, None
        if sampler_logprobs is not None:
            sampled = torch.nn.utils.rnn.pad_sequence(
                [torch.as_tensor(s, dtype=torch.float32).reshape(-1) for s in sampler_logprobs], batch_first=True
            ).to(self.device)
            sampled = torch.nn.functional.pad(sampled, (0, mask.shape[1] - sampled.shape[1]))
            if cfg.vllm_importance_sampling_correction and not self.rollout_engine.samples_from_policy:
                weights = torch.exp(rollout["logprobs"] - sampled).clamp(max=cfg.vllm_importance_sampling_cap)
        experience = Experience(
            batch=batch, logprobs=rollout["logprobs"], ref_logprobs=rollout["ref_logprobs"],
            values=rollout.get("values"), entropy=rollout["entropy"], advantages=advantages, returns=returns,
            mask=mask, loss_mask=loss_mask, kl=kl, kl_coef=kl_coef, ended_with_eos=ended,
            sampler_logprobs=sampled, is_weights=weights)
        return experience, scores

    # ---------------------------------------------------------------- update

    def _loss_window(self, loss_mask: torch.Tensor) -> LossWindow:
        """The normalisers of the accumulation window whose rows' loss tokens are ``loss_mask``."""
        # every process's tokens, so that the step is one token mean over all of them
        tokens = self.strategy.reduce(loss_mask.sum(), reduction="sum") / self.num_processes
        return LossWindow(tokens=float(tokens), sequences=loss_mask.shape[0],
                          minibatches=self.config.gradient_accumulation_steps,
                          max_length=self.config.output_max_length)

    def minibatch_loss(self, experience: Experience, idx, window: LossWindow
                       ) -> tuple[torch.Tensor, PolicyLossResult, dict[str, torch.Tensor]]:
        """The differentiable loss of minibatch rows ``idx`` (already normalised over ``window``), the
        policy loss's typed result, and display statistics (token means over the minibatch)."""
        cfg = self.config
        batch = experience.batch
        logits, values = self.policy_pass(batch, idx)
        new_logprobs, entropy = self.response_logprobs_and_entropy(logits, batch["response_ids"][idx],
                                                                   entropy_grad=bool(cfg.entropy_coef))
        loss_mask = experience.loss_mask[idx]
        result = POLICY_LOSSES[cfg.importance_sampling_level](
            new_logprobs, experience.logprobs[idx], experience.advantages[idx], loss_mask,
            cfg.cliprange, cfg.epsilon_high if cfg.epsilon_high is not None else cfg.cliprange)
        per_token = result.per_token_loss
        if experience.is_weights is not None:
            per_token = per_token * experience.is_weights[idx]
        stats = {"loss/policy": masked_mean(per_token.detach(), loss_mask), "policy/approxkl": result.approxkl,
                 "policy/clipfrac": result.clipfrac, "policy/ratio_mean": result.ratio_mean}
        if cfg.use_kl_loss:
            token_kl = k3_kl(new_logprobs, experience.ref_logprobs[idx])
            weighted = token_kl * result.ratio if cfg.use_bias_correction_kl else token_kl
            per_token = per_token + experience.kl_coef * weighted
            stats["loss/kl"] = masked_mean(token_kl.detach(), loss_mask)
        aggregate = LOSS_AGGREGATIONS[cfg.resolved_loss_type]
        loss = aggregate(per_token, loss_mask, window)
        if cfg.has_critic:
            old_values, returns = experience.values[idx], experience.returns[idx]
            value_loss, value_clipped = clipped_value_loss(values, old_values, returns, cfg.cliprange_value)
            loss = loss + cfg.vf_coef * aggregate(value_loss, loss_mask, window)
            stats["loss/value"] = masked_mean(value_loss.detach(), loss_mask)
            stats["value/clipfrac"] = masked_mean(value_clipped.float(), loss_mask)
            stats["value/error"] = masked_mean((values.detach() - returns) ** 2, loss_mask)
        if cfg.entropy_coef:
            # a token mean over the window whatever --loss_type (TRL: the same meaning for every loss type)
            loss = loss - cfg.entropy_coef * LOSS_AGGREGATIONS["dapo"](entropy, loss_mask, window)
        stats["policy/entropy"] = masked_mean(entropy.detach(), experience.mask[idx])
        stats["loss/total"] = loss.detach() * window.minibatches
        return loss, result, stats

    def step(
        self,
        prompt_ids: Sequence[torch.Tensor],
        response_ids: Sequence[torch.Tensor],
        scores: Union[Scores, Sequence[float], torch.Tensor],
        timings: Optional[dict[str, float]] = None,
        sampler_logprobs: Optional[Sequence[torch.Tensor]] = None,
    ) -> dict[str, float]:
        """One optimisation step on ``batch_size`` rollouts; returns the step's stats.

        ``prompt_ids``: unpadded 1-D prompt tensors; ``response_ids``: responses as returned by
        ``generate``; ``scores``: ``score``'s result (or one float per rollout, taken as raw and
        shaped alike); ``timings``: the caller's ``time/*_s`` for generation and scoring, added
        to the stats and to ``time/step_s``; ``sampler_logprobs``: ``rollout(...).logprobs``, for the
        sampler/trainer mismatch (and the importance-sampling correction of an engine that is not the
        policy itself).
        """
        start = time.perf_counter()
        cfg = self.config
        experience, scores = self.make_experience(prompt_ids, response_ids, scores, sampler_logprobs)
        forward_s = time.perf_counter() - start

        # PPO epochs over shuffled minibatches with gradient accumulation. Eval mode, as the
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
                window = self._loss_window(experience.loss_mask[order[b : b + cfg.backward_batch_size]])
                did_backward = False
                for m in range(b, b + cfg.backward_batch_size, cfg.mini_batch_size):
                    idx = order[m : m + cfg.mini_batch_size]
                    loss, result, stats = self.minibatch_loss(experience, idx, window)
                    stats = dict(zip(stats, torch.stack([v.detach().float() for v in stats.values()]).tolist()))
                    mb_stats.append(stats)
                    approxkl, ratio_mean = self._reduce_tensor(torch.stack([result.approxkl, result.ratio_mean]))
                    if cfg.early_stopping and approxkl > 1.5 * cfg.target_kl:
                        early_stopped = True  # stop before pushing the policy further away
                        break
                    if not ratio_mean <= cfg.ratio_threshold:  # also catches NaN
                        skipped += 1
                        continue
                    self.strategy.backward(loss)
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
        stats = self._step_stats(experience, scores, mb_stats, grad_norms, skipped, early_stopped)
        if not self.rollout_engine.samples_from_policy:  # the engine samples the next step from these weights
            pushed = time.perf_counter()
            self.rollout_engine.push_weights(self.policy.model)
            stats["time/push_s"] = time.perf_counter() - pushed
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

    def _reduce_tensor(self, values: torch.Tensor) -> list[float]:
        """Mean over processes of a small tensor of statistics, as floats (one collective)."""
        return self.strategy.reduce(values.detach().float()).tolist()

    def _step_stats(self, exp: Experience, scores: Scores, mb_stats: list[dict[str, float]],
                    grad_norms: list[float], skipped: int, early_stopped: bool) -> dict[str, float]:
        """The step's statistics, averaged over processes. The reward model's raw score comes first: it is
        the result; the shaped score is what the update optimised."""
        cfg = self.config
        mask = exp.mask
        kl_per_seq = exp.kl.sum(1)
        non_score_per_seq = -(0.0 if cfg.use_kl_loss else exp.kl_coef) * kl_per_seq
        shaped = scores.shaped.to(self.device)
        stats: dict[str, float] = {
            "objective/raw_scores": scores.raw.mean().item(),
            "objective/eos_penalty": scores.eos_penalty.mean().item(),
            "objective/scores": shaped.mean().item(),
            "objective/kl": kl_per_seq.mean().item(),
            "objective/kl_coef": exp.kl_coef,
            "objective/entropy": (-exp.logprobs * mask).sum(1).mean().item(),
            "objective/token_entropy": masked_mean(exp.entropy, mask).item(),
            "objective/non_score_reward": non_score_per_seq.mean().item(),
            "objective/rlhf_reward": (shaped + non_score_per_seq).mean().item(),
            "response/length": mask.sum(1).mean().item(),
            "response/ended_with_eos": exp.ended_with_eos.float().mean().item(),
            "ppo/early_stopped": float(early_stopped),
            "ppo/skipped_minibatches": float(skipped),
            "ppo/minibatches": float(len(mb_stats)),
            "ppo/optimizer_steps": float(len(grad_norms)),
            "ppo/grad_norm": float(np.mean(grad_norms)) if grad_norms else 0.0,
            "ppo/learning_rate": float(self.optimizer.param_groups[0]["lr"]),
            "ppo/first_minibatch_approxkl": mb_stats[0]["policy/approxkl"],
        }
        if exp.sampler_logprobs is not None:  # the sampler's log-probs against the trainer's, as TRL/verl log
            gap = (exp.sampler_logprobs - exp.logprobs).abs() * mask
            stats["rollout/logprob_mismatch_max"] = gap.max().item()
            stats["rollout/logprob_mismatch_mean"] = (gap.sum() / mask.sum()).item()
            if exp.is_weights is not None:
                stats["rollout/is_ratio_mean"] = masked_mean(exp.is_weights, mask).item()
        if cfg.has_critic:
            stats["value/mean"] = masked_mean(exp.values, mask).item()
            stats["returns/mean"] = masked_mean(exp.returns, mask).item()
        else:
            stats["advantages/zero_groups"] = float((exp.advantages.abs().sum(1).reshape(-1, cfg.num_generations)
                                                     .sum(1) == 0).float().mean())
        for key in mb_stats[0]:
            stats[key] = float(np.mean([s[key] for s in mb_stats]))
        stats = self._reduce(stats)
        stats["objective/kl_coef"] = exp.kl_coef
        return stats

    # ---------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, prompt_texts: list[str], prompt_ids: list[torch.Tensor], batch_size: Optional[int] = None,
                 columns: Optional[dict[str, list]] = None):
        """Held-out metrics and samples, no update. Samples with the current settings (global RNG).

        Returns ``(metrics, samples)``. Metrics, the reward model's raw score first: ``eval/raw_scores``,
        ``eval/eos_penalty``, ``eval/scores`` (what PPO optimises), ``eval/kl`` (mean per-response KL
        to the reference), ``eval/response_length``, ``eval/finished`` (the fraction that ended with EOS
        rather than at ``--output_max_length``). Samples: this process's ``{"prompt", "response",
        "raw_score", "score", "kl", "length", "finished"}`` dicts. ``columns``: the prompts' other dataset columns,
        passed to the reward function as ``columns=`` (sliced per batch).
        """
        size = batch_size or self.config.batch_size
        totals = dict.fromkeys(("eval/raw_scores", "eval/eos_penalty", "eval/scores", "eval/kl",
                                "eval/response_length", "eval/finished"), 0.0)
        samples: list[dict] = []
        batches = tqdm(range(0, len(prompt_ids), size), desc="held-out eval", unit="batch", leave=False,
                       disable=not self.accelerator.is_main_process)
        for i in batches:
            chunk = [p.to(self.device) for p in prompt_ids[i : i + size]]
            texts = prompt_texts[i : i + size]
            responses = self.generate(chunk)
            extra = {"columns": {k: v[i : i + size] for k, v in columns.items()}} if columns else {}
            scores = self.score(texts, responses, **extra)
            batch = self.build_batch(chunk, responses)
            rollout = self.rollout_forward(batch)
            mask = batch["response_mask"].float()
            kl = ((rollout["logprobs"] - rollout["ref_logprobs"]) * mask).sum(1)
            finished = self.ended_with_eos(responses)
            totals["eval/raw_scores"] += scores.raw.sum().item()
            totals["eval/eos_penalty"] += scores.eos_penalty.sum().item()
            totals["eval/scores"] += scores.shaped.sum().item()
            totals["eval/kl"] += kl.sum().item()
            lengths = mask.sum(1)
            totals["eval/response_length"] += lengths.sum().item()
            totals["eval/finished"] += finished.sum().item()
            samples += [
                {"prompt": p, "response": r, "raw_score": float(raw), "score": float(sc), "kl": float(k),
                 "length": int(n), "finished": bool(f)}
                for p, r, raw, sc, k, n, f in zip(texts, self.decode_responses(responses), scores.raw.tolist(),
                                                  scores.shaped.tolist(), kl.tolist(), lengths.tolist(),
                                                  finished.tolist())
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
            # Under DeepSpeed the engine saves its partitioned optimizer itself (save_state): None here.
            "optimizer": self.strategy.optimizer_state(self.optimizer),
            "rng": rng,
            "config": asdict(self.config),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` saved (after loading the model weights).

        Only state is restored (the KL coefficient reached, not the controller's settings): flags
        given to the resumed command, such as a new ``--target``, take effect."""
        self.current_step = int(state["step"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.strategy.load_optimizer_state(self.optimizer, state["optimizer"])
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
        self.strategy.save_engine(folder)
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
        self.strategy.load_engine(folder)
        self.load_state_dict(state)

    def save_policy(self, output_dir, merged_dir=None) -> None:
        """The adapter (or the full weights) and value head into ``output_dir``; with ``merged_dir`` also the
        policy with LoRA merged, for ``from_pretrained``. Call on EVERY process; the main one writes.

        Under ZeRO-3 the weights are first gathered from every rank's partitions (a collective), the
        main process holding a CPU copy: of the trained weights alone when nothing is merged."""
        is_main = self.accelerator.is_main_process
        trained_only = self.policy.is_peft and merged_dir is None
        state = self.strategy.weights_to_save(self.policy, is_main, trained_only)  # ZeRO-3: gathered
        if not is_main:
            return
        partitioned = state is not None
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
