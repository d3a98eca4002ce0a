"""rlhf/dpo.py: the DPO loss against TRL 1.16's DPOTrainer (the oracle), and its tokenization.

The oracle: on one fixed batch, TRL's ``DPOTrainer.compute_loss`` and our trainer's ``compute_loss``
(the same Trainer subclass ``dpo_training.py`` runs) agree to 1e-5, for the sigmoid, ipo and robust
losses, with a frozen reference copy and with the LoRA-disabled reference, and the logged rewards
agree too. TRL runs only here, on the main stack; nothing in rlhf/ imports it.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rlhf.dpo import (
    DPOPairCollator,
    answer_logps,
    check_dpo_settings,
    dpo_loss,
    dpo_metrics,
    make_dpo_trainer_class,
    tokenize_preference,
)
from rlhf.errors import UserError

TOLERANCE = 1e-5
ROWS = [
    {"prompt": "Question: What is Mars?\n\nAnswer: ", "chosen": "Mars is a planet.", "rejected": "A dog."},
    {"prompt": "Question: Tell me about chess.\n\nAnswer: ", "chosen": "Happy to help! Chess is a board game.",
     "rejected": "Chess is"},
    {"prompt": "Question: Why is the sky blue?\n\nAnswer: ", "chosen": "Great question. Light scatters in air.",
     "rejected": "Volcanoes are hot and the sea is deep."},
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    reference = copy.deepcopy(policy)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a reference near the policy: log-ratios of a few nats, not saturated
        for parameter in reference.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return tiny_model_dir, tokenizer, policy, reference


def trl_trainer(tmp_path, model, tokenizer, ref_model=None, peft_config=None, **config):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    # fp32 like ours: DPOConfig defaults to bf16, which autocasts the reference copy it prepares.
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, per_device_train_batch_size=len(ROWS),
                     bf16=False,
                     **config)
    return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(ROWS),
                      processing_class=tokenizer, peft_config=peft_config)


def our_trainer(tmp_path, model, tokenizer, ref_model=None, **settings):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "ours"), report_to=[], use_cpu=True,
                             remove_unused_columns=False, label_names=[])
    trainer_class = make_dpo_trainer_class(Trainer)
    return trainer_class(model=model, args=args, data_collator=DPOPairCollator(tokenizer.pad_token_id),
                         processing_class=tokenizer, ref_model=ref_model, **settings)


def trl_batch(trainer) -> tuple[dict, list[dict]]:
    """TRL's own tokenization and collation of ROWS, and the same rows as our collator's features."""
    rows = [trainer.train_dataset[i] for i in range(len(ROWS))]
    batch = trainer.data_collator(rows)
    features = [
        {"chosen_input_ids": r["prompt_ids"] + r["chosen_ids"],
         "chosen_completion_mask": [0] * len(r["prompt_ids"]) + [1] * len(r["chosen_ids"]),
         "rejected_input_ids": r["prompt_ids"] + r["rejected_ids"],
         "rejected_completion_mask": [0] * len(r["prompt_ids"]) + [1] * len(r["rejected_ids"])}
        for r in rows
    ]
    return batch, features


def swap_pairs(batch: dict) -> dict:
    """The same pairs with chosen and rejected exchanged (rows are [chosen..., rejected...])."""
    half = batch["input_ids"].shape[0] // 2
    return {k: torch.cat([v[half:], v[:half]]) if v.dim() == 2 else v for k, v in batch.items()}


@pytest.mark.parametrize(
    "loss_type,beta,label_smoothing",
    [("sigmoid", 0.1, 0.0), ("ipo", 0.5, 0.0), ("robust", 0.2, 0.1)],
)
def test_loss_equals_trl_with_a_reference_copy(tiny, tmp_path, loss_type, beta, label_smoothing):
    _, tokenizer, policy, reference = tiny
    theirs = trl_trainer(tmp_path, copy.deepcopy(policy), tokenizer, ref_model=copy.deepcopy(reference),
                         loss_type=[loss_type], beta=beta, label_smoothing=label_smoothing)
    batch, features = trl_batch(theirs)
    ours_batch = DPOPairCollator(tokenizer.pad_token_id)(features)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(ours_batch[key], batch[key]), key
    with torch.no_grad():
        theirs.model.train()  # TRL logs metrics under "train" in training mode; dropout is off in both
        expected = theirs.compute_loss(theirs.model, batch).item()
    ours = our_trainer(tmp_path, copy.deepcopy(policy), tokenizer, ref_model=copy.deepcopy(reference),
                       beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    with torch.no_grad():
        ours.model.train()
        loss, outputs = ours.compute_loss(ours.model, ours_batch, return_outputs=True)
    print(f"{loss_type} beta={beta}: ours {loss.item():.8f} TRL {expected:.8f} diff {abs(loss.item() - expected):.2e}")
    assert abs(loss.item() - expected) < TOLERANCE
    assert abs(expected - math.log(2)) > 1e-3  # the batch is informative: not the trivial log(2)
    # The logged rewards are TRL's too.
    logged = {k: v[-1] for k, v in theirs._metrics["train"].items()}
    stats = dpo_metrics(torch.stack([outputs["chosen_rewards"], outputs["rejected_rewards"],
                                     outputs["chosen_logps"], outputs["rejected_logps"]], 1).numpy()[None])
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert stats[key] == pytest.approx(logged[key], abs=1e-4), key


def test_loss_equals_trl_with_the_adapter_disabled_reference(tiny, tmp_path):
    """LoRA (adapter weights non-zero, so policy != reference): both use the base model as reference."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    _, tokenizer, policy, _ = tiny
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    # TRL adds the adapter itself (given a PeftModel it would train against a copy of that adapter instead).
    theirs = trl_trainer(tmp_path, copy.deepcopy(policy), tokenizer, loss_type=["sigmoid"], beta=0.1,
                         peft_config=config)
    assert theirs.ref_model is None and "ref" not in theirs.model.peft_config
    batch, features = trl_batch(theirs)
    with torch.no_grad():
        expected = theirs.compute_loss(theirs.model, batch).item()
    adapted = get_peft_model(copy.deepcopy(policy), config)
    set_peft_model_state_dict(adapted, get_peft_model_state_dict(theirs.model))  # the same adapter weights
    ours = our_trainer(tmp_path, adapted, tokenizer, beta=0.1, loss_type="sigmoid")
    with torch.no_grad():
        loss = ours.compute_loss(ours.model, DPOPairCollator(tokenizer.pad_token_id)(features)).item()
    print(f"LoRA sigmoid: ours {loss:.8f} TRL {expected:.8f} diff {abs(loss - expected):.2e}")
    assert abs(loss - expected) < TOLERANCE and abs(expected - math.log(2)) > 1e-4
    assert ours.model_accepts_loss_kwargs is False  # a per-batch mean: the Trainer divides by accumulation steps


def test_conservative_dpo_is_trl_sigmoid_mixed_with_the_flipped_pairs(tiny, tmp_path):
    """cDPO (sigmoid + label_smoothing eps): (1 - eps) * TRL(pairs) + eps * TRL(pairs flipped)."""
    _, tokenizer, policy, reference = tiny
    theirs = trl_trainer(tmp_path, copy.deepcopy(policy), tokenizer, ref_model=copy.deepcopy(reference),
                         loss_type=["sigmoid"], beta=0.3)
    batch, features = trl_batch(theirs)
    with torch.no_grad():
        straight = theirs.compute_loss(theirs.model, batch).item()
        flipped = theirs.compute_loss(theirs.model, swap_pairs(batch)).item()
    eps = 0.2
    ours = our_trainer(tmp_path, copy.deepcopy(policy), tokenizer, ref_model=copy.deepcopy(reference),
                       beta=0.3, loss_type="sigmoid", label_smoothing=eps)
    with torch.no_grad():
        loss = ours.compute_loss(ours.model, DPOPairCollator(tokenizer.pad_token_id)(features)).item()
    assert loss == pytest.approx((1 - eps) * straight + eps * flipped, abs=TOLERANCE)


def test_precomputed_reference_gives_the_live_reference_loss(tiny, tmp_path):
    from datasets import Dataset

    _, tokenizer, policy, reference = tiny
    features = [tokenize_preference(row, tokenizer, 128, 64) for row in ROWS]
    ours = our_trainer(tmp_path, copy.deepcopy(policy), tokenizer, ref_model=copy.deepcopy(reference),
                       beta=0.1, loss_type="ipo")
    collator = DPOPairCollator(tokenizer.pad_token_id)
    with torch.no_grad():
        live = ours.compute_loss(ours.model, collator(features)).item()
    dataset = ours.precompute_reference(Dataset.from_list([{k: v for k, v in f.items() if k != "truncated"}
                                                           for f in features]))
    ours.ref_model = None  # the reference is no longer needed (nor available)
    batch = collator([dataset[i] for i in range(len(dataset))])
    assert "ref_chosen_logps" in batch
    with torch.no_grad():
        assert ours.compute_loss(ours.model, batch).item() == pytest.approx(live, abs=TOLERANCE)


# ---------------------------------------------------------------- the loss by hand


def test_loss_by_hand():
    chosen, rejected = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0])
    ref_chosen, ref_rejected = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
    # log-ratios: chosen [1, 0], rejected [-1, 1]; delta [2, -1]
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)
    expected = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5))]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert chosen_rewards.tolist() == [0.5, 0.0] and rejected_rewards.tolist() == [-0.5, 0.5]
    lengths = torch.tensor([2, 4])
    losses, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5, loss_type="ipo",
                            chosen_lengths=lengths, rejected_lengths=torch.tensor([1, 2]))
    # per-token log-ratios: chosen [0.5, 0], rejected [-1, 0.5]; (delta - 1/(2 beta))^2 = (1.5 - 1)^2, (-0.5 - 1)^2
    assert losses.tolist() == pytest.approx([0.25, 2.25], abs=1e-6)


def test_answer_logps_sum_only_the_answer_tokens(tiny):
    _, _, policy, _ = tiny
    ids = torch.tensor([[5, 9, 30, 41, 7, 0], [5, 9, 30, 0, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    completion = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 1, 0, 0, 0]])
    with torch.no_grad():
        got = answer_logps(policy, ids, attention, completion)
        logits = policy(ids[:1, :5]).logits[0].log_softmax(-1)
    expected = sum(logits[t - 1, ids[0, t]].item() for t in (2, 3, 4))
    assert got[0].item() == pytest.approx(expected, abs=1e-5)
    assert got[1].item() == pytest.approx(logits[1, 30].item(), abs=1e-5)  # the padded row: its own answer only


@pytest.mark.parametrize("beta,loss_type,eps,fragment", [
    (0.0, "sigmoid", 0.0, "--beta"), (-1.0, "sigmoid", 0.0, "--beta"), (float("nan"), "ipo", 0.0, "--beta"),
    (0.1, "kto", 0.0, "--loss_type"), (0.1, "sigmoid", 0.5, "--label_smoothing"), (0.1, "ipo", 0.1, "ipo"),
])
def test_bad_settings_are_user_errors(beta, loss_type, eps, fragment):
    with pytest.raises(UserError, match=fragment):
        check_dpo_settings(beta, loss_type, eps)


# ---------------------------------------------------------------- tokenization: SFT's boundary, BOS once


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory):
    """A Llama-style tokenizer that prepends BOS when encoding with special tokens."""
    from rlhf.modeling import load_tokenizer
    from rlhf.tiny_model import build_tiny_model

    path = build_tiny_model(str(tmp_path_factory.mktemp("bos") / "model"), seed=0, hidden_size=8, num_layers=1,
                            adds_bos=True)
    tokenizer = load_tokenizer(path)
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id  # the double does add BOS
    return tokenizer


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_pairs_are_tokenized_as_sft_tokenizes_the_chosen_example(bos_tokenizer, template):
    from datasets import Dataset

    import finetune_clm
    from rlhf.data import prepare_examples

    tokenizer = bos_tokenizer
    raw = Dataset.from_list([{"system": "Be kind.", "question": "What is Mars?", "chosen": "Mars is a planet.",
                              "rejected": "A dog."}])
    prepared, _ = prepare_examples(raw, "rows", tokenizer, template, allow_sft=False)
    row = prepared[0]
    pair = tokenize_preference(row, tokenizer, max_length=128, max_prompt_length=64)
    args = finetune_clm.FinetuneArguments(max_seq_length=128, max_source_length=64)
    sft = finetune_clm.tokenize_split(prepared, tokenizer, args, None)[0]
    assert pair["chosen_input_ids"] == sft["input_ids"]
    assert pair["chosen_completion_mask"] == [int(label != -100) for label in sft["labels"]]
    for side in ("chosen", "rejected"):
        ids, mask = pair[f"{side}_input_ids"], pair[f"{side}_completion_mask"]
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1, (template, ids)
        answer = [t for t, m in zip(ids, mask) if m]
        assert answer == tokenizer(row[side], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert mask == sorted(mask)  # prompt tokens, then answer tokens: one boundary
    assert pair["chosen_input_ids"][: pair["chosen_completion_mask"].index(1)] == \
        pair["rejected_input_ids"][: pair["rejected_completion_mask"].index(1)]  # one prompt for both


def test_truncation_keeps_the_prompt_end_and_the_answer_start(tiny):
    _, tokenizer, _, _ = tiny
    row = {"prompt": "Question: " + "tell me more " * 30 + "about Mars?\n\nAnswer: ", "chosen": "Mars is red. " * 20,
           "rejected": "No."}
    pair = tokenize_preference(row, tokenizer, max_length=40, max_prompt_length=16)
    assert pair["truncated"]
    ids, mask = pair["chosen_input_ids"], pair["chosen_completion_mask"]
    assert len(ids) == 40 and mask.count(0) == 16
    assert tokenizer.decode(ids[:16]).endswith("Answer: ")
    assert ids[-1] != tokenizer.eos_token_id  # a cut answer gets no EOS
    assert pair["rejected_input_ids"][-1] == tokenizer.eos_token_id
