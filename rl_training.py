#!/usr/bin/env python
"""Stage 3 of RLHF: PPO on the SFT policy against the reward model.

The policy is the SFT model with a LoRA adapter and a value head on its last hidden state; the
reference log-probs come from the same model with the adapter disabled (no second copy).
``--peft none`` trains the whole model against a frozen reference copy (small models only).
The algorithm lives in ``rlhf/ppo.py``; this script loads models and data, runs the loop, logs,
checkpoints, evaluates on held-out prompts before and after, and saves the result. Every PPO
setting is a field of ``rlhf.ppo.PPOConfig``, parsed from the command line as it is (``--help``).

Usage::

    python rl_training.py --model_name /tmp/sft_merged --reward_model_name /tmp/rm \
        --train_file data/demo/train.jsonl --output_dir /tmp/ppo --batch_size 8 --mini_batch_size 4 \
        --gradient_accumulation_steps 1 --output_max_length 32 --steps 20 --batched_gen True --device cpu

    # the reference's command (8 GPUs)
    accelerate launch --multi_gpu --num_machines 1 --num_processes 8 rl_training.py --log_with=wandb \
        --model_name=llama2_7b_se_merged --reward_model_name=llama2_7b_rm --tokenizer_name=llama2_7b_se_merged \
        --adafactor=False --save_freq=100 --output_max_length=128 --batch_size=8 --gradient_accumulation_steps=8 \
        --batched_gen=True --ppo_epochs=4 --seed=0 --learning_rate=1.4e-5 --early_stopping=True \
        --output_dir=llama-se-rl-finetune

    # resume after an interruption
    python rl_training.py <same flags> --resume_from_checkpoint

    # DeepSpeed ZeRO-2/3 (docs/distributed.md): the engine steps when PPO ends an accumulation window
    torchrun --nproc_per_node 8 rl_training.py <flags> --deepspeed configs/deepspeed/zero3.json

Outputs in ``output_dir``: ``metrics.jsonl`` (one row per step), ``training_curves.png``,
``checkpoint-<step>/`` every ``--save_freq`` steps, the final adapter + ``value_head.safetensors``,
``merged/`` (the policy with LoRA merged, ready for ``from_pretrained``), ``summary.json`` (first the
reward model's raw held-out score before/after and whether it improved, then KL, length, and the
missing-EOS penalty apart) and ``eval_samples.jsonl`` (held-out prompts with responses before/after).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhf.arguments import check_trackers_installed, parse_stage_args, public_dict
from rlhf.checkpoint import MetricsLog, atomic_directory, checkpoint_step, prune_checkpoints
from rlhf.data import DataArguments, load_splits, prepare_examples, resolve_template
from rlhf.distributed import exit_job, setup_distributed_env
from rlhf.errors import Interrupted, TrainingDiverged, UserError, run_cli
from rlhf.modeling import DEFAULT_TARGETS, check_model_path, load_causal_lm, load_sequence_classifier, load_tokenizer
from rlhf.plotting import plot_curves
from rlhf.ppo import (
    TRAINER_STATE_FILE,
    LengthSampler,
    PolicyWithValueHead,
    PPOConfig,
    PPOTrainer,
    ValueHead,
    load_value_head,
)
from rlhf.report import baseline_verdict, heldout_result, paired_change, within_noise
from rlhf.reward import RewardScorer, check_reward_model_config
from rlhf.reward_functions import CombinedReward, import_reward_fn
from rlhf.rollout import check_engine_available, make_engine
from rlhf.tokenization import encode_text, keep_end
from rlhf.training import StopOnSignal, already_finished, check_output_dir, resolve_resume, resume_requested
from rlhf.validation import check_lora, check_lora_targets
from rlhf.zero import frozen_under_zero3, ppo_deepspeed_plugin

logger = logging.getLogger("rlhf")

CURVE_KEYS = [
    "objective/raw_scores", "objective/eos_penalty", "objective/scores", "objective/kl", "objective/kl_coef", "objective/entropy", "loss/policy", "loss/value",
    "policy/approxkl", "policy/clipfrac", "response/length", "response/ended_with_eos",
]
WATCHED = ("objective/scores", "objective/kl", "loss/policy", "loss/value")
RUN_STATE = "run_state.json"
SUMMARY = "summary.json"


@dataclass
class ScriptArguments:
    """What to train and where to write it. The PPO settings themselves are ``rlhf.ppo.PPOConfig``'s flags."""

    model_name: str | None = field(default=None, metadata={"help": "SFT model (merged) to start from."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model's)."})
    reward_model_name: str | None = field(default=None, metadata={"help": "Reward model from reward_modeling.py."})
    reward_fn: list[str] | None = field(default=None, metadata={
        "help": "Reward(s) computed by code, module:function (e.g. rlhf.demo_rule:rule_reward), instead of or beside "
                "the reward model; gets prompts, responses and the prompt rows' other columns."})
    reward_weights: list[float] | None = field(default=None, metadata={
        "help": "One weight per reward, the reward model first (default: 1 each)."})
    log_with: str | None = field(default=None, metadata={"help": "wandb or tensorboard (besides metrics.jsonl)."})
    normalize_reward: bool = field(default=False, metadata={"help": "Normalise scores with the RM's stored mean/std."})
    batched_gen: bool = field(default=False, metadata={"help": "Generate the whole batch at once (else one by one)."})
    reward_batch_size: int = field(default=16, metadata={"help": "Texts per reward-model forward."})
    pad_max_len: int | None = field(default=None, metadata={"help": "Static reward-model input length."})
    steps: int = field(default=20000, metadata={"help": "Most PPO steps."})
    num_train_epochs: int = field(default=1, metadata={"help": "Passes over the prompts (capped by --steps)."})
    save_freq: int | None = field(default=None, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep only the newest N checkpoints."})
    output_dir: str = field(default="runs/", metadata={"help": "Where everything is written."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow an output_dir holding another run."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "Checkpoint path, or true: newest."})
    peft: str = field(default="lora", metadata={"help": "lora, or none (full fine-tune, frozen reference copy)."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r (--lora_r, the reference's name, works too).",
                                                 "aliases": ["--lora_r"]})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "Modules to adapt."})
    eval_samples: int = field(default=32, metadata={"help": "Held-out prompts evaluated before and after (0: off)."})
    eval_batch_size: int = field(default=0, metadata={
        "help": "Held-out responses per generate call in the evaluation and best-of-n (0: --batch_size). Larger is "
                "faster where memory allows: a decode step costs little more for 24 sequences than for 8."})
    best_of_n: int = field(default=0, metadata={
        "help": "Also score best-of-n sampling from the starting policy on the held-out prompts (the best of n "
                "responses per prompt by the raw reward): the baseline RL must beat to be worth its cost. 0: off."})
    num_shown_samples: int = field(default=4, metadata={"help": "Responses shown in summary.json and the log."})
    skip_nonfinite_rewards: bool = field(default=False, metadata={"help": "Skip a batch whose rewards are NaN/inf."})
    merge_final: bool = field(default=True, metadata={"help": "Also save the merged policy in output_dir/merged."})
    bf16: bool = field(default=False, metadata={
        "help": "Frozen weights (base, reference, reward model) in bfloat16; LoRA adapters, value head, optimizer, "
                "log-probs and advantages stay fp32. Needs bf16 hardware; LoRA only."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code from the hub (off by default)."})
    deepspeed: str | None = field(default=None, metadata={
        "help": "DeepSpeed config (configs/deepspeed/zero2.json or zero3.json): train the policy under the DeepSpeed "
                "ZeRO engine. accelerate launch --use_deepspeed --deepspeed_config_file F works too."})

    def check(self) -> None:
        if self.log_with not in (None, "wandb", "tensorboard"):
            raise UserError(f"--log_with {self.log_with!r} is not supported; use wandb or tensorboard")
        check_trackers_installed([self.log_with] if self.log_with else [], "--log_with")
        if self.peft not in ("lora", "none"):
            raise UserError(f"--peft {self.peft!r} is not supported; use lora or none")
        for name in ("steps", "num_train_epochs", "reward_batch_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} {getattr(self, name)} must be positive")
        if self.save_freq is not None and self.save_freq <= 0:
            raise UserError(f"--save_freq {self.save_freq} must be positive")
        if self.eval_samples < 0:
            raise UserError("--eval_samples must be >= 0")
        if self.eval_batch_size < 0:
            raise UserError(f"--eval_batch_size {self.eval_batch_size} must be >= 0 (0: --batch_size)")
        if self.peft == "lora":
            check_lora(self.lora_rank, self.lora_alpha, self.lora_dropout, rank_flag="--lora_rank")
        if self.best_of_n < 0 or self.best_of_n == 1:
            raise UserError(f"--best_of_n {self.best_of_n}: use 0 (off) or n >= 2 responses per held-out prompt")


def distinct_prompts(prompts: list[str], source: str) -> list[str]:
    """Non-empty prompts, each once, in file order.

    Preference files often hold several pairs per prompt; PPO should visit each prompt once per
    epoch, and a prompt held out for evaluation must not also be trained on.
    """
    non_empty = [p for p in prompts if p]
    distinct = list(dict.fromkeys(non_empty))
    if len(distinct) < len(non_empty):
        logger.info("%s: %d repeated prompts skipped (%d distinct)",
                    source, len(non_empty) - len(distinct), len(distinct))
    return distinct


def rows_by_prompt(prompts: list[str], raw) -> dict[str, dict]:
    """Each rendered prompt's dataset row (its first), whose columns reward functions may read."""
    rows: dict[str, dict] = {}
    for prompt, row in zip(prompts, raw):
        rows.setdefault(prompt, row)
    return rows


def columns_of(prompts: list[str], rows: dict[str, dict]) -> dict[str, list]:
    """The dataset columns of ``prompts`` as lists aligned with them (what a reward function gets)."""
    names = list(rows[prompts[0]]) if prompts else []
    return {name: [rows[p].get(name) for p in prompts] for name in names}


def load_prompts(data_args: DataArguments, config: PPOConfig, eval_samples: int, tokenizer, world: int, rank: int):
    """(training prompts for this rank, held-out prompts, each prompt's dataset row); prompts are rendered texts."""
    train_raw, eval_raw, train_source, eval_source = load_splits(data_args, seed=config.seed)
    template = resolve_template(data_args.prompt_template, tokenizer)
    train, _ = prepare_examples(train_raw, train_source, tokenizer, template, allow_sft=True)
    rows = rows_by_prompt(train["prompt"], train_raw)
    prompts = distinct_prompts(train["prompt"], train_source)
    if not prompts:
        raise UserError(f"{train_source}: no prompts found (a text-only dataset has none); give prompts to PPO")
    held_out: list[str] = []
    if eval_raw is not None:
        evaluation, _ = prepare_examples(eval_raw, eval_source, tokenizer, template, allow_sft=True)
        held_out = distinct_prompts(evaluation["prompt"], eval_source)
        rows = {**rows_by_prompt(evaluation["prompt"], eval_raw), **rows}
    elif eval_samples:
        shuffled = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(config.seed)).tolist()
        cut = min(eval_samples, len(prompts) // 5)
        held_out = [prompts[i] for i in shuffled[:cut]]
        prompts = [prompts[i] for i in sorted(shuffled[cut:])]
    held_out = held_out[:eval_samples]
    # The same number of prompts on every rank (drop at most world - 1): the ranks' step counts must
    # agree, or the one with more steps waits forever in a collective the others never join.
    prompts = prompts[: len(prompts) - len(prompts) % world][rank::world]
    if len(prompts) < config.prompts_per_step:
        raise UserError(
            f"{train_source}: {len(prompts)} prompts per process, fewer than the {config.prompts_per_step} a step needs "
            f"(--batch_size {config.batch_size} / --num_generations {config.num_generations}); "
            "lower --batch_size or give more data"
        )
    return prompts, held_out, rows


def all_ranks_agree(flag: bool, accelerator) -> bool:
    """True if ``flag`` is true on every process, so all ranks take the same branch."""
    if accelerator.num_processes == 1:
        return flag
    failed = torch.tensor([0.0 if flag else 1.0], device=accelerator.device)
    return accelerator.reduce(failed, reduction="sum").item() == 0


def prompt_token_ids(tokenizer, prompts: list[str], max_length: int) -> list[torch.Tensor]:
    """Rendered prompts as token ids, encoded as SFT encoded them (``rlhf.tokenization``), keeping the end."""
    return [torch.tensor(keep_end(encode_text(tokenizer, p), max_length), dtype=torch.long) for p in prompts]


def batch_for_step(num_prompts: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Prompt indices of PPO step ``step`` (0-based): a fresh seeded shuffle per pass over the data."""
    per_epoch = num_prompts // batch_size
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[index * batch_size : (index + 1) * batch_size]


def build_policy(args: ScriptArguments, config: PPOConfig, backend, resume_dir: Path | None):
    """SFT model + LoRA (or full weights) + value head (GAE only); from the checkpoint when resuming."""
    seed = config.seed
    model_path = check_model_path(args.model_name, "--model_name")
    dtype = backend.torch_dtype(bf16=args.bf16)
    base = load_causal_lm(model_path, dtype=dtype, trust_remote_code=args.trust_remote_code)
    torch.manual_seed(seed)  # LoRA and value-head initialisation: the same for the same --seed
    ref_model = None
    if args.peft == "lora":
        from peft import PeftModel, get_peft_model

        from rlhf.modeling import LoraArguments, lora_config

        if resume_dir is not None:
            model = PeftModel.from_pretrained(base, str(resume_dir), is_trainable=True)
        else:
            lora = LoraArguments(
                lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                lora_target_modules=args.lora_target_modules,
            )
            model = get_peft_model(base, lora_config(lora, "CAUSAL_LM"))
    else:
        ref_model = load_causal_lm(model_path, dtype=dtype, trust_remote_code=args.trust_remote_code)
        model = load_causal_lm(str(resume_dir), dtype=dtype) if resume_dir is not None else base
    value_head = ValueHead(model.config.hidden_size) if config.has_critic else None
    if value_head is not None and resume_dir is not None:
        load_value_head(value_head, str(resume_dir))
    device = torch.device(backend.device)
    model.to(device)
    if value_head is not None:
        value_head.to(device)
    if ref_model is not None:
        ref_model.to(device)
    return PolicyWithValueHead(model, value_head, ref_model=ref_model)


def build_rollout_engine(args: ScriptArguments, config: PPOConfig, policy, tokenizer, backend):
    """The engine --rollout_engine names, or None for the default ``hf`` engine the trainer builds itself
    (it needs the DeepSpeed engine, which exists only once the trainer has prepared the policy)."""
    if config.rollout_engine == "hf":
        return None
    return make_engine(
        config.rollout_engine, model=policy.model, model_path=check_model_path(args.model_name, "--model_name"),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, device=backend.device,
        dtype="bfloat16" if args.bf16 else "float32", seed=config.seed,
        max_model_len=config.input_max_length + config.output_max_length,
        gpu_memory_utilization=config.vllm_gpu_memory_utilization,
        tensor_parallel_size=config.vllm_tensor_parallel_size, kv_cache_space_gb=config.vllm_kv_cache_gb)


def build_reward(args: ScriptArguments, config: PPOConfig, backend, accelerator) -> CombinedReward:
    """The reward model (raw logit, or normalised) and/or the --reward_fn functions, weighted. Under ZeRO-3
    the reward model is partitioned like the policy, in its own inference engine."""
    functions = [(spec, import_reward_fn(spec)) for spec in args.reward_fn or []]
    scorer = None
    if args.reward_model_name:
        reward_path = check_model_path(args.reward_model_name, "--reward_model_name")  # checked in main()
        reward_tokenizer = load_tokenizer(reward_path, trust_remote_code=args.trust_remote_code)
        dtype = backend.torch_dtype(bf16=args.bf16)
        reward_model = load_sequence_classifier(reward_path, reward_tokenizer, dtype=dtype)
        reward_model.to(torch.device(backend.device)).requires_grad_(False)
        reward_model = frozen_under_zero3(reward_model, accelerator)
        scorer = RewardScorer(reward_model, reward_tokenizer, batch_size=args.reward_batch_size,
                              max_length=args.pad_max_len or config.input_max_length + config.output_max_length,
                              normalize=args.normalize_reward, pad_to_max_length=config.pad_for_acceleration)
    return CombinedReward(scorer, functions, args.reward_weights)


def reward_source(args: ScriptArguments) -> str:
    """What the raw score is, in words, for the summary and the last line."""
    model = "reward-model (normalised with its stored mean/std)" if args.normalize_reward else "reward-model"
    names = ([model] if args.reward_model_name else []) + [f"--reward_fn {f}" for f in args.reward_fn or []]
    return names[0] if len(names) == 1 else "weighted reward (" + " + ".join(names) + ")"


def finished_steps(output_dir: str) -> int | None:
    """Steps of the finished run in ``output_dir`` (its summary.json), or None if none finished there."""
    summary = Path(output_dir) / SUMMARY
    if not summary.is_file():
        return None
    return int(json.loads(summary.read_text()).get("steps", 0))


def save_checkpoint(trainer: PPOTrainer, output_dir: str, step: int, args: ScriptArguments, accelerator) -> Path:
    """``output_dir/checkpoint-<step>``, complete or absent; call on EVERY process (each writes its RNG state,
    under DeepSpeed its part of the engine's state; the main process the weights and the PPO state)."""
    final = Path(output_dir) / f"checkpoint-{step}"
    is_main = accelerator.is_main_process
    barrier = accelerator.wait_for_everyone if accelerator.num_processes > 1 else None
    with atomic_directory(final, is_main=is_main, barrier=barrier) as folder:
        trainer.save_policy(folder)
        trainer.save_state(folder)
        if is_main:
            (folder / RUN_STATE).write_text(json.dumps({"step": step, "seed": trainer.config.seed}))
    if is_main:
        prune_checkpoints(output_dir, args.save_total_limit)
    return final


def check_finite(stats: dict, step: int) -> None:
    for key in WATCHED:
        value = stats.get(key)
        if value is not None and not math.isfinite(value):
            raise TrainingDiverged(
                f"{key} is {value} at step {step}; the last checkpoint is intact - resume from it with a lower "
                "--learning_rate or --init_kl_coef"
            )


def evaluate(trainer: PPOTrainer, prompts: list[str], prompt_ids: list[torch.Tensor], columns: dict, label: str,
             batch_size: int) -> dict:
    """Reward-model score, EOS penalty and KL to the reference on held-out prompts, with the responses."""
    if not prompts:
        return {"metrics": {}, "responses": []}
    start = time.perf_counter()
    generator_state = torch.get_rng_state()
    torch.manual_seed(trainer.config.seed + 1234)  # same sampling noise before and after training
    metrics, samples = trainer.evaluate(prompts, prompt_ids, batch_size=batch_size, columns=columns)
    torch.set_rng_state(generator_state)
    logger.info("Eval %s (%d prompts, %.1fs): %s", label, len(prompts), time.perf_counter() - start,
                ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return {"metrics": metrics, "responses": [s["response"] for s in samples],
            "raw_scores": [s["raw_score"] for s in samples], "scores": [s["score"] for s in samples],
            "lengths": [s["length"] for s in samples], "finished": [s["finished"] for s in samples]}


def best_of_n(trainer: PPOTrainer, prompts: list[str], prompt_ids: list[torch.Tensor], columns: dict, n: int,
              batch_size: int) -> tuple[float, list[float]]:
    """Mean over held-out prompts of the best raw reward among ``n`` responses sampled from the current policy,
    and this process's best per prompt (the trained policy's score is compared with it prompt by prompt).

    Only sampling and scoring: unlike ``evaluate`` no KL forward passes, which the baseline does not need."""
    start = time.perf_counter()
    generator_state = torch.get_rng_state()
    torch.manual_seed(trainer.config.seed + 4321)
    per_batch = max(batch_size // n, 1)  # whole groups of n in each generate call
    best = []
    for i in tqdm(range(0, len(prompts), per_batch), desc=f"best-of-{n}", unit="batch", leave=False,
                  disable=not trainer.accelerator.is_main_process):
        texts = [p for p in prompts[i : i + per_batch] for _ in range(n)]
        ids = [t.to(trainer.device) for t in prompt_ids[i : i + per_batch] for _ in range(n)]
        group_columns = {name: [v for v in values[i : i + per_batch] for _ in range(n)] for name, values in columns.items()}
        raw = trainer.score(texts, trainer.generate(ids), **({"columns": group_columns} if columns else {})).raw
        best.append(raw.reshape(-1, n).max(dim=1).values)
    torch.set_rng_state(generator_state)
    per_prompt = torch.cat(best)
    score = trainer.accelerator.reduce(per_prompt.mean().to(trainer.device), reduction="mean").item()
    logger.info("Best-of-%d baseline (%d prompts x %d samples, %.1fs): raw score %.3f",
                n, len(prompts), n, time.perf_counter() - start, score)
    return score, per_prompt.tolist()


def warn_if_most_answers_are_cut(before: dict, config: PPOConfig) -> None:
    """One line when most starting responses hit the length limit: the reward model then scores unfinished
    answers, and an EOS penalty would drive learning more than the reward."""
    if "eval/finished" not in before.get("metrics", {}):
        return
    unfinished = 1 - before["metrics"]["eval/finished"]
    if unfinished <= 0.5:
        return
    cut = (f"{100 * unfinished:.0f}% of the starting policy's held-out responses reach --output_max_length "
           f"{config.output_max_length} without EOS")
    if config.missing_eos_penalty:
        logger.warning("%s: --missing_eos_penalty %g will drive learning more than the reward; raise "
                       "--output_max_length or drop the penalty", cut, config.missing_eos_penalty)
    else:
        logger.warning("%s: the reward model scores cut-off answers; raise --output_max_length for answers that "
                       "finish", cut)


def column(evaluation: dict, key: str, rows: int) -> list:
    """One per-prompt list of an ``evaluate`` result; Nones where it lacks it (an eval_before.json written by an
    earlier version, resumed: zip must not drop every sample)."""
    return evaluation.get(key) or [None] * rows


def result_line(steps: int, result: dict) -> str:
    """The run's last line: the raw held-out reward (the reward model's score) first, the penalty apart from it."""
    score, kl, penalty, length = (result[k] for k in ("reward_score", "kl_to_reference", "eos_penalty",
                                                       "response_length"))
    if score["change"] is None:
        return f"Done: {steps} steps (no held-out evaluation: --eval_samples 0 or no held-out prompts)."
    error = score.get("standard_error")
    noise = "" if error is None else f" +- {error:.3f}" + (", within noise" if within_noise(score["change"], error) else "")
    line = (f"Done: {steps} steps. Held-out {result['reward_source']} score {score['before']:.3f} -> "
            f"{score['after']:.3f} "
            f"({result['verdict']}, {score['change']:+.3f}{noise}); KL to reference {kl['before']:.3f} -> {kl['after']:.3f}; "
            f"response length {length['before']:.1f} -> {length['after']:.1f} tokens")
    finished = result.get("finished")
    if finished and finished["after"] is not None:
        line += (f"; ending with EOS (not cut at --output_max_length) {100 * finished['before']:.0f}% -> "
                 f"{100 * finished['after']:.0f}%")
    baseline = result.get("best_of_n")
    if baseline:
        line += f"; best-of-{baseline['n']} from the starting policy {baseline['score']:.3f} ({baseline_verdict(baseline, ' by RL')})"
    if penalty["before"] or penalty["after"]:
        line += (f"; missing-EOS penalty {penalty['before']:.3f} -> {penalty['after']:.3f} "
                 "(shapes the training score, not part of the reward score)")
    return line + "."


def main() -> None:
    run_started = time.perf_counter()
    dist = setup_distributed_env(supports_deepspeed=True)  # DeepSpeed: rlhf.zero.ppo_deepspeed_plugin below
    parsed = parse_stage_args((ScriptArguments, PPOConfig, DataArguments), False, sys.argv[1:])
    args, config, data_args = parsed.values
    backend = parsed.backend
    logging.basicConfig(level=logging.INFO if dist.rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args.check()
    data_args.check(default_dataset="Intel/orca_dpo_pairs")
    if not args.model_name or not (args.reward_model_name or args.reward_fn):
        raise UserError("--model_name and a reward (--reward_model_name and/or --reward_fn module:function) are required")
    for spec in args.reward_fn or []:
        import_reward_fn(spec)  # a name that does not import stops here, before any model is loaded
    check_engine_available(config.rollout_engine)  # before any model loads
    backend.check_precision(bf16=args.bf16)
    if args.bf16 and args.peft == "none":
        raise UserError("--bf16 with --peft none would make Adam update bfloat16 weights, which lose small updates; "
                        "use --peft lora (frozen bf16 base, fp32 adapter) or drop --bf16")
    deepspeed_plugin = ppo_deepspeed_plugin(args.deepspeed, config, dist.world_size, backend.device)  # None: none
    if args.peft == "lora" and not resume_requested(args.resume_from_checkpoint):  # a resume reads the saved adapter
        check_lora_targets(check_model_path(args.model_name, "--model_name"), args.lora_target_modules, DEFAULT_TARGETS,
                           trust_remote_code=args.trust_remote_code, all_linear_flag=None, model_flag="--model_name")
    if backend.is_gaudi and not config.pad_for_acceleration:
        config = dataclasses.replace(config, pad_for_acceleration=True)  # HPU graphs need static shapes
    resuming = resume_requested(args.resume_from_checkpoint)
    check_output_dir(args.output_dir, args.overwrite_output_dir, resuming)
    logger.info("Backend: %s (rank %d of %d)", backend.device, dist.rank, dist.world_size)

    tokenizer = load_tokenizer(args.tokenizer_name or check_model_path(args.model_name, "--model_name"),
                               padding_side="left", trust_remote_code=args.trust_remote_code)
    prompts, held_out, rows = load_prompts(data_args, config, args.eval_samples, tokenizer, dist.world_size, dist.rank)
    steps_per_epoch = len(prompts) // config.prompts_per_step
    total_steps = min(args.steps, steps_per_epoch * args.num_train_epochs)
    if resuming and already_finished(finished_steps(args.output_dir), total_steps):
        return  # outputs left as they are; raise --steps or --num_train_epochs to train further
    resume_dir = resolve_resume(args.resume_from_checkpoint, args.output_dir, required=(TRAINER_STATE_FILE,))

    if args.reward_model_name:  # a reward model that is not one is refused before the policy loads
        check_reward_model_config(check_model_path(args.reward_model_name, "--reward_model_name"),
                                  args.trust_remote_code)
    policy = build_policy(args, config, backend, resume_dir)
    output_dir = Path(args.output_dir)
    accelerator = backend.make_accelerator(log_with=args.log_with, project_dir=str(output_dir),
                                           deepspeed_plugin=deepspeed_plugin)
    reward_fn = build_reward(args, config, backend, accelerator)
    trainer = PPOTrainer(config, policy, tokenizer, reward_fn, accelerator, mark_step=backend.mark_step(),
                         rollout_engine=build_rollout_engine(args, config, policy, tokenizer, backend),
                         wrap_for_generation=backend.wrap_for_generation)
    if deepspeed_plugin is not None and trainer.engine is None:
        raise UserError("DeepSpeed was asked for but the accelerator did not start its engine (this run would train "
                        "without it); launch with torchrun, deepspeed or accelerate launch --use_deepspeed")
    length_sampler = LengthSampler(config.output_min_length, config.output_max_length) if config.output_min_length else None

    is_main = dist.rank == 0
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume_dir is None:
            (output_dir / SUMMARY).unlink(missing_ok=True)  # a new run: a stale summary must not say it finished
    start_step = 0
    if resume_dir is not None:
        trainer.load_state(resume_dir)
        start_step = checkpoint_step(resume_dir)
        logger.info("Resuming from %s at step %d", resume_dir, start_step)
    metrics_log = MetricsLog(output_dir / "metrics.jsonl", resume_step=start_step if resume_dir else None) if is_main else None
    if args.log_with:
        run_config = {**public_dict(args), **public_dict(config), **public_dict(data_args),
                      "world_size": dist.world_size}
        # wandb writes beside the run's other outputs (offline: output_dir/wandb/offline-run-*), not into the cwd.
        accelerator.init_trackers("rl_training", config=run_config, init_kwargs={"wandb": {"dir": str(output_dir)}})

    held_out_ids = prompt_token_ids(tokenizer, held_out, config.input_max_length)
    held_out_columns = columns_of(held_out, rows)
    before_file = output_dir / "eval_before.json"
    eval_batch_size = args.eval_batch_size or config.batch_size
    if resume_dir is not None and before_file.is_file():
        before = json.loads(before_file.read_text())
    else:
        before = evaluate(trainer, held_out, held_out_ids, held_out_columns, f"before {config.algorithm}",
                          eval_batch_size)
        if args.best_of_n and held_out:
            score, per_prompt = best_of_n(trainer, held_out, held_out_ids, held_out_columns, args.best_of_n,
                                          eval_batch_size)
            before["best_of_n"] = {"n": args.best_of_n, "score": score}
            before["best_of_n_scores"] = per_prompt
        if is_main:
            before_file.write_text(json.dumps(before))
    warn_if_most_answers_are_cut(before, config)

    logger.info("%s: %d steps of %d rollouts x %d processes (%d prompts per process)",
                config.algorithm, total_steps, config.batch_size, dist.world_size, len(prompts))
    stop = StopOnSignal()
    stop.install()
    bar = tqdm(total=total_steps, initial=start_step, desc=config.algorithm, disable=not is_main, dynamic_ncols=True)
    step = start_step
    try:
        while step < total_steps:
            indices = batch_for_step(len(prompts), config.prompts_per_step, step, config.seed)
            # Each prompt num_generations times in a row: the groups GRPO and RLOO compare within.
            batch_prompts = [prompts[i] for i in indices for _ in range(config.num_generations)]
            prompt_ids = prompt_token_ids(tokenizer, batch_prompts, config.input_max_length)
            started = time.perf_counter()
            rollout = trainer.rollout(prompt_ids, length_sampler=length_sampler,
                                      batch_size=None if args.batched_gen else 1)
            responses = rollout.responses
            generated = time.perf_counter()
            scores = trainer.score(batch_prompts, responses, columns=columns_of(batch_prompts, rows), step=step + 1)
            timings = {"time/generate_s": generated - started, "time/score_s": time.perf_counter() - generated}
            if not all_ranks_agree(bool(torch.isfinite(scores.shaped).all()), accelerator):
                if not args.skip_nonfinite_rewards:
                    raise TrainingDiverged(f"reward is not finite at step {step + 1}; fix the reward model, "
                                           "or pass --skip_nonfinite_rewards to skip such batches")
                logger.warning("Skipping step %d: non-finite reward", step + 1)
                step += 1
                bar.update(1)
                continue
            stats = trainer.step(prompt_ids, responses, scores, timings, sampler_logprobs=rollout.logprobs)
            step += 1
            check_finite(stats, step)
            if is_main:
                metrics_log.append({"step": step, **stats})
            if args.log_with:
                accelerator.log(stats, step=step)
            bar.set_postfix(rm_score=f"{stats['objective/raw_scores']:.3f}", kl=f"{stats['objective/kl']:.3f}",
                            eos_penalty=f"{stats['objective/eos_penalty']:.2f}")
            bar.update(1)
            if args.save_freq and step % args.save_freq == 0:
                save_checkpoint(trainer, args.output_dir, step, args, accelerator)
            # Every rank stops after the same step, even if the signal reached them a step apart.
            if not all_ranks_agree(stop.signal_number is None, accelerator):
                code = 128 + (stop.signal_number or signal.SIGTERM)
                saved = save_checkpoint(trainer, args.output_dir, step, args, accelerator)
                if is_main:
                    raise Interrupted(f"checkpoint {saved} written at step {step}; resume with the same command "
                                      "plus --resume_from_checkpoint", code)
                raise Interrupted("stopped by signal", code)
    finally:
        stop.restore()
        bar.close()  # before any one-line exit message, so it is not glued to the bar

    after = evaluate(trainer, held_out, held_out_ids, held_out_columns, f"after {config.algorithm}",
                     eval_batch_size)
    if args.log_with:
        accelerator.end_training()
    merged_dir = output_dir / "merged" if args.merge_final else None
    trainer.save_policy(output_dir, merged_dir)  # every rank: under ZeRO-3 the weights are gathered first
    if not is_main:
        return
    rows = metrics_log.rows()
    plot = plot_curves(rows, CURVE_KEYS, output_dir / "training_curves.png", title=config.algorithm)
    tokenizer.save_pretrained(output_dir)
    if merged_dir is not None:
        tokenizer.save_pretrained(merged_dir)
    per_prompt = [column(evaluation, key, len(held_out))  # responses before, after, raw_scores before, ...
                  for key in ("responses", "raw_scores", "lengths", "finished") for evaluation in (before, after)]
    best_scores = column(before, "best_of_n_scores", len(held_out))
    samples = [
        {"prompt": p, "response_before": rb, "response_after": ra, "rm_score_before": sb, "rm_score_after": sa,
         "length_before": lb, "length_after": la, "finished_before": fb, "finished_after": fa,
         **({"rm_score_best_of_n_before": best} if "best_of_n" in before else {})}
        for p, rb, ra, sb, sa, lb, la, fb, fa, best in zip(held_out, *per_prompt, best_scores)
    ]
    with (output_dir / "eval_samples.jsonl").open("w") as handle:
        handle.writelines(json.dumps(s) + "\n" for s in samples)
    first, last = before.get("metrics", {}), after["metrics"]
    result = heldout_result(first, last, reward_source(args),
                            extra={"finished": "eval/finished", "eos_penalty": "eval/eos_penalty",
                                   "training_score": "eval/scores"})
    paired = paired_change([s["rm_score_before"] for s in samples], [s["rm_score_after"] for s in samples])
    if paired is not None:  # the change's paired standard error over the held-out prompts
        result["reward_score"]["standard_error"] = paired[1]
    if "best_of_n" in before and result["reward_score"]["after"] is not None:
        result["best_of_n"] = {**before["best_of_n"],
                               "beaten": result["reward_score"]["after"] > before["best_of_n"]["score"]}
        margin = paired_change([s.get("rm_score_best_of_n_before") for s in samples],
                               [s["rm_score_after"] for s in samples])
        if margin is not None:  # after - best-of-n per prompt: is the win more than resampling noise?
            result["best_of_n"]["margin"], result["best_of_n"]["standard_error"] = margin
    summary = {
        "result": result,
        "algorithm": config.algorithm.lower(),
        "held_out_prompts": len(held_out),
        "steps": step, "world_size": dist.world_size, "backend": backend.device,
        "precision": "bf16" if args.bf16 else "fp32",
        "wall_time_s": round(time.perf_counter() - run_started, 1),  # this invocation's (a resumed run: since resuming)
        "eval_before": first, "eval_after": last,
        "samples": samples[: args.num_shown_samples],
        "paths": {"metrics": str(output_dir / "metrics.jsonl"), "plot": str(plot) if plot else None,
                  "adapter": str(output_dir), "merged": str(merged_dir) if merged_dir else None,
                  "eval_samples": str(output_dir / "eval_samples.jsonl")},
    }
    (output_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
    logger.info("%s Summary: %s", result_line(step, result), output_dir / SUMMARY)


if __name__ == "__main__":
    exit_job(run_cli(main))
