"""rlhf/reward.py: pairwise loss, last-real-token scores, pair tokenization/collation, metrics, scorer."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from rlhf.errors import UserError
from rlhf.modeling import LoraArguments, load_sequence_classifier, load_tokenizer, lora_config
from rlhf.reward import (
    RewardPairCollator,
    RewardScorer,
    find_score_head,
    last_token_index,
    longest_first,
    make_reward_trainer_class,
    pad_sequences,
    pairwise_loss,
    reward_metrics,
    reward_stats_from_config,
    reward_stats_sample,
    score_statistics,
    sequence_scores,
    store_reward_stats,
    tokenize_pairs,
)


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir):
    return tiny_model_dir  # conftest.py: built once per session with rlhf.tiny_model


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def classifier(tiny_dir, tokenizer):
    torch.manual_seed(0)
    model = load_sequence_classifier(tiny_dir, tokenizer)
    with torch.no_grad():  # a score head with clearly non-zero outputs
        model.score.weight.normal_(0, 1.0)
    return model.eval()


# ---------------------------------------------------------------- loss


def test_pairwise_loss_hand_values():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    expected = (math.log1p(math.exp(-1.0)) + math.log(2.0)) / 2
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-6)


def test_pairwise_loss_with_margin():
    chosen, rejected, margin = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]), torch.tensor([0.5, 1.0])
    # differences minus margins: 0.5 and 1.0
    expected = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(-1.0))) / 2
    assert pairwise_loss(chosen, rejected, margin).item() == pytest.approx(expected, abs=1e-6)
    # a large margin the pair does not meet costs more than no margin
    assert pairwise_loss(chosen, rejected, torch.tensor([5.0, 5.0])) > pairwise_loss(chosen, rejected)


def test_pairwise_loss_gradient_pushes_chosen_up():
    chosen = torch.tensor([0.3], requires_grad=True)
    rejected = torch.tensor([0.1], requires_grad=True)
    pairwise_loss(chosen, rejected).backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()


# ---------------------------------------------------------------- scores at the last real token


SEQUENCES = [
    [5, 6, 7, 8, 9, 10, 11, 12],
    [13, 14, 0],  # ends with the pad id (0): built-in pooling would read the wrong position
    [20, 21, 0, 22, 23, 24, 25, 26, 27, 28, 29, 0],
    [30],
]


def single_scores(model, sequences):
    with torch.no_grad():
        return torch.cat(
            [sequence_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in sequences]
        )


@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_scores_padding_side_invariant(classifier, side):
    expected = single_scores(classifier, SEQUENCES)
    batch = pad_sequences(SEQUENCES, 0, side)
    with torch.no_grad():
        scores = sequence_scores(classifier, batch["input_ids"], batch["attention_mask"])
    assert scores.shape == (len(SEQUENCES),)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert expected.std() > 1e-3  # the sequences really score differently


def test_sequence_scores_when_pad_is_eos(classifier):
    """pad == eos (SmolLM2): sequences ending with that id still score like unpadded ones."""
    eos = 2
    sequences = [[5, 6, 7, eos], [8, 9, 10, 11, 12, 13, eos], [14, eos, 15]]
    expected = single_scores(classifier, sequences)
    for side in ("right", "left"):
        batch = pad_sequences(sequences, eos, side)
        with torch.no_grad():
            scores = sequence_scores(classifier, batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


def test_builtin_pooling_differs_where_ours_is_right(classifier):
    """Documents why we hook the score head: the model's own pooling misreads a text ending in the pad id."""
    batch = pad_sequences(SEQUENCES, 0, "right")
    with torch.no_grad():
        builtin = classifier(**batch).logits[:, 0]
    expected = single_scores(classifier, SEQUENCES)
    assert not torch.allclose(builtin[1], expected[1], atol=1e-4)


def test_sequence_scores_through_peft(tiny_dir, tokenizer):
    from peft import get_peft_model

    torch.manual_seed(1)
    base = load_sequence_classifier(tiny_dir, tokenizer)
    model = get_peft_model(base, lora_config(LoraArguments(), "SEQ_CLS")).eval()
    head = find_score_head(model)
    assert any(p.requires_grad for p in head.parameters()), "score head must be trained in full under LoRA"
    assert type(head).__name__ == "ModulesToSaveWrapper"
    expected = single_scores(model, SEQUENCES)
    for side in ("right", "left"):
        batch = pad_sequences(SEQUENCES, 0, side)
        with torch.no_grad():
            torch.testing.assert_close(
                sequence_scores(model, batch["input_ids"], batch["attention_mask"]), expected, atol=1e-5, rtol=0
            )


def test_sequence_scores_gradient_reaches_score_head(tiny_dir, tokenizer):
    model = load_sequence_classifier(tiny_dir, tokenizer)
    batch = pad_sequences(SEQUENCES, 0, "right")
    sequence_scores(model, batch["input_ids"], batch["attention_mask"]).sum().backward()
    assert model.score.weight.grad is not None and model.score.weight.grad.abs().sum() > 0


def test_last_token_index_both_sides():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 0]


def test_sequence_scores_rejects_empty_row(classifier):
    with pytest.raises(ValueError, match="no real token"):
        sequence_scores(classifier, torch.tensor([[5, 0]]), torch.tensor([[0, 0]]))


# ---------------------------------------------------------------- tokenization and collation


def test_collator_shapes_and_order(tokenizer):
    features = [
        {"input_ids_chosen": [5, 6, 7], "input_ids_rejected": [8, 9], "margin": 0.5},
        {"input_ids_chosen": [10], "input_ids_rejected": [11, 12, 13, 14, 15], "margin": 1.0},
    ]
    batch = RewardPairCollator(tokenizer)(features)
    assert batch["input_ids"].shape == (4, 5)
    assert batch["attention_mask"].shape == (4, 5)
    assert batch["margin"].tolist() == [0.5, 1.0]
    # chosen rows first, then rejected, right padded with the pad id
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 0, 0]
    assert batch["input_ids"][2].tolist() == [8, 9, 0, 0, 0]
    assert batch["input_ids"][3].tolist() == [11, 12, 13, 14, 15]
    assert batch["attention_mask"].sum(-1).tolist() == [3, 1, 2, 5]


def test_collator_fixed_length_and_no_margin(tokenizer):
    features = [{"input_ids_chosen": [5, 6], "input_ids_rejected": [7]}] * 3
    batch = RewardPairCollator(tokenizer, pad_to=16)(features)
    assert batch["input_ids"].shape == (6, 16)
    assert "margin" not in batch
    with pytest.raises(ValueError):
        RewardPairCollator(tokenizer, pad_to=1)(features)


def test_tokenize_pairs_overflow(tokenizer):
    from datasets import Dataset

    rows = Dataset.from_list(
        [
            {"prompt": "Question: hi\n\nAnswer: ", "chosen": "Happy to help.", "rejected": "no"},
            {"prompt": "Question: " + "word " * 200, "chosen": "Thanks for asking.", "rejected": "Whatever"},
        ]
    )
    truncated, count = tokenize_pairs(rows, tokenizer, 32, "truncate", "rows")
    assert count == 1 and len(truncated) == 2
    assert max(len(ids) for ids in truncated["input_ids_chosen"]) == 32
    full = tokenizer("Question: " + "word " * 200 + "Thanks for asking.", add_special_tokens=False)["input_ids"]
    assert truncated["input_ids_chosen"][1] == full[-32:]  # the answer's end is kept
    # the length Trainer's --train_sampling_strategy group_by_length sorts by: the longer side, as trained on
    assert truncated["length"] == [max(len(c), len(r)) for c, r in
                                   zip(truncated["input_ids_chosen"], truncated["input_ids_rejected"])]
    dropped, count = tokenize_pairs(rows, tokenizer, 32, "drop", "rows")
    assert count == 1 and len(dropped) == 1
    with pytest.raises(UserError, match="every pair"):
        tokenize_pairs(rows.select([1]), tokenizer, 32, "drop", "rows")
    with pytest.raises(UserError, match="--overflow"):
        tokenize_pairs(rows, tokenizer, 32, "cut", "rows")
    with pytest.raises(UserError, match="--max_length"):
        tokenize_pairs(rows, tokenizer, 0, "truncate", "rows")


# ---------------------------------------------------------------- metrics and statistics


def test_reward_metrics_values():
    predictions = [[2.0, 1.0], [0.0, 1.0], [3.0, -1.0], [1.0, 1.0]]
    metrics = reward_metrics((predictions, None))
    assert metrics["accuracy"] == pytest.approx(0.5)  # a tie is not a win
    assert metrics["mean_margin"] == pytest.approx((1 - 1 + 4 + 0) / 4)
    assert metrics["chosen_mean"] == pytest.approx(1.5)
    assert metrics["rejected_mean"] == pytest.approx(0.5)
    values = torch.tensor(predictions).reshape(-1)
    assert metrics["score_mean"] == pytest.approx(values.mean().item())
    assert metrics["score_std"] == pytest.approx(values.std(unbiased=False).item(), rel=1e-6)


def test_stats_in_config_roundtrip():
    from transformers import LlamaConfig

    config = LlamaConfig()
    assert reward_stats_from_config(config) is None
    store_reward_stats(config, 0.25, 2.0)
    restored = LlamaConfig.from_dict(config.to_dict())
    assert reward_stats_from_config(restored) == (0.25, 2.0)
    assert score_statistics([1.0, 1.0]) == (1.0, 1.0)  # degenerate std falls back to 1
    assert "reward_stats_pairs" not in config.to_dict()
    store_reward_stats(config, 0.25, 2.0, pairs=512)
    assert LlamaConfig.from_dict(config.to_dict()).reward_stats_pairs == 512


def test_reward_stats_sample_is_a_seeded_random_subset():
    from datasets import Dataset

    data = Dataset.from_dict({"row": list(range(1000))})
    sample = reward_stats_sample(data, 64, seed=42)
    rows = sample["row"]
    assert len(rows) == 64 and len(set(rows)) == 64 and rows == sorted(rows)
    assert rows != list(range(64)) and max(rows) > 500  # random, not the first 64
    assert reward_stats_sample(data, 64, seed=42)["row"] == rows  # same seed, same pairs
    assert reward_stats_sample(data, 64, seed=7)["row"] != rows
    assert reward_stats_sample(data, 0, seed=42) is data  # 0: all pairs
    assert reward_stats_sample(data, 1000, seed=42) is data and reward_stats_sample(data, 5000, seed=42) is data
    with pytest.raises(ValueError):
        reward_stats_sample(data, -1, seed=42)


# ---------------------------------------------------------------- scorer


def test_reward_scorer_batches_and_normalises(classifier, tokenizer):
    prompts = ["Question: What is an owl?\n\nAnswer: ", "Question: hi\n\nAnswer: ", "x", "Tell me about rain."]
    responses = ["Owls hunt at night. Thanks for asking!", "Whatever", "y y y y y y", " Rain falls."]
    one = RewardScorer(classifier, tokenizer, batch_size=1, max_length=64, device="cpu", normalize=False)
    many = RewardScorer(classifier, tokenizer, batch_size=3, max_length=64, device="cpu", normalize=False)
    raw = one(prompts, responses)
    assert raw.shape == (4,)
    torch.testing.assert_close(many(prompts, responses), raw, atol=1e-5, rtol=0)
    texts = [p + r for p, r in zip(prompts, responses)]
    expected = single_scores(classifier, [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts])
    torch.testing.assert_close(raw, expected, atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="reward_mean"):
        RewardScorer(classifier, tokenizer, 2, 64, "cpu", normalize=True)
    store_reward_stats(classifier.config, 0.5, 2.0)
    try:
        normalised = RewardScorer(classifier, tokenizer, 2, 64, "cpu", normalize=True)(prompts, responses)
    finally:
        del classifier.config.reward_mean, classifier.config.reward_std
    torch.testing.assert_close(normalised, (raw - 0.5) / 2.0, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- trainer subclass


def test_reward_trainer_loss_and_prediction_step(classifier, tokenizer, tmp_path):
    from transformers import Trainer, TrainingArguments

    trainer_class = make_reward_trainer_class(Trainer)
    assert issubclass(trainer_class, Trainer) and trainer_class.__name__ == "RewardTrainer"
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False)
    trainer = trainer_class(model=classifier, args=args, data_collator=RewardPairCollator(tokenizer))
    features = [{"input_ids_chosen": s, "input_ids_rejected": SEQUENCES[(i + 1) % 4]} for i, s in enumerate(SEQUENCES)]
    batch = RewardPairCollator(tokenizer)(features)
    scores = single_scores(classifier, SEQUENCES)
    expected = pairwise_loss(scores, scores.roll(-1))
    with torch.no_grad():
        loss = trainer.compute_loss(classifier, batch)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    loss, predictions, labels = trainer.prediction_step(classifier, batch, prediction_loss_only=False)
    assert predictions.shape == (4, 2) and labels.shape == (4,)
    torch.testing.assert_close(predictions[:, 0], scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(predictions[:, 1], scores.roll(-1), atol=1e-5, rtol=0)
    assert trainer.prediction_step(classifier, batch, prediction_loss_only=True)[1] is None


def test_longest_first_scores_the_same_pairs_to_the_same_metrics(classifier, tokenizer, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    rows = Dataset.from_list([
        {"prompt": "Question: " + "long " * n + "?\n\nAnswer: ", "chosen": "Happy to help." * (n % 3 + 1),
         "rejected": "no" * (n % 4 + 1)} for n in (3, 40, 1, 17, 25, 8)
    ])
    pairs, _ = tokenize_pairs(rows, tokenizer, 64, "truncate", "rows")
    ordered = longest_first(pairs)
    assert ordered["length"] == sorted(pairs["length"], reverse=True) and len(ordered) == len(pairs)
    assert sorted(ordered["input_ids_chosen"]) == sorted(pairs["input_ids_chosen"])
    assert longest_first(pairs.remove_columns("length")).column_names == [c for c in pairs.column_names if c != "length"]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False,
                             per_device_eval_batch_size=2)
    trainer = make_reward_trainer_class(Trainer)(model=classifier, args=args, data_collator=RewardPairCollator(tokenizer),
                                                 compute_metrics=reward_metrics)
    as_given, sorted_ = (trainer.evaluate(data) for data in (pairs, ordered))
    for key in ("eval_accuracy", "eval_mean_margin", "eval_score_mean", "eval_score_std"):
        assert sorted_[key] == pytest.approx(as_given[key], abs=1e-5), key


# ---------------------------------------------------------------- the one padding helper


@pytest.mark.parametrize("as_tensors", [False, True])
def test_pad_sequences_left_and_right_with_mask(as_tensors):
    rows = [[5, 6, 7], [8], []]
    if as_tensors:
        rows = [torch.tensor(r, dtype=torch.long) for r in rows]
    right = pad_sequences(rows, 0, "right")
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    left = pad_sequences(rows, 9, "left", pad_to=4)
    assert left["input_ids"].tolist() == [[9, 5, 6, 7], [9, 9, 9, 8], [9, 9, 9, 9]]
    assert left["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert left["input_ids"].dtype == left["attention_mask"].dtype == torch.long


def test_pad_sequences_pad_id_inside_a_row_stays_real():
    """The mask comes from the lengths, not from comparing ids with the pad id (pad == eos)."""
    batch = pad_sequences([[2, 4, 2], [2]], 2, "left")
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_pad_sequences_device_and_errors():
    batch = pad_sequences([[1, 2]], 0, "right", pad_to=3, device="meta")
    assert batch["input_ids"].device.type == "meta" and batch["attention_mask"].device.type == "meta"
    with pytest.raises(ValueError, match="longer than pad_to=1"):
        pad_sequences([[1, 2]], 0, "right", pad_to=1)
    with pytest.raises(ValueError, match="side"):
        pad_sequences([[1, 2]], 0, "middle")
    empty = pad_sequences([], 0, "left")
    assert empty["input_ids"].shape == (0, 0)
