"""Token sequences, written once for every stage: padding, per-token log-probs and entropy, the EOS cut,
and the PEFT check. PPO/GRPO/RLOO (``rlhf.ppo``), the rollout engines (``rlhf.rollout``), DPO
(``rlhf.dpo``) and the reward model (``rlhf.reward``) all use these, so the rules (masks from lengths,
never from comparing ids with the pad id, which may be the EOS id; log-probs in float32) are the same
everywhere. Imports only torch (and peft lazily)."""

from __future__ import annotations

from typing import Sequence

import torch


def pad_sequences(
    sequences: Sequence[Sequence[int] | torch.Tensor], pad_id: int, side: str = "right", pad_to: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """The one padding helper (reward pairs, reward scoring, PPO prompts and responses, DPO's report).

    ``input_ids`` and ``attention_mask`` (N, T), long, on ``device`` (default CPU): T the longest
    sequence, or ``pad_to`` (static shapes; a longer sequence is a ValueError). ``side="left"`` puts
    the pads first (prompts for generation), ``"right"`` after (responses, training pairs); the mask
    is 1 on real tokens, so a row may be empty. Sequences are lists of ids or 1-D tensors."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    rows = [torch.as_tensor(ids, dtype=torch.long).reshape(-1) for ids in sequences]
    length = max((row.numel() for row in rows), default=0)
    if pad_to is not None:
        if length > pad_to:
            raise ValueError(f"a sequence of {length} tokens is longer than pad_to={pad_to}")
        length = pad_to
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long, device=device)
    for index, row in enumerate(rows):
        if not row.numel():
            continue
        span = slice(length - row.numel(), length) if side == "left" else slice(0, row.numel())
        input_ids[index, span] = row.to(input_ids.device)
        attention_mask[index, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1 (over all dims, or along ``dim``); 0 where none is."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def padded_width(longest: int, fixed: int | None = None, multiple: int | None = None) -> int:
    """Width to pad a batch to: ``longest``, or the static ``fixed`` width (HPU graphs: one shape; a longer
    sequence is refused), rounded up to a multiple of ``multiple`` (fewer shapes)."""
    if fixed is not None:
        if longest > fixed:
            from rlhf.errors import UserError

            raise UserError(f"a prompt has {longest} tokens, more than --pad_max_input_len {fixed}; "
                            "raise --pad_max_input_len or truncate prompts")
        longest = fixed
    return longest if not multiple else -(-longest // multiple) * multiple


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., labels]`` computed in float32; shape of ``labels``.

    One fused ``log_softmax`` (whose backward is one fused kernel too), not ``picked - logsumexp``: on
    CPU ``logsumexp`` and its backward are several vocabulary-sized passes and temporaries each (about 5% of
    a SmolLM2 GRPO update's CPU time, profiled)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution given by ``logits`` (last dim), float32."""
    return entropy_from_logprobs(torch.log_softmax(logits.float(), dim=-1))


def entropy_from_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy from normalised log-probabilities over the last dim (``-sum p log p``)."""
    return -(logprobs.exp() * logprobs).sum(-1)


def logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor, entropy_grad: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs_from_logits, entropy_from_logits)`` from ONE ``log_softmax`` of ``logits``; the entropy
    is detached unless ``entropy_grad`` (an entropy bonus in the loss)."""
    all_logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = all_logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked, entropy_from_logprobs(all_logprobs if entropy_grad else all_logprobs.detach())


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


def ends_with_eos(responses: Sequence[Sequence[int] | torch.Tensor], eos_token_id: int) -> torch.Tensor:
    """Bool per response (token ids cut after their first EOS, as the engines return them): True if it
    finished with EOS, False if it was cut by the length limit (or is empty)."""
    rows = [torch.as_tensor(r, dtype=torch.long) for r in responses]
    last = [r[-1:] if r.numel() else r.new_full((1,), -1) for r in rows]  # one comparison, one copy to the CPU
    return (torch.cat(last) == eos_token_id).cpu() if last else torch.zeros(0, dtype=torch.bool)


def is_peft_model(model) -> bool:
    """True for a peft ``PeftModel`` (the adapter can be disabled to get the reference policy)."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is part of both stacks; tolerate its absence for full fine-tuning
        return False
    return isinstance(model, PeftModel)
