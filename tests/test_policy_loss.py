"""rlhf/policy_loss.py through the assembled update (PPOTrainer.minibatch_loss), against TRL 1.16's
GRPOTrainer._compute_loss as the oracle, and the update's independence of the minibatch split.

The oracle: one fixed batch (equal-length prompts, so TRL's default position ids equal ours; responses
of different lengths), old log-probs moved away from the policy's so clipping is active, advantages of
both signs. For each --loss_type (and clip-higher, GSPO's sequence-level ratio, the k3 KL term) the
loss and the gradient of every weight must agree. TRL runs only here; nothing in rlhf/ imports it."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from rlhf.ppo import PolicyWithValueHead, PPOConfig, PPOTrainer

BATCH, PROMPT, MAX_NEW = 4, 5, 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.tiny_model import build_tiny_model

    path = build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), seed=0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return path, tokenizer, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def fixed_batch(tokenizer):
    generator = torch.Generator().manual_seed(3)
    vocab = tokenizer.vocab_size
    prompts = [torch.randint(3, vocab, (PROMPT,), generator=generator) for _ in range(BATCH)]
    responses = [torch.randint(3, vocab, (n,), generator=generator) for n in (6, 2, 4, 5)]
    return prompts, responses


def ours(model, tokenizer, **cfg):
    from accelerate import Accelerator

    config = PPOConfig(**{"batch_size": BATCH, "mini_batch_size": BATCH, "gradient_accumulation_steps": 1,
                          "advantage_estimator": "grpo", "num_generations": 2, "adap_kl_ctrl": False,
                          "output_max_length": MAX_NEW, "max_grad_norm": None, **cfg})
    policy = PolicyWithValueHead(copy.deepcopy(model), None, ref_model=copy.deepcopy(model))
    return PPOTrainer(config, policy, tokenizer, lambda p, r: [0.0] * len(r), Accelerator(cpu=True))


def trl_trainer(tmp_path, model, tokenizer, **settings):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                      per_device_train_batch_size=BATCH, num_generations=2, max_completion_length=MAX_NEW,
                      gradient_checkpointing=False, **settings)
    return GRPOTrainer(model=copy.deepcopy(model), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                       args=args, train_dataset=Dataset.from_dict({"prompt": ["a"] * BATCH}),
                       processing_class=tokenizer)


CASES = [
    dict(loss_type="dapo"),
    dict(loss_type="grpo"),
    dict(loss_type="dr_grpo"),
    dict(loss_type="bnpo"),
    dict(loss_type="dapo", epsilon_high=0.28),
    dict(loss_type="dapo", importance_sampling_level="sequence", epsilon=3e-2, epsilon_high=4e-2),
    dict(loss_type="dapo", beta=0.1),
    dict(loss_type="grpo", beta=0.1, temperature=0.7),
    dict(loss_type="dapo", entropy_coef=0.05),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_loss_and_gradient_equal_trl(tiny, tmp_path, case):
    _, tokenizer, model = tiny
    case = dict(case)
    beta, temperature = case.pop("beta", 0.0), case.pop("temperature", 1.0)
    trainer = ours(model, tokenizer, temperature=temperature, use_kl_loss=beta > 0, init_kl_coef=beta,
                   **{("cliprange" if k == "epsilon" else k): v for k, v in case.items()})
    prompts, responses = fixed_batch(tokenizer)
    experience, _ = trainer.make_experience(prompts, responses, [0.0] * BATCH)
    generator = torch.Generator().manual_seed(5)
    old = experience.logprobs + 0.3 * torch.randn(experience.logprobs.shape, generator=generator)
    advantages = torch.tensor([1.0, -0.5, 0.7, -1.2])
    ref = experience.ref_logprobs + 0.2 * torch.randn(experience.logprobs.shape, generator=generator)
    experience = dataclasses.replace(experience, logprobs=old * experience.mask, ref_logprobs=ref,
                                     advantages=advantages[:, None] * experience.mask)
    window = trainer._loss_window(experience.loss_mask)
    loss, _, _ = trainer.minibatch_loss(experience, torch.arange(BATCH), window)
    loss.backward()

    theirs = trl_trainer(tmp_path, model, tokenizer, beta=beta, temperature=temperature, **case)
    theirs.model.train()  # TRL's training-mode branch; the tiny model has no dropout
    theirs.current_gradient_accumulation_steps = 1  # set by its training loop
    batch = experience.batch
    inputs = {"prompt_ids": batch["input_ids"][:, :PROMPT], "prompt_mask": batch["attention_mask"][:, :PROMPT],
              "completion_ids": batch["response_ids"], "completion_mask": batch["response_mask"],
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": batch["response_mask"].sum()}
    expected = theirs._compute_loss(theirs.model, inputs)
    expected.backward()
    print(case, f"ours {loss.item():.8f} TRL {expected.item():.8f}")
    torch.testing.assert_close(loss.detach(), expected.detach(), atol=1e-6, rtol=1e-5)
    mine = dict(trainer.policy.model.named_parameters())
    for name, parameter in theirs.model.named_parameters():
        torch.testing.assert_close(mine[name].grad, parameter.grad, atol=1e-6, rtol=1e-4, msg=name)


def one_sgd_update(tiny, tokenizer, mini_batch_size, accumulation, loss_type):
    """The parameter change of one optimizer step (SGD, lr 1: minus the gradient) from fixed rollouts."""
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    _, tokenizer, model = tiny
    torch.manual_seed(0)
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           lora_dropout=0.0, init_lora_weights=False))
    policy = PolicyWithValueHead(lora, None)
    params = [p for p in policy.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    config = PPOConfig(batch_size=8, mini_batch_size=mini_batch_size, gradient_accumulation_steps=accumulation,
                       ppo_epochs=1, advantage_estimator="grpo", num_generations=4, loss_type=loss_type,
                       output_max_length=MAX_NEW, max_grad_norm=None, seed=0)
    trainer = PPOTrainer(config, policy, tokenizer, lambda p, r: [0.0] * len(r), Accelerator(cpu=True),
                         optimizer=torch.optim.SGD(params, lr=1.0))
    prompts, responses = fixed_batch(tokenizer)
    prompts, responses = prompts * 2, responses + [r[:1] for r in responses]  # 8 rows, lengths 1 to 6
    trainer.step(prompts, responses, [1.0, 0.0, 0.5, 0.2, 0.9, 0.1, 0.3, 0.3])
    return torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(params, before)])


def test_dapo_update_is_the_same_whatever_the_minibatch_split(tiny):
    _, tokenizer, _ = tiny
    updates = {split: one_sgd_update(tiny, tokenizer, *split, "dapo") for split in ((8, 1), (4, 2), (1, 8))}
    reference = updates[(8, 1)]
    assert reference.abs().max() > 0
    for split, update in updates.items():
        torch.testing.assert_close(update, reference, atol=1e-6, rtol=1e-4, msg=str(split))
    # The reference's per-minibatch mean (bnpo) is what made the objective depend on the split.
    bnpo_whole, bnpo_single = (one_sgd_update(tiny, tokenizer, *split, "bnpo") for split in ((8, 1), (1, 8)))
    torch.testing.assert_close(bnpo_whole, reference, atol=1e-6, rtol=1e-4)
    cosine = torch.nn.functional.cosine_similarity(bnpo_single, reference, dim=0)
    assert cosine < 0.999, cosine
