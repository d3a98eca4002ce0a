"""Reward model pieces: pairwise loss, pair tokenization and collation, score pooling, trainer, scorer.

The reward model is a sequence classifier with one output. Its score for a text is the score head's
output at the LAST REAL token (the last position whose attention mask is 1), whatever the padding
side. ``sequence_scores`` reads it with a forward hook on the score head instead of relying on
transformers' pooling, which finds the last token by comparing ids with ``pad_token_id`` and so
goes wrong when the pad token is also the EOS (SmolLM2, Llama-2 with pad = eos) or when the text
itself ends with that id. Position ids are computed from the attention mask, so left- and
right-padded batches score exactly like unpadded single texts.

API (used by ``reward_modeling.py`` and by PPO):

- ``pairwise_loss(chosen, rejected, margin=None)``: mean of ``-logsigmoid(r_chosen - r_rejected - margin)``.
- ``find_score_head(model)``: the per-position score head (``score`` / ``classifier``), also through
  a ``PeftModel`` (its ``modules_to_save`` wrapper) or a DDP wrapper.
- ``sequence_scores(model, input_ids, attention_mask) -> Tensor[B]`` (float32).
- ``tokenize_pair(...)`` / ``tokenize_pairs(...)``: prompt+answer
  token ids (special tokens added unless the text already starts with BOS, e.g. a chat template),
  over-long pairs truncated (keeping the end: the reward is read at the last token) or dropped.
- ``pad_sequences(sequences, pad_id, side="right", pad_to=None, device=None)``: the one padding helper
  (left or right, ``input_ids`` + ``attention_mask``), also used by PPO.
- ``RewardPairCollator(tokenizer, pad_to=None)``: pads chosen and rejected into ONE batch of 2B rows
  (chosen rows first), plus ``margin`` when present.
- ``reward_metrics(eval_pred)``: accuracy, mean margin, chosen/rejected means, score mean/std.
- ``make_reward_trainer_class(base)``: a subclass of transformers' ``Trainer`` or optimum-habana's
  ``GaudiTrainer`` with the pairwise ``compute_loss`` and a ``prediction_step`` returning
  ``(loss, [chosen, rejected] scores, dummy labels)`` so evaluation gets the scores.
- ``score_statistics(scores)``, ``store_reward_stats(config, mean, std, pairs=None)``,
  ``reward_stats_from_config(config) -> (mean, std) | None``: the normalisation PPO uses;
  ``reward_stats_sample(dataset, samples, seed)``: the seeded random subset of training pairs it is
  measured on (``samples`` 0: all), its size saved as ``reward_stats_pairs``.
- ``RewardScorer(model, tokenizer, batch_size, max_length, device, normalize)``: callable
  ``(prompts, responses) -> Tensor[N]`` scoring prompt+response in batches under ``torch.no_grad``.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from rlhf.errors import UserError
from rlhf.modeling import load_config, merge_lora, position_ids_from_mask
from rlhf.sequences import pad_sequences
from rlhf.tokenization import encode_text, keep_end

logger = logging.getLogger("rlhf")

SCORE_HEAD_NAMES = ("score", "classifier")
OVERFLOW_CHOICES = ("truncate", "drop")
CONFIG_MEAN_KEY = "reward_mean"
CONFIG_STD_KEY = "reward_std"
CONFIG_PAIRS_KEY = "reward_stats_pairs"  # how many training pairs the mean/std were measured on


# ---------------------------------------------------------------- loss


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Bradley-Terry loss ``-logsigmoid(r_chosen - r_rejected - margin)``."""
    difference = chosen.float() - rejected.float()
    if margin is not None:
        difference = difference - margin.to(difference.device, torch.float32)
    return -F.logsigmoid(difference).mean()


# ---------------------------------------------------------------- scoring


def find_score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The classifier head applied at every position (``score`` for Llama-family models).

    Through a PeftModel this is the ``modules_to_save`` wrapper (its output is the trained copy's);
    through DDP the name carries a ``module.`` prefix. The shortest matching name wins.
    """
    best: tuple[int, torch.nn.Module] | None = None
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in SCORE_HEAD_NAMES:
            depth = name.count(".")
            if best is None or depth < best[0]:
                best = (depth, module)
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no score head (a submodule named {' or '.join(SCORE_HEAD_NAMES)})"
        )
    return best[1]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose mask is 1, per row (left or right padding)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * (attention_mask != 0).long()).argmax(-1)


def sequence_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Score head output at each row's last real token: Tensor[B], float32."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if bool((attention_mask.sum(-1) == 0).any()):
        raise ValueError("sequence_scores got a row with no real token (attention mask all zero)")
    head = find_score_head(model)
    captured: list[torch.Tensor] = []

    def keep_output(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, (tuple, list)) else output)

    handle = head.register_forward_hook(keep_output)
    try:
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"the score head of {type(model).__name__} was not called in its forward pass")
    per_position = captured[-1]
    if per_position.dim() != 3 or per_position.shape[:2] != input_ids.shape:
        raise ValueError(
            f"score head output has shape {tuple(per_position.shape)}, expected (batch, length, labels); "
            "only decoder-style classifiers that score every position are supported"
        )
    index = last_token_index(attention_mask).to(per_position.device)
    rows = torch.arange(per_position.shape[0], device=per_position.device)
    return per_position[rows, index, 0].float()


# ---------------------------------------------------------------- tokenization


def tokenize_pair(row: dict, tokenizer, max_length: int) -> dict:
    chosen = encode_text(tokenizer, row["prompt"] + row["chosen"])
    rejected = encode_text(tokenizer, row["prompt"] + row["rejected"])
    tokenized = {
        "input_ids_chosen": keep_end(chosen, max_length),
        "input_ids_rejected": keep_end(rejected, max_length),
        "overlong": max(len(chosen), len(rejected)) > max_length,
        # Trainer's length-grouped sampler (--train_sampling_strategy group_by_length) reads this column;
        # on real data (hh-rlhf: median 130 tokens, 19% over 256) it roughly halves the padding.
        "length": min(max(len(chosen), len(rejected)), max_length),
    }
    if "margin" in row:
        tokenized["margin"] = float(row["margin"])
    return tokenized


def tokenize_pairs(dataset, tokenizer, max_length: int, overflow: str, source: str, workers: int | None = None):
    """Tokenize a prompt/chosen/rejected(/margin) dataset; returns (dataset, number of over-long pairs).

    ``overflow="truncate"`` keeps the last ``max_length`` tokens of each text, ``"drop"`` removes the pair.
    """
    if max_length <= 0:
        raise UserError(f"--max_length {max_length} must be positive")
    if overflow not in OVERFLOW_CHOICES:
        raise UserError(f"--overflow {overflow!r} is not one of {', '.join(OVERFLOW_CHOICES)}")
    tokenized = dataset.map(
        tokenize_pair, fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
        remove_columns=dataset.column_names, num_proc=workers, desc="Tokenizing pairs",
    )
    overlong = int(sum(tokenized["overlong"]))
    if overflow == "drop" and overlong:
        tokenized = tokenized.filter(lambda row: not row["overlong"], num_proc=workers, desc="Dropping over-long pairs")
        if len(tokenized) == 0:
            raise UserError(
                f"{source}: every pair is longer than --max_length {max_length} tokens; raise --max_length "
                "or use --overflow truncate"
            )
    return tokenized.remove_columns("overlong"), overlong


# ---------------------------------------------------------------- collation


class RewardPairCollator:
    """Pads chosen and rejected sequences into one batch of 2B rows (chosen rows first).

    Returns ``input_ids`` and ``attention_mask`` of shape (2B, T) and, when the features carry
    one, ``margin`` of shape (B,). ``pad_to`` fixes T (static shapes on HPU); sequences are never
    longer than it because tokenization already truncated or dropped them.
    """

    def __init__(self, tokenizer, pad_to: int | None = None):
        self.pad_id = tokenizer.pad_token_id
        self.padding_side = getattr(tokenizer, "padding_side", "right")
        self.pad_to = pad_to
        if self.pad_id is None:
            raise UserError("the tokenizer has no pad token; set one (load_tokenizer uses EOS)")

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        sequences = [f["input_ids_chosen"] for f in features] + [f["input_ids_rejected"] for f in features]
        batch = pad_sequences(sequences, self.pad_id, self.padding_side, self.pad_to)
        if features and "margin" in features[0]:
            batch["margin"] = torch.tensor([float(f["margin"]) for f in features], dtype=torch.float32)
        return batch


# ---------------------------------------------------------------- metrics and statistics


def reward_metrics(eval_pred) -> dict[str, float]:
    """From predictions of shape (N, 2) = [chosen score, rejected score] per pair."""
    predictions = eval_pred.predictions if hasattr(eval_pred, "predictions") else eval_pred[0]
    scores = torch.as_tensor(predictions, dtype=torch.float64).reshape(-1, 2)
    chosen, rejected = scores[:, 0], scores[:, 1]
    mean, std = score_statistics(scores.reshape(-1))
    return {
        "accuracy": float((chosen > rejected).double().mean()),
        "mean_margin": float((chosen - rejected).mean()),
        "chosen_mean": float(chosen.mean()),
        "rejected_mean": float(rejected.mean()),
        "score_mean": mean,
        "score_std": std,
    }


def score_statistics(scores: Iterable[float] | torch.Tensor) -> tuple[float, float]:
    """(mean, population std) of a flat collection of scores; std falls back to 1.0 when degenerate."""
    values = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    if values.numel() == 0:
        raise ValueError("no scores to compute statistics from")
    mean = float(values.mean())
    std = float(values.std(unbiased=False)) if values.numel() > 1 else 0.0
    if not math.isfinite(std) or std < 1e-8:
        std = 1.0
    return mean, std


def store_reward_stats(config, mean: float, std: float, pairs: int | None = None) -> None:
    """Save the statistics in ``config``; ``pairs``: how many training pairs they were measured on."""
    setattr(config, CONFIG_MEAN_KEY, float(mean))
    setattr(config, CONFIG_STD_KEY, float(std))
    if pairs is not None:
        setattr(config, CONFIG_PAIRS_KEY, int(pairs))


def reward_stats_sample(dataset, samples: int, seed: int):
    """``samples`` pairs of ``dataset`` drawn at random (the same ones for the same ``seed``, in
    dataset order), or the whole dataset when ``samples`` is 0 or not smaller than it.

    The mean/std of a few hundred random pairs match those of all pairs to within their noise, at
    a fraction of the cost of scoring every training pair again after training.
    """
    if samples < 0:
        raise ValueError(f"samples must be 0 (all) or positive, not {samples}")
    if samples == 0 or samples >= len(dataset):
        return dataset
    import random

    return dataset.select(sorted(random.Random(seed).sample(range(len(dataset)), samples)))


def longest_first(dataset):
    """``dataset`` sorted by its ``length`` column, longest pair first, for scoring: every reward metric is
    order-free, similar lengths batched together pad far less (hh-rlhf pairs: 30 to 256+ tokens), and the
    largest batch comes first, so running out of memory shows at once. Unchanged without the column."""
    if "length" not in dataset.column_names:
        return dataset
    return dataset.sort("length", reverse=True)


def reward_stats_from_config(config) -> tuple[float, float] | None:
    """(reward_mean, reward_std) stored by reward_modeling.py, or None when the config has none."""
    mean = getattr(config, CONFIG_MEAN_KEY, None)
    std = getattr(config, CONFIG_STD_KEY, None)
    if mean is None or std is None:
        return None
    return float(mean), float(std)


# ---------------------------------------------------------------- trainer


def make_reward_trainer_class(base_trainer_class: type) -> type:
    """A subclass of ``base_trainer_class`` (transformers' Trainer or optimum-habana's GaudiTrainer)
    that trains on collated pair batches (``RewardPairCollator``) with ``pairwise_loss``."""

    class RewardTrainer(base_trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            scores = sequence_scores(model, inputs["input_ids"], inputs["attention_mask"])
            pairs = scores.shape[0] // 2
            chosen, rejected = scores[:pairs], scores[pairs:]
            loss = pairwise_loss(chosen, rejected, inputs.get("margin"))
            if return_outputs:
                return loss, {"rewards_chosen": chosen, "rewards_rejected": rejected}
            return loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
            loss = loss.detach()
            if prediction_loss_only:
                return loss, None, None
            scores = torch.stack([outputs["rewards_chosen"], outputs["rewards_rejected"]], dim=1).detach()
            labels = torch.zeros(scores.shape[0], device=scores.device)  # the chosen answer (column 0) wins
            return loss, scores, labels

    RewardTrainer.__name__ = RewardTrainer.__qualname__ = f"Reward{base_trainer_class.__name__}"
    return RewardTrainer


# ---------------------------------------------------------------- scoring for PPO


def check_reward_model_config(reward_path: str, trust_remote_code: bool, flag: str = "--reward_model_name") -> None:
    """A reward model is a one-output sequence classifier; refuse anything else before loading it."""
    config = load_config(reward_path, flag, trust_remote_code=trust_remote_code)
    architectures = config.architectures or []
    if config.num_labels != 1 or not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise UserError(
            f"{flag} {reward_path} is a {'/'.join(architectures) or 'model'} with {config.num_labels} "
            "outputs; a reward model must be a one-output sequence classifier (train it with reward_modeling.py)"
        )


class RewardScorer:
    """Scores prompt+response texts with a reward model, in batches, under ``torch.no_grad``.

    ``normalize=True`` returns ``(score - reward_mean) / reward_std`` with the statistics stored in
    the model config by ``reward_modeling.py``. Texts are tokenized as in training (special
    tokens unless the text starts with BOS; longer than ``max_length`` keeps the end).
    ``pad_to_max_length`` gives static shapes (HPU).
    """

    def __init__(
        self, model, tokenizer, batch_size: int = 8, max_length: int = 512, device: str | torch.device | None = None,
        normalize: bool = False, pad_to_max_length: bool = False,
    ):
        if batch_size <= 0 or max_length <= 0:
            raise UserError("reward scoring needs a positive batch size and max length")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.pad_to = max_length if pad_to_max_length else None
        if tokenizer.pad_token_id is None:
            raise UserError("the tokenizer has no pad token; set one (load_tokenizer uses EOS)")
        self.stats = None
        if normalize:
            self.stats = reward_stats_from_config(model.config)
            if self.stats is None:
                raise UserError(
                    "the reward model's config has no reward_mean/reward_std; train it with reward_modeling.py "
                    "or turn reward normalisation off"
                )

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        ids = [keep_end(encode_text(self.tokenizer, text), self.max_length) for text in texts]
        batch = pad_sequences(ids, self.tokenizer.pad_token_id, getattr(self.tokenizer, "padding_side", "right"), self.pad_to)
        return {k: v.to(self.device) for k, v in batch.items()}

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        texts = [p + r for p, r in zip(prompts, responses)]
        scores = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(texts), self.batch_size):
                    batch = self.encode(texts[start : start + self.batch_size])
                    scores.append(sequence_scores(self.model, batch["input_ids"], batch["attention_mask"]).cpu())
        finally:
            self.model.train(was_training)
        result = torch.cat(scores) if scores else torch.zeros(0)
        if self.stats is not None:
            mean, std = self.stats
            result = (result - mean) / std
        return result


# ---------------------------------------------------------------- saving


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def save_reward_model(
    model, tokenizer, output_dir: str, mean: float | None, std: float | None, stats_pairs: int | None = None
) -> None:
    """Write the merged model (safetensors) + tokenizer, with the reward statistics in its config.

    Adapter files a Trainer save left in ``output_dir`` are removed: with them, transformers would
    try to load the adapter again on top of the merged weights. Call on the main process only.
    """
    from pathlib import Path

    model = merge_lora(model)
    if mean is not None and std is not None:
        store_reward_stats(model.config, mean, std, stats_pairs)
    model.config.pad_token_id = tokenizer.pad_token_id
    from rlhf.zero import check_no_placeholders

    check_no_placeholders(model.state_dict(), f"the reward model to {output_dir}")  # never ZeRO-3 partitions
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    for name in ADAPTER_FILES:
        path = Path(output_dir) / name
        if path.is_file():
            path.unlink()
