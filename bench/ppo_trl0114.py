"""PPO benchmark worker for trl 0.11.4's step API (the API the reference pipeline was written for).

Runs in ``bench/.venv-trl0114`` (torch 2.13, trl 0.11.4, transformers 4.46, peft 0.13)::

    bench/.venv-trl0114/bin/python bench/ppo_trl0114.py --workload bench/results/workload-smol.json --out OUT.json

``AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=LoRA r16/alpha32)`` (value head on the
shared trunk, reference = adapter disabled because ``ref_model=None`` with a peft model), ``PPOTrainer.generate``
(all prompts in one batch, like ours) -> reward model on the decoded texts -> ``PPOTrainer.step``. The time split
comes from the worker's timers (generate, score) and trl's own step timings (``time/ppo/forward_pass`` = policy +
reference forward; ``time/ppo/optimize_step`` = the PPO epochs).

Models saved by transformers 5 are loaded with small shims (worker-local, labelled): the tokenizer from
``tokenizer.json`` (transformers 4.46 does not know the ``TokenizersBackend`` class) and ``rope_theta`` from
the v5 ``rope_parameters`` field.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    LORA_TARGETS, Timers, count_params, prompt_ids, summarize_steps, write_result,
    mean_tokens, start_ppo_worker, step_row,
)


def load_tokenizer(path: str, padding_side: str):
    """Shim: transformers 4.46 cannot resolve the v5 tokenizer class; load tokenizer.json directly."""
    from transformers import PreTrainedTokenizerFast

    config = json.loads((Path(path) / "tokenizer_config.json").read_text())
    special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if config.get(k)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(Path(path) / "tokenizer.json"), **special)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_config(path: str, **kwargs):
    """Shim: v5 configs keep rope_theta under rope_parameters."""
    from transformers import AutoConfig

    raw = json.loads((Path(path) / "config.json").read_text())
    config = AutoConfig.from_pretrained(path, **kwargs)
    rope = raw.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.rope_theta = rope["rope_theta"]
    if hasattr(config, "rope_parameters"):
        del config.rope_parameters
    return config


def main() -> None:
    args, memory, wl = start_ppo_worker(__doc__.splitlines()[0])

    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    tokenizer = load_tokenizer(wl["model_dir"], padding_side="left")
    base = AutoModelForCausalLM.from_pretrained(wl["model_dir"], config=load_config(wl["model_dir"]))
    n_params = count_params(base)
    lora = wl["lora"]
    model = AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=LORA_TARGETS,
        bias="none", task_type="CAUSAL_LM",
    ))
    rm_tokenizer = load_tokenizer(wl["rm_dir"], padding_side="right")
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        wl["rm_dir"], config=load_config(wl["rm_dir"], num_labels=1)
    ).requires_grad_(False).eval()
    reward_model.config.pad_token_id = rm_tokenizer.pad_token_id
    n_rm_params = count_params(reward_model)

    batch = wl["batch_size"]
    config = PPOConfig(batch_size=batch, mini_batch_size=batch // wl["num_minibatches"], gradient_accumulation_steps=1,
                       ppo_epochs=wl["ppo_epochs"], learning_rate=wl["learning_rate"], seed=wl["seed"],
                       log_with=None)
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tokenizer)
    generation = {"max_new_tokens": wl["new_tokens"], "min_new_tokens": wl["new_tokens"], "do_sample": True,
                  "temperature": 1.0, "top_k": 0, "top_p": 1.0, "pad_token_id": tokenizer.pad_token_id,
                  "eos_token_id": tokenizer.eos_token_id}

    def reward_fn(texts: list[str]) -> list[torch.Tensor]:
        # What the reference pipeline's sentiment pipeline does, without the pipeline overhead.
        with torch.no_grad():
            enc = rm_tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False,
                               return_token_type_ids=False)
            logits = reward_model(**enc).logits[:, 0]
        return list(logits.float())

    memory.reset()
    timers, steps, prompt_lengths, response_lengths = Timers(), [], [], []
    for step in range(wl["warmup"] + wl["steps"]):
        prompts = [torch.tensor(p) for p in prompt_ids(tokenizer, wl, step)]
        start = time.perf_counter()
        with timers("generate"):
            responses = trainer.generate(prompts, return_prompt=False, batch_size=batch, **generation)
        with timers("score"):
            texts = [q + r for q, r in zip(tokenizer.batch_decode(prompts, skip_special_tokens=True),
                                           tokenizer.batch_decode(responses, skip_special_tokens=True))]
            rewards = reward_fn(texts)
        stats = trainer.step(prompts, list(responses), rewards)
        wall = time.perf_counter() - start
        parts = timers.pop()
        parts["forward"] = float(stats["time/ppo/forward_pass"])
        parts["update"] = float(stats["time/ppo/optimize_step"])
        steps.append(step_row("trl0114", step, wall, parts))
        prompt_lengths.append(mean_tokens(prompts))
        response_lengths.append(mean_tokens(responses))

    write_result(args.out, {
        "framework": "trl0114", "task": "ppo", "size": wl["size"], "n_params": n_params, "n_rm_params": n_rm_params,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps": steps, "median": summarize_steps(steps, wl["warmup"]),
        "prompt_len_mean": sum(prompt_lengths) / len(prompt_lengths),
        "response_len_mean": sum(response_lengths) / len(response_lengths),
        "memory": memory.report(), "timing_split": "full",
        "versions": _versions(),
    })


def _versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("trl", "transformers", "peft", "accelerate", "torch")}


if __name__ == "__main__":
    main()
