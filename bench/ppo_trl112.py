"""PPO benchmark worker for trl 1.12.0's ``trl.experimental.ppo.PPOTrainer`` (the last TRL with PPO).

Runs in ``bench/.venv-trl112`` (torch 2.13, trl 1.12.0, transformers 5.13)::

    bench/.venv-trl112/bin/python bench/ppo_trl112.py --workload bench/results/workload-smol.json --out OUT.json

Set up as its docs recommend: the policy with LoRA through ``peft_config`` and ``ref_model=None`` (the
reference is the policy with the adapter disabled), a separate value model initialised from the reward model
(a full ``AutoModelForSequenceClassification``, trained in full), the reward model scoring token ids.
Same batch, response length (``response_length``; no stop token, so every response has exactly that many
tokens), PPO epochs and minibatches (``per_device_train_batch_size = batch``, ``num_mini_batches``, no
accumulation: one optimizer step per minibatch, as ours), ``local_rollout_forward_batch_size = batch``
(its default 64 covers the batch: one generation batch, like ours). Prompts come in the same order as
for the other frameworks (the shuffling dataloader is replaced by an ordered one).

``train()`` is monolithic, so the time split comes from timers monkeypatched around its module-level
helpers: ``batch_generation`` (generate), ``get_reward`` on the reward model (score), ``forward`` without
grad plus ``get_reward`` on the value model (forward: reference logits and values), and from the first
``np.random.permutation`` of a step (the PPO epochs start) to the step end (update; includes its small
metrics gathering). Step boundaries come from ``on_step_end`` callbacks.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    LORA_TARGETS, Timers, count_params, prompt_ids, summarize_steps, write_result,
    start_ppo_worker, step_row,
)


def main() -> None:
    args, memory, wl = start_ppo_worker(__doc__.splitlines()[0])

    import numpy as np
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import DataLoader
    from transformers import (
        AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    tokenizer = AutoTokenizer.from_pretrained(wl["model_dir"], padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy = AutoModelForCausalLM.from_pretrained(wl["model_dir"])
    n_params = count_params(policy)
    value_model = AutoModelForSequenceClassification.from_pretrained(wl["rm_dir"], num_labels=1)
    reward_model = AutoModelForSequenceClassification.from_pretrained(wl["rm_dir"], num_labels=1)
    n_rm_params = count_params(reward_model)
    for model in (value_model, reward_model):
        model.config.pad_token_id = tokenizer.pad_token_id

    batch = wl["batch_size"]
    total_steps = wl["warmup"] + wl["steps"]
    queries = [ids for step in range(total_steps) for ids in prompt_ids(tokenizer, wl, step)]
    dataset = Dataset.from_dict({"input_ids": queries})
    lora = wl["lora"]
    config = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl112-"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, num_mini_batches=wl["num_minibatches"], num_ppo_epochs=wl["ppo_epochs"],
        learning_rate=wl["learning_rate"], response_length=wl["new_tokens"], total_episodes=batch * total_steps,
        local_rollout_forward_batch_size=batch, num_sample_generations=0, stop_token=None, temperature=1.0,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(),
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=wl["seed"],
        dataloader_num_workers=0,
    )

    timers = Timers()
    marks: dict[str, list[float]] = {"permutation": [], "step_end": []}

    def timed(name_of, fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timers.add(name_of(*a, **kw), time.perf_counter() - start)
        return wrapper

    ppo_module.batch_generation = timed(lambda *a, **kw: "generate", ppo_module.batch_generation)
    ppo_module.forward = timed(lambda *a, **kw: "update_fwd" if torch.is_grad_enabled() else "forward",
                               ppo_module.forward)
    ppo_module.get_reward = timed(lambda model, *a, **kw: "score" if model is reward_model else "forward",
                                  ppo_module.get_reward)

    class _Random:
        def __getattr__(self, name):
            return getattr(np.random, name)

        def permutation(self, *a, **kw):
            marks["permutation"].append(time.perf_counter())
            return np.random.permutation(*a, **kw)

    class _Numpy:
        random = _Random()

        def __getattr__(self, name):
            return getattr(np, name)

    ppo_module.np = _Numpy()

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            marks["step_end"].append(time.perf_counter())

        def on_step_end(self, *a, **kw):
            marks["step_end"].append(time.perf_counter())

    trainer = PPOTrainer(
        args=config, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward_model,
        train_dataset=dataset, value_model=value_model, eval_dataset=dataset.select(range(batch)),
        peft_config=LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                               target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM"),
        callbacks=[StepTimer()],
    )
    collator = DataCollatorWithPadding(tokenizer)
    trainer.dataloader = trainer.accelerator.prepare(
        DataLoader(dataset, batch_size=batch, shuffle=False, collate_fn=collator, drop_last=True)
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    memory.reset()

    step_parts: list[dict] = []

    class Split(TrainerCallback):  # runs after StepTimer in the same on_step_end
        def on_step_end(self, *a, **kw):
            parts = timers.pop()
            parts.pop("update_fwd", None)
            end = marks["step_end"][-1]
            first_perm = [t for t in marks["permutation"] if t > marks["step_end"][-2]]
            parts["update"] = end - first_perm[0] if first_perm else None
            step_parts.append(parts)

    trainer.add_callback(Split())
    trainer.train()

    steps = []
    for i, parts in enumerate(step_parts):
        wall = marks["step_end"][i + 1] - marks["step_end"][i]
        steps.append(step_row("trl112", i, wall, parts))

    import importlib.metadata as md

    write_result(args.out, {
        "framework": "trl112", "task": "ppo", "size": wl["size"], "n_params": n_params, "n_rm_params": n_rm_params,
        "trainable_params": trainable, "steps": steps, "median": summarize_steps(steps, wl["warmup"]),
        "prompt_len_mean": sum(len(q) for q in queries) / len(queries),
        "response_len_mean": float(wl["new_tokens"]),
        "memory": memory.report(),
        "timing_split": "monkeypatched timers around batch_generation / forward / get_reward; update = PPO epochs",
        "versions": {p: md.version(p) for p in ("trl", "transformers", "peft", "accelerate", "torch")},
    })


if __name__ == "__main__":
    main()
