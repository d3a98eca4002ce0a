"""PPO and GRPO benchmark worker for our trainer (``rlhf/ppo.py``), run in the main ``.venv``.

    .venv/bin/python bench/ppo_ours.py --workload bench/results/workload-smol.json --out bench/results/ppo-smol-ours.json
    .venv/bin/python bench/ppo_ours.py --task grpo --workload bench/results/workload-smol.json --out OUT.json

PPO: ``PolicyWithValueHead(get_peft_model(model, LoRA r16/alpha32))``: value head on the shared
trunk, reference = adapter disabled. Reward: ``RewardScorer`` on the workload's reward model
(texts are decoded and re-tokenized, as in ``rl_training.py``).
GRPO (``--task grpo``): the same LoRA policy without a value head, ``advantage_estimator="grpo"``,
``num_generations`` k responses per prompt (batch_size / k prompts, each k times in a row, as
``rl_training.py`` builds the batch), the KL to the reference as a k3 loss term (``use_kl_loss``,
fixed ``grpo_beta``); reward = the demo rule (``common.rule_reward``), no reward model.
``precision`` bf16: base and reward model loaded in bfloat16, the adapter and value head fp32 (rl_training.py
--bf16). Each step is ``generate -> score -> step``; generation and scoring are timed here and passed to
``step``, which adds its own ``time/forward_s`` and ``time/update_s``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (  # noqa: E402
    LORA_TARGETS, count_params, is_bf16, model_shape, prompt_ids, rule_reward, summarize_steps, write_result,
    mean_tokens, start_ppo_worker, step_row,
)


def main() -> None:
    args, memory, wl = start_ppo_worker(__doc__.splitlines()[0], tasks=("ppo", "grpo"))
    grpo = args.task == "grpo"

    import torch
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    from rlhf.modeling import load_causal_lm, load_sequence_classifier, load_tokenizer
    from rlhf.ppo import PolicyWithValueHead, PPOConfig, PPOTrainer, ValueHead
    from rlhf.reward import RewardScorer

    tokenizer = load_tokenizer(wl["model_dir"], padding_side="left")
    dtype = torch.bfloat16 if is_bf16(wl) else None  # as rl_training.py --bf16: frozen weights bf16, LoRA fp32
    base = load_causal_lm(wl["model_dir"], dtype=dtype)
    n_params = count_params(base)
    lora = wl["lora"]
    policy = PolicyWithValueHead(get_peft_model(base, LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=LORA_TARGETS,
        bias="none", task_type="CAUSAL_LM",
    )), None if grpo else ValueHead(base.config.hidden_size))
    if grpo:
        scorer, n_rm_params, generations = rule_reward, 0, wl["num_generations"]
        estimator = dict(advantage_estimator="grpo", num_generations=generations, use_kl_loss=True,
                         init_kl_coef=wl["grpo_beta"], adap_kl_ctrl=False)
    else:
        rm_tokenizer = load_tokenizer(wl["rm_dir"])
        reward_model = load_sequence_classifier(wl["rm_dir"], rm_tokenizer, dtype=dtype).requires_grad_(False).eval()
        n_rm_params = count_params(reward_model)
        scorer = RewardScorer(reward_model, rm_tokenizer, batch_size=wl["batch_size"],
                              max_length=wl["prompt_tokens"] + 2 * wl["new_tokens"] + 8)
        generations, estimator = 1, {}
    batch = wl["batch_size"]
    config = PPOConfig(batch_size=batch, mini_batch_size=batch // wl["num_minibatches"], gradient_accumulation_steps=1,
                       ppo_epochs=wl["ppo_epochs"], learning_rate=wl["learning_rate"], seed=wl["seed"],
                       output_max_length=wl["new_tokens"], **estimator)
    trainer = PPOTrainer(config, policy, tokenizer, scorer, Accelerator(cpu=True))
    memory.reset()

    steps, prompt_lengths, response_lengths = [], [], []
    for step in range(wl["warmup"] + wl["steps"]):
        prompts = [torch.tensor(p) for p in prompt_ids(tokenizer, wl, step, generations)]
        start = time.perf_counter()
        # Fixed-length responses (min_new_tokens), as the other frameworks' workers generate them.
        responses = trainer.generate(prompts, min_new_tokens=wl["new_tokens"])
        generated = time.perf_counter()
        texts_p = tokenizer.batch_decode([p.tolist() for p in prompts], skip_special_tokens=True)
        scores = trainer.score(texts_p, responses)
        timings = {"time/generate_s": generated - start, "time/score_s": time.perf_counter() - generated}
        stats = trainer.step(prompts, responses, scores, timings)
        wall = time.perf_counter() - start
        parts = {k: stats[f"time/{k}_s"] for k in ("generate", "score", "forward", "update")}
        steps.append(step_row("ours", step, wall, parts))
        prompt_lengths.append(mean_tokens(prompts))
        response_lengths.append(mean_tokens(responses))

    write_result(args.out, {
        "framework": "ours", "task": args.task, "size": wl["size"], "n_params": n_params, "n_rm_params": n_rm_params,
        "precision": wl.get("precision", "fp32"), "model_shape": model_shape(base),
        "trainable_params": sum(p.numel() for p in policy.parameters() if p.requires_grad),
        "steps": steps, "median": summarize_steps(steps, wl["warmup"]),
        "prompt_len_mean": sum(prompt_lengths) / len(prompt_lengths),
        "response_len_mean": sum(response_lengths) / len(response_lengths),
        "memory": memory.report(), "timing_split": "full",
    })


if __name__ == "__main__":
    main()
