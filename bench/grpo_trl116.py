"""GRPO benchmark worker for trl 1.16's ``GRPOTrainer`` (main ``.venv``), the workload of ``ppo_ours.py --task grpo``.

    .venv/bin/python bench/grpo_trl116.py --workload bench/results/workload-smol.json --out OUT.json

Mapping of the workload onto ``GRPOConfig``: one GRPO step = one generation of ``batch_size``
completions (``generation_batch_size`` = ``per_device_train_batch_size`` (batch / minibatches) x
``steps_per_generation`` (minibatches)), ``num_generations`` k per prompt, then ``num_iterations``
(= ppo_epochs) passes over it in minibatches, one optimizer step each, no accumulation: the
same number and size of optimizer steps as ours. ``gradient_accumulation_steps`` (1) is not a
multiple of steps_per_generation x num_iterations, so TRL computes old log-probs in a rollout
forward, as ours does. Same LoRA (peft_config; reference = adapter disabled, ``beta`` =
``grpo_beta`` > 0 so it is computed), the same prompts in the same order (``shuffle_dataset=False``;
they are all shorter than ``prompt_tokens``, so no truncation on either side), temperature 1,
no top-k/top-p, responses of exactly ``new_tokens`` tokens (``max_completion_length`` and
``generation_kwargs={"min_new_tokens": ...}``; the lengths are measured and written), the same
reward function (``common.rule_reward``), dropout off (ours runs its forward passes in eval
mode), fp32, ``loss_type="bnpo"`` (token mean over the minibatch, as ours), group-scaled rewards.

Timing: ``on_step_end`` callbacks; a GRPO step ends at every (minibatches x epochs)-th optimizer
step. Split from timers wrapped around the trainer's ``_generate`` (generate, with prompt
tokenization), ``_calculate_rewards`` (score) and ``_generate_and_score_completions`` (minus the
two: forward = old and reference log-probs, advantages); update = the rest of the step
(minibatch forward/backward, optimizer steps, TRL's per-step metrics and the Trainer loop).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (  # noqa: E402
    LORA_TARGETS, Timers, count_params, is_bf16, model_shape, prompt_texts, rule_reward, start_ppo_worker, step_row,
    summarize_steps, write_result,
)


def main() -> None:
    args, memory, wl = start_ppo_worker(__doc__.splitlines()[0])

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf.modeling import load_causal_lm, load_tokenizer

    batch, k, minibatches, epochs = wl["batch_size"], wl["num_generations"], wl["num_minibatches"], wl["ppo_epochs"]
    total = wl["warmup"] + wl["steps"]
    per_step = minibatches * epochs  # optimizer steps per GRPO step
    tokenizer = load_tokenizer(wl["model_dir"], padding_side="left")
    bf16 = is_bf16(wl)
    model = load_causal_lm(wl["model_dir"], dtype=torch.bfloat16 if bf16 else None)  # frozen weights as ours
    n_params = count_params(model)
    lora = wl["lora"]
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-grpo-"), per_device_train_batch_size=batch // minibatches,
        gradient_accumulation_steps=1, steps_per_generation=minibatches, num_generations=k, num_iterations=epochs,
        max_completion_length=wl["new_tokens"], generation_kwargs={"min_new_tokens": wl["new_tokens"]},
        temperature=1.0, top_k=0, top_p=1.0, beta=wl["grpo_beta"], epsilon=0.2, loss_type="bnpo",
        scale_rewards="group", learning_rate=wl["learning_rate"], lr_scheduler_type="constant", max_grad_norm=1.0,
        max_steps=total * per_step, shuffle_dataset=False, disable_dropout=True, bf16=bf16, fp16=False,
        use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no", logging_steps=10**6,
        disable_tqdm=True, dataloader_num_workers=0, seed=wl["seed"], gradient_checkpointing=False,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=rule_reward, args=config, processing_class=tokenizer,
        train_dataset=Dataset.from_list([{"prompt": t} for t in prompt_texts(batch // k * total)]),
        peft_config=LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                               target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM"),
    )

    timers = Timers()
    lengths = {"prompt": [], "response": []}

    def timed(name: str, fn):
        def wrapper(*a, **kw):
            with timers(name):
                return fn(*a, **kw)
        return wrapper

    trainer._generate = timed("generate", trainer._generate)
    trainer._calculate_rewards = timed("score", trainer._calculate_rewards)
    generate_and_score = timed("rollout", trainer._generate_and_score_completions)

    def rollout(*a, **kw):
        out = generate_and_score(*a, **kw)
        lengths["prompt"].append(out["prompt_mask"].sum(1).float().mean().item())
        lengths["response"].append(out["completion_mask"].sum(1).float().mean().item())
        return out

    trainer._generate_and_score_completions = rollout
    steps, marks = [], []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            marks.append(time.perf_counter())

        def on_step_end(self, _args, state, *a, **kw):
            if state.global_step % per_step:
                return
            marks.append(time.perf_counter())
            t = timers.pop()
            generate, score, rollout_s = t.get("generate", 0.0), t.get("score", 0.0), t.get("rollout", 0.0)
            wall = marks[-1] - marks[-2]
            parts = {"generate": generate, "score": score, "forward": rollout_s - generate - score,
                     "update": wall - rollout_s}
            steps.append(step_row("trl116", len(steps), wall, parts))

    trainer.add_callback(StepTimer())
    memory.reset()
    trainer.train()

    write_result(args.out, {
        "framework": "trl116", "task": "grpo", "size": wl["size"], "n_params": n_params, "n_rm_params": 0,
        "precision": wl.get("precision", "fp32"), "model_shape": model_shape(model),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "steps": steps, "median": summarize_steps(steps, wl["warmup"]),
        "prompt_len_mean": sum(lengths["prompt"]) / len(lengths["prompt"]),
        "response_len_mean": sum(lengths["response"]) / len(lengths["response"]),
        "memory": memory.report(), "timing_split": "full",
    })


if __name__ == "__main__":
    main()
