"""DPO pieces: the loss, answer log-probs, pair tokenization and collation, the Trainer subclass.

DPO trains the policy directly on preference pairs, with no reward model and no sampling. For a
pair (prompt x, chosen y_w, rejected y_l) and a frozen reference, the implicit rewards are
``beta * (log pi(y|x) - log ref(y|x))`` summed over the ANSWER tokens, and the loss pushes the
chosen reward above the rejected one. Loss types (TRL's names and formulas, TRL 1.16 as the oracle):

- ``sigmoid`` (DPO): ``-logsigmoid(beta * delta)``, delta = chosen log-ratio - rejected log-ratio.
  With ``label_smoothing`` eps > 0 it is conservative DPO (cDPO):
  ``-(1 - eps) * logsigmoid(beta * delta) - eps * logsigmoid(-beta * delta)``.
- ``ipo``: ``(delta_avg - 1 / (2 * beta)) ** 2`` with each log-ratio divided by its answer's token
  count first (as TRL does).
- ``robust`` (rDPO): ``(-(1 - eps) * logsigmoid(beta * delta) + eps * logsigmoid(-beta * delta)) / (1 - 2 eps)``.

Nothing here imports TRL: the Gaudi stack (optimum-habana, transformers 4.55) has none, and DPO
runs there through ``GaudiTrainer`` like the other Trainer stages.

API (used by ``dpo_training.py``):

- ``dpo_loss(...) -> (per-pair losses, chosen rewards, rejected rewards)``: the pure loss.
- ``answer_logps(model, input_ids, attention_mask, completion_mask) -> Tensor[N]``: the summed
  log-probs of the completion tokens (float32).
- ``tokenize_preference(row, tokenizer, max_length, max_prompt_length)``: prompt and answers as SFT
  tokenizes them (``rlhf.sft_data.tokenize_example``: the same BOS handling and prompt/answer
  boundary), EOS appended unless truncated; ``tokenize_preferences`` maps a dataset and counts the
  truncated pairs.
- ``DPOPairCollator(pad_id, pad_to=None)``: 2B rows (chosen first), right-padded, with
  ``completion_mask`` and, when present, the precomputed ``ref_chosen_logps``/``ref_rejected_logps``.
- ``dpo_metrics(eval_pred)``: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
  ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` over a whole evaluation set.
- ``make_dpo_trainer_class(base)``: a subclass of ``Trainer`` or ``GaudiTrainer`` with the DPO
  ``compute_loss``; the reference is ``ref_model`` (a frozen copy; under DeepSpeed ZeRO-3 its own
  inference engine, ``rlhf.zero.inference_engine``), else the policy with its LoRA adapter disabled,
  else the precomputed columns. Training logs carry the same reward keys.
- ``sample_responses(...)`` / ``heldout_kl(...)``: held-out generations and their KL to the
  reference, for the before/after report.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from rlhf.errors import UserError
from rlhf.modeling import position_ids_from_mask
from rlhf.rollout import HFEngine, SamplingParams
from rlhf.sequences import is_peft_model, logprobs_from_logits, pad_sequences
from rlhf.tokenization import encode_text, keep_end

logger = logging.getLogger("rlhf")

LOSS_TYPES = ("sigmoid", "ipo", "robust")
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
LOGP_KEYS = ("logps/chosen", "logps/rejected")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def check_dpo_settings(beta: float, loss_type: str, label_smoothing: float) -> None:
    """One line for a bad --beta / --loss_type / --label_smoothing (before any model is loaded)."""
    import math

    if loss_type not in LOSS_TYPES:
        raise UserError(f"--loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise UserError(f"--beta {beta} must be a positive number; TRL's default is 0.1")
    if not 0 <= label_smoothing < 0.5:
        raise UserError(f"--label_smoothing {label_smoothing} is out of range; use 0 <= eps < 0.5")
    if label_smoothing and loss_type == "ipo":
        raise UserError("--label_smoothing applies to --loss_type sigmoid (cDPO) and robust, not ipo; drop it")


# ---------------------------------------------------------------- the loss


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the implicit rewards ``beta * log-ratio`` (detached) of each answer.

    Log-probs are sums over each answer's tokens; ``*_lengths`` (answer token counts) are needed by
    ``ipo`` only. Take ``.mean()`` of the losses for the batch loss, as TRL does."""
    chosen_logratios = chosen_logps.float() - ref_chosen_logps.to(chosen_logps.device).float()
    rejected_logratios = rejected_logps.float() - ref_rejected_logps.to(rejected_logps.device).float()
    delta = chosen_logratios - rejected_logratios
    eps = float(label_smoothing)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
        if eps:
            losses = (1 - eps) * losses - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the ipo loss needs the answers' token counts (chosen_lengths, rejected_lengths)")
        chosen_avg = chosen_logratios / chosen_lengths.to(delta.device).float().clamp(min=1.0)
        rejected_avg = rejected_logratios / rejected_lengths.to(delta.device).float().clamp(min=1.0)
        losses = (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# ---------------------------------------------------------------- log-probs


def answer_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum of ``log p(token | previous tokens)`` over the tokens where ``completion_mask`` is 1: Tensor[N].

    A token's log-prob comes from the logits one position earlier, so an answer token at position 0
    (no prompt) has none and is left out, as in TRL."""
    outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    token_logps = logprobs_from_logits(outputs.logits[:, :-1], input_ids[:, 1:])
    mask = completion_mask[:, 1:].to(token_logps.dtype)
    return (token_logps * mask).sum(-1)


# ---------------------------------------------------------------- tokenization


def tokenize_preference(row: dict, tokenizer, max_length: int, max_prompt_length: int) -> dict:
    """``prompt + chosen`` and ``prompt + rejected`` as SFT tokenizes an example (the same prompt ids,
    BOS once, answer tokens after the same boundary, EOS appended unless the answer was cut)."""
    from rlhf.sft_data import IGNORE_INDEX, tokenize_example

    tokenized = {}
    truncated = False
    for side in ("chosen", "rejected"):
        example = tokenize_example(row["prompt"], row[side], tokenizer, max_length, max_prompt_length, False)
        mask = [int(label != IGNORE_INDEX) for label in example["labels"]]
        answer_tokens = len(tokenizer(row[side], add_special_tokens=False)["input_ids"])
        answer_tokens += tokenizer.eos_token_id is not None
        prompt_tokens = len(mask) - sum(mask)
        truncated = truncated or sum(mask) < answer_tokens or prompt_tokens >= max_prompt_length
        tokenized[f"{side}_input_ids"] = example["input_ids"]
        tokenized[f"{side}_completion_mask"] = mask
    tokenized["truncated"] = truncated
    return tokenized


def tokenize_preferences(dataset, tokenizer, max_length: int, max_prompt_length: int, workers: int | None = None):
    """Tokenize a prompt/chosen/rejected dataset; returns (dataset, number of pairs truncated).

    Over-long prompts keep their end (the question); over-long answers keep their start."""
    tokenized = dataset.map(
        tokenize_preference,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "max_prompt_length": max_prompt_length},
        remove_columns=dataset.column_names, num_proc=workers, desc="Tokenizing pairs",
    )
    truncated = int(sum(tokenized["truncated"]))
    return tokenized.remove_columns("truncated"), truncated


# ---------------------------------------------------------------- collation


@dataclass
class DPOPairCollator:
    """Pads chosen and rejected sequences into one batch of 2B rows, chosen rows first, on the right.

    Returns ``input_ids``, ``attention_mask``, ``completion_mask`` (2B, T) and, when the features
    carry them, ``ref_chosen_logps``/``ref_rejected_logps`` (B,). ``pad_to`` fixes T (static shapes
    on HPU)."""

    pad_token_id: int
    pad_to: int | None = None

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        sides = ("chosen", "rejected")
        batch = pad_right([f[f"{s}_input_ids"] for s in sides for f in features],
                          [f[f"{s}_completion_mask"] for s in sides for f in features], self.pad_token_id, self.pad_to)
        if features and REF_COLUMNS[0] in features[0]:
            for column in REF_COLUMNS:
                batch[column] = torch.tensor([float(f[column]) for f in features], dtype=torch.float32)
        return batch


def pad_right(sequences: Sequence[Sequence[int]], completion_masks: Sequence[Sequence[int]], pad_id: int,
              pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``completion_mask`` (N, T), right-padded; T the longest or ``pad_to``."""
    batch = pad_sequences(sequences, pad_id, "right", pad_to)
    batch["completion_mask"] = pad_sequences(completion_masks, 0, "right", batch["input_ids"].shape[1])["input_ids"]
    return batch


# ---------------------------------------------------------------- metrics


def reward_statistics(chosen_rewards, rejected_rewards) -> dict[str, float]:
    chosen = torch.as_tensor(chosen_rewards, dtype=torch.float64).reshape(-1)
    rejected = torch.as_tensor(rejected_rewards, dtype=torch.float64).reshape(-1)
    return {
        "rewards/chosen": float(chosen.mean()),
        "rewards/rejected": float(rejected.mean()),
        "rewards/accuracies": float((chosen > rejected).double().mean()),
        "rewards/margins": float((chosen - rejected).mean()),
    }


def dpo_metrics(eval_pred) -> dict[str, float]:
    """From predictions of shape (N, 4) = [chosen reward, rejected reward, chosen logp, rejected logp]."""
    predictions = eval_pred.predictions if hasattr(eval_pred, "predictions") else eval_pred[0]
    values = torch.as_tensor(predictions, dtype=torch.float64).reshape(-1, 4)
    metrics = reward_statistics(values[:, 0], values[:, 1])
    metrics["logps/chosen"] = float(values[:, 2].mean())
    metrics["logps/rejected"] = float(values[:, 3].mean())
    return metrics


# ---------------------------------------------------------------- trainer


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in every ``nn.Dropout`` (TRL's ``disable_dropout=True``): the policy's and the
    reference's log-probs must be comparable, and equal at the start."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def make_dpo_trainer_class(base_trainer_class: type) -> type:
    """A subclass of ``base_trainer_class`` (transformers' Trainer or optimum-habana's GaudiTrainer)
    that trains on ``DPOPairCollator`` batches with ``dpo_loss``.

    Extra keyword arguments: ``beta``, ``loss_type``, ``label_smoothing``, ``ref_model`` (a frozen
    copy; None: the LoRA-disabled policy, or precomputed reference log-probs in the batches)."""

    class DPOTrainer(base_trainer_class):
        def __init__(self, *args, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                     ref_model=None, **kwargs):
            super().__init__(*args, **kwargs)
            # The loss is a mean over the batch's pairs, not normalised by a token count the Trainer passes:
            # let the Trainer divide it by the gradient-accumulation steps (transformers 4.55 and 5).
            self.model_accepts_loss_kwargs = False
            self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
            if ref_model is not None:
                ref_model.requires_grad_(False).eval()
                if self._zero3():  # partitioned as it loaded: its own engine gathers it layer by layer
                    from rlhf.zero import inference_engine

                    ref_model = inference_engine(ref_model, self.accelerator.state.deepspeed_plugin.deepspeed_config)
                else:
                    ref_model.to(self.args.device)
            self.ref_model = ref_model
            self._dpo_sums: torch.Tensor | None = None  # [chosen, rejected, accuracy, margin, logp c, logp r, count]

        def _zero3(self) -> bool:
            if not getattr(self, "is_deepspeed_enabled", False):
                return False
            from transformers.integrations import is_deepspeed_zero3_enabled

            return is_deepspeed_zero3_enabled()

        # ---- reference log-probs

        def _reference_context(self, model):
            if self.ref_model is None and is_peft_model(self.accelerator.unwrap_model(model)):
                return self.accelerator.unwrap_model(model).disable_adapter()
            return contextlib.nullcontext()

        def reference_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
            if REF_COLUMNS[0] in inputs:
                return inputs[REF_COLUMNS[0]], inputs[REF_COLUMNS[1]]
            reference = self.ref_model if self.ref_model is not None else model
            if self.ref_model is None and not is_peft_model(self.accelerator.unwrap_model(model)):
                raise RuntimeError("DPO without LoRA needs a reference copy (ref_model) or precomputed reference log-probs")
            with torch.no_grad(), self._reference_context(model):
                logps = answer_logps(reference, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
            return logps.chunk(2)

        def precompute_reference(self, dataset, description: str = "train"):
            """``dataset`` with the reference's answer log-probs as columns (computed once, in eval mode).

            With no copy and no adapter the reference is the model itself: call this before training."""
            from torch.utils.data import DataLoader

            model = self.model
            loader = DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size, shuffle=False,
                                collate_fn=self.data_collator)
            reference = self.ref_model if self.ref_model is not None else model
            was_training = model.training
            model.eval()
            chosen, rejected = [], []
            try:
                with torch.no_grad(), self._reference_context(model):
                    for batch in loader:
                        batch = {k: v.to(self.args.device) for k, v in batch.items()}
                        logps = answer_logps(reference, batch["input_ids"], batch["attention_mask"],
                                             batch["completion_mask"]).cpu()
                        c, r = logps.chunk(2)
                        chosen += c.tolist()
                        rejected += r.tolist()
            finally:
                model.train(was_training)
            logger.info("Reference log-probs precomputed for %d %s pairs", len(chosen), description)
            for column in REF_COLUMNS:
                if column in dataset.column_names:
                    dataset = dataset.remove_columns(column)
            return dataset.add_column(REF_COLUMNS[0], chosen).add_column(REF_COLUMNS[1], rejected)

        # ---- loss

        def dpo_forward(self, model, inputs) -> dict[str, torch.Tensor]:
            logps = answer_logps(model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
            chosen_logps, rejected_logps = logps.chunk(2)
            ref_chosen, ref_rejected = self.reference_logps(model, inputs)
            lengths = inputs["completion_mask"].sum(-1)
            chosen_lengths, rejected_lengths = lengths.chunk(2)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen_logps, rejected_logps, ref_chosen, ref_rejected, self.beta, self.loss_type,
                self.label_smoothing, chosen_lengths, rejected_lengths,
            )
            return {"loss": losses.mean(), "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
                    "chosen_logps": chosen_logps.detach(), "rejected_logps": rejected_logps.detach()}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = self.dpo_forward(model, inputs)
            if model.training:
                self._accumulate(outputs)
            return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

        def _accumulate(self, outputs) -> None:
            chosen, rejected = outputs["chosen_rewards"], outputs["rejected_rewards"]
            sums = torch.stack([
                chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(), (chosen - rejected).sum(),
                outputs["chosen_logps"].sum(), outputs["rejected_logps"].sum(),
                torch.tensor(float(chosen.numel()), device=chosen.device),
            ]).float()
            self._dpo_sums = sums if self._dpo_sums is None else self._dpo_sums + sums

        def log(self, logs: dict, *args, **kwargs) -> None:
            # Training logs get the means since the last log, over every process (TRL's key names).
            if self._dpo_sums is not None and not any(key.startswith("eval_") for key in logs):
                sums = self._dpo_sums
                if self.args.world_size > 1:
                    sums = self.accelerator.gather(sums.unsqueeze(0)).sum(0)
                values = (sums[:6] / sums[6].clamp(min=1)).tolist()
                logs.update(dict(zip((*REWARD_KEYS, *LOGP_KEYS), values)))
                self._dpo_sums = None
            super().log(logs, *args, **kwargs)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                outputs = self.dpo_forward(model, inputs)
            loss = outputs["loss"].detach()
            if prediction_loss_only:
                return loss, None, None
            predictions = torch.stack([outputs["chosen_rewards"], outputs["rejected_rewards"],
                                       outputs["chosen_logps"], outputs["rejected_logps"]], dim=1)
            labels = torch.zeros(predictions.shape[0], device=predictions.device)
            return loss, predictions, labels

    DPOTrainer.__name__ = DPOTrainer.__qualname__ = f"DPO{base_trainer_class.__name__}"
    return DPOTrainer


# ---------------------------------------------------------------- held-out generations (report)


def prompt_ids_like_sft(tokenizer, prompt: str, max_prompt_length: int) -> list[int]:
    """The prompt ids SFT and DPO train on (``rlhf.tokenization``'s rule), keeping the prompt's end."""
    return keep_end(encode_text(tokenizer, prompt), max_prompt_length)


def sample_responses(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, max_prompt_length: int,
                     batch_size: int, seed: int, device) -> list[list[int]]:
    """Sample one response per prompt with the ``hf`` rollout engine, PPO's sampler (temperature 1, nothing
    truncated, the checkpoint's generation_config ignored; seeded: the same noise before and after
    training); each response's token ids up to and including the first EOS."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    engine = HFEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, device)
    rows = [torch.tensor(prompt_ids_like_sft(tokenizer, p, max_prompt_length)) for p in prompts]
    try:
        rollout = engine.generate(rows, SamplingParams(max_new_tokens=max_new_tokens), batch_size=batch_size)
    finally:
        torch.set_rng_state(state)
    return [response.tolist() for response in rollout.responses]


@torch.no_grad()
def heldout_kl(model, ref_model, tokenizer, prompts: Sequence[str], responses: Sequence[list[int]],
               max_prompt_length: int, batch_size: int, device) -> float:
    """Mean over responses of ``sum_t log pi(y_t) - log ref(y_t)`` (nats per response): the KL the
    PPO report shows. ``ref_model`` None: the policy with its adapter disabled."""
    totals = 0.0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            ids, masks = [], []
            for prompt, response in zip(prompts[start : start + batch_size], responses[start : start + batch_size]):
                prompt_ids = prompt_ids_like_sft(tokenizer, prompt, max_prompt_length)
                ids.append(prompt_ids + list(response))
                masks.append([0] * len(prompt_ids) + [1] * len(response))
            batch = {k: v.to(device) for k, v in pad_right(ids, masks, tokenizer.pad_token_id).items()}
            args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            policy = answer_logps(model, *args)
            if ref_model is not None:
                reference = answer_logps(ref_model, *args)
            else:
                with model.disable_adapter():
                    reference = answer_logps(model, *args)
            totals += float((policy - reference).sum())
    finally:
        model.train(was_training)
    return totals / max(len(prompts), 1)
