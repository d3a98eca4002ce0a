#!/usr/bin/env python
"""DPO: align a (supervised fine-tuned) causal LM directly on preference pairs, no reward model.

Direct Preference Optimization on the Trainer path: transformers' ``Trainer``, or optimum-habana's
``GaudiTrainer`` on Gaudi. The loss (``rlhf/dpo.py``, checked against TRL 1.16's ``DPOTrainer``) uses
the answers' summed log-probs under the policy and a frozen reference: ``--loss_type sigmoid`` (DPO;
with ``--label_smoothing`` conservative DPO), ``ipo`` or ``robust``, with ``--beta`` (0.1). LoRA by
default, the reference being the same model with the adapter disabled (no second copy); ``--peft
none`` trains every weight against a frozen copy, or against ``--precompute_ref_log_probs`` (the
reference's log-probs computed once before training, so no copy is kept). Prompt and answers are
tokenized exactly as ``finetune_clm.py`` does (the same BOS handling and prompt/answer boundary);
``--max_length`` (512) bounds prompt + answer, ``--max_prompt_length`` (half of it) the prompt
(keeping its end); the number of truncated pairs is logged.

Data: the reward-model stage's formats and flags (``--train_file``/``--validation_file`` or
``--dataset_name``, default Intel/orca_dpo_pairs; orca, prompt/chosen/rejected, implicit prompt,
conversations; ``--validation_split_percentage`` 2 held out when there is no validation split).

Logs (and ``training_curves.png``) carry TRL's keys: ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``; the held-out
evaluation (``eval_results.json``) the same with an ``eval_`` prefix. ``output_dir`` gets the adapter
(or the full model with ``--peft none``), the tokenizer, ``train_results.json``, ``eval_results.json``.
``--heldout_samples N`` also samples responses to N held-out prompts before and after training and
writes ``eval_samples.jsonl`` and ``summary.json`` (KL to the reference, response length) for the
pipeline report; with ``--heldout_reward_model RM_DIR`` a reward model also scores those responses
(raw), so DPO can sit in one table with RL runs scored by the same model (``rlhf.run_table``). Checkpoints, ``--resume_from_checkpoint PATH|true``, stop-on-signal and NaN handling
are the other Trainer stages'.

Usage (a local tiny model and the demo data)::

    python -m rlhf.tiny_model --output_dir /tmp/tiny
    python dpo_training.py --model_name_or_path /tmp/tiny --train_file data/demo/train.jsonl \
        --validation_file data/demo/test.jsonl --output_dir /tmp/dpo --max_steps 20 \
        --learning_rate 1e-3 --per_device_train_batch_size 8 --beta 0.1

    # after SFT and merge_peft_adapter.py (8 GPUs)
    torchrun --nproc_per_node 8 dpo_training.py --model_name_or_path llama2_7b_se_merged \
        --dataset_name Intel/orca_dpo_pairs --output_dir llama2_7b_dpo --bf16 True --beta 0.1 \
        --per_device_train_batch_size 2 --gradient_accumulation_steps 4 --learning_rate 5e-5 \
        --num_train_epochs 1 --logging_steps 1
    python merge_peft_adapter.py --adapter_model_name llama2_7b_dpo --output_name llama2_7b_dpo_merged

    # Gaudi: one card, or 8 through gaudi_spawn.py
    python dpo_training.py ... --use_habana --use_lazy_mode
    python gaudi_spawn.py --world_size 8 --use_mpi dpo_training.py ... --use_habana --use_lazy_mode

Flags can also come from a YAML/JSON file: ``python dpo_training.py dpo.yaml``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from rlhf.arguments import parse_stage_args, public_dict
from rlhf.data import DataArguments, detect_format, first_rows, load_splits, prepare_examples, resolve_template
from rlhf.distributed import exit_job, setup_distributed_env
from rlhf.dpo import (
    LOGP_KEYS,
    LOSS_TYPES,
    REWARD_KEYS,
    DPOPairCollator,
    check_dpo_settings,
    disable_dropout,
    dpo_metrics,
    heldout_kl,
    make_dpo_trainer_class,
    sample_responses,
    tokenize_preferences,
)
from rlhf.errors import UserError, run_cli
from rlhf.modeling import (
    LoraArguments,
    ModelArguments,
    check_model_path,
    count_parameters,
    load_causal_lm,
    load_model_tokenizer,
    load_sequence_classifier,
    load_tokenizer,
    lora_config,
)
from rlhf.plotting import plot_trainer_history
from rlhf.report import heldout_result
from rlhf.reward import RewardScorer, check_reward_model_config
from rlhf.sequences import ends_with_eos
from rlhf.training import (
    RunArguments,
    check_output_dir,
    check_training_args,
    evaluate_and_save,
    reliable_trainer_class,
    resolve_trainer_resume,
    prepare_pair_training_args,
    setup_logging,
    train_and_save,
    trainer_run_finished,
)
from rlhf.zero import full_parameters, prepare_deepspeed

logger = logging.getLogger("rlhf")
DEFAULT_DATASET = "Intel/orca_dpo_pairs"


@dataclass
class DPOArguments:
    beta: float = field(default=0.1, metadata={"help": "Strength of the pull towards the reference (TRL's beta)."})
    loss_type: str = field(
        default="sigmoid", metadata={"help": f"{', '.join(LOSS_TYPES)} (TRL's names)."}
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Probability a preference is flipped: cDPO for sigmoid, rDPO for robust."}
    )
    max_length: int = field(default=512, metadata={"help": "Longest tokenized prompt + answer."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Longest tokenized prompt, its end kept (default: half of --max_length)."}
    )
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "Compute the reference's log-probs once before training (no copy kept)."}
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Turn the base model's dropout off (TRL's default); LoRA dropout stays."}
    )
    heldout_samples: int = field(
        default=0, metadata={"help": "Held-out prompts sampled before and after training for the report (0: off); "
                                     "the first distinct ones of the whole validation split (--max_eval_samples "
                                     "caps only the pairs DPO evaluates)."}
    )
    heldout_max_new_tokens: int = field(default=32, metadata={"help": "Longest held-out response."})
    heldout_reward_model: str | None = field(default=None, metadata={
        "help": "A reward model (reward_modeling.py's output) that scores the held-out responses before and after, "
                "raw: DPO in the same table as the RL runs that used it."})

    def check(self) -> None:
        check_dpo_settings(self.beta, self.loss_type, self.label_smoothing)
        if self.max_prompt_length is None and self.max_length > 1:
            self.max_prompt_length = self.max_length // 2
        if self.max_length <= 1 or self.max_prompt_length <= 0:
            raise UserError("--max_length must be at least 2 and --max_prompt_length positive")
        if self.max_prompt_length >= self.max_length:
            raise UserError(
                f"--max_prompt_length {self.max_prompt_length} leaves no room for the answer within "
                f"--max_length {self.max_length}; make it smaller"
            )
        if self.heldout_samples < 0 or self.heldout_max_new_tokens <= 0:
            raise UserError("--heldout_samples must be >= 0 and --heldout_max_new_tokens positive")
        if self.heldout_reward_model and not self.heldout_samples:
            raise UserError("--heldout_reward_model scores the held-out responses; also pass --heldout_samples N")


@dataclass
class DPODataArguments(DataArguments):
    validation_split_percentage: int = field(
        default=2, metadata={"help": "Percent of train held out when no validation split/file exists."}
    )


def heldout_prompts(dataset, count: int) -> list[str]:
    """The first ``count`` distinct rendered prompts of a prepared split."""
    return list(dict.fromkeys(dataset["prompt"]))[:count]


def main() -> None:
    run_started = time.perf_counter()
    dist = setup_distributed_env(supports_deepspeed=True)  # DeepSpeed: rlhf.zero.prepare_deepspeed below
    parsed = parse_stage_args(
        (ModelArguments, DPODataArguments, DPOArguments, LoraArguments, RunArguments), True, sys.argv[1:]
    )
    model_args, data_args, dpo_args, lora_args, run_args, training_args = parsed.values
    backend = parsed.backend
    setup_logging(training_args)
    data_args.check(default_dataset=DEFAULT_DATASET)
    dpo_args.check()
    lora_args.check()
    check_training_args(training_args)
    zero = prepare_deepspeed(training_args)  # before from_pretrained: ZeRO-3 partitions the model as it loads
    model_path = check_model_path(model_args.model_name_or_path, "--model_name_or_path")
    lora_args.check_targets(model_path, model_args.trust_remote_code)
    resume = resolve_trainer_resume(training_args)
    check_output_dir(training_args.output_dir, run_args.overwrite_output_dir, resume is not None)
    prepare_pair_training_args(training_args)
    dtype = backend.trainer_model_dtype(training_args)
    logger.info("Backend: %s (rank %d of %d)", backend.device, dist.rank, dist.world_size)
    logger.info("Arguments: %s", {**public_dict(model_args), **public_dict(data_args), **public_dict(dpo_args)})

    # The data first: a file without preference pairs stops here, before any model is loaded.
    # The whole held-out split: --max_eval_samples caps the pairs DPO evaluates, not the --heldout_samples prompts.
    train_raw, eval_raw, train_source, eval_source = load_splits(replace(data_args, max_eval_samples=None),
                                                                 seed=training_args.seed)
    detect_format(train_raw.column_names, train_source, allow_sft=False)
    if eval_raw is not None:
        detect_format(eval_raw.column_names, eval_source, allow_sft=False)
    elif dpo_args.heldout_samples:
        raise UserError("--heldout_samples needs held-out prompts; pass --validation_file or "
                        "--validation_split_percentage")
    if dpo_args.heldout_reward_model:  # refused before any model loads
        dpo_args.heldout_reward_model = check_model_path(dpo_args.heldout_reward_model, "--heldout_reward_model")
        check_reward_model_config(dpo_args.heldout_reward_model, model_args.trust_remote_code, "--heldout_reward_model")
    tokenizer = load_model_tokenizer(model_args, model_path)
    template = resolve_template(data_args.prompt_template, tokenizer)
    workers = data_args.preprocessing_num_workers
    limits = (dpo_args.max_length, dpo_args.max_prompt_length)
    with training_args.main_process_first(desc="preprocessing"):
        train_text, fmt = prepare_examples(train_raw, train_source, tokenizer, template, allow_sft=False)
        train_set, truncated = tokenize_preferences(train_text, tokenizer, *limits, workers)
        report = [("training", truncated, len(train_set))]
        eval_text = eval_set = None
        if eval_raw is not None:
            eval_text, _ = prepare_examples(eval_raw, eval_source, tokenizer, template, allow_sft=False)
            eval_pairs = first_rows(eval_text, data_args.max_eval_samples)
            eval_set, eval_truncated = tokenize_preferences(eval_pairs, tokenizer, *limits, workers)
            report.append(("evaluation", eval_truncated, len(eval_set)))
    for split, count, total in report:
        (logger.warning if count else logger.info)(
            "%d of %d %s pairs are longer than --max_length %d / --max_prompt_length %d tokens%s", count, total,
            split, *limits, ": truncated (prompt end and answer start kept)" if count else "")
    logger.info("Data: %s format, %d training pairs, %d evaluation pairs, template %s",
                fmt, len(train_set), len(eval_set) if eval_set is not None else 0, template)

    from transformers import set_seed

    set_seed(training_args.seed)  # the LoRA initialisation
    load = dict(dtype=dtype, trust_remote_code=model_args.trust_remote_code, cache_dir=model_args.cache_dir,
                revision=model_args.model_revision, low_cpu_mem_usage=model_args.low_cpu_mem_usage)
    model = load_causal_lm(model_path, **load)
    model.config.use_cache = False
    if dpo_args.disable_dropout:
        disable_dropout(model)
    ref_model = None
    if lora_args.peft == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(lora_args, "CAUSAL_LM"))  # reference: the adapter disabled
    elif not dpo_args.precompute_ref_log_probs:
        ref_model = load_causal_lm(model_path, **load)  # a frozen copy
        disable_dropout(ref_model)
    reference = ("the adapter-disabled model" if lora_args.peft == "lora" else "a frozen copy" if ref_model is not None
                 else "the initial model") + (", precomputed" if dpo_args.precompute_ref_log_probs else "")
    trainable, total = count_parameters(model)
    logger.info("Parameters: %d trainable of %d (%.2f%%); reference: %s; loss %s, beta %g",
                trainable, total, 100 * trainable / total, reference, dpo_args.loss_type, dpo_args.beta)

    trainer_class = reliable_trainer_class(make_dpo_trainer_class(parsed.trainer_class))
    trainer = trainer_class(
        model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
        data_collator=DPOPairCollator(tokenizer.pad_token_id, pad_to=dpo_args.max_length if backend.is_gaudi else None),
        processing_class=tokenizer, compute_metrics=dpo_metrics, **backend.trainer_kwargs(training_args),
        skip_nonfinite_batches=run_args.skip_nonfinite_batches,
        beta=dpo_args.beta, loss_type=dpo_args.loss_type, label_smoothing=dpo_args.label_smoothing,
        ref_model=ref_model,
    )
    if trainer_run_finished(trainer, resume):
        return  # resumed at the end of a finished run: change nothing
    if dpo_args.precompute_ref_log_probs:
        # Before training: with --peft none and no copy, the model itself is still the reference. Under ZeRO-3 no
        # engine drives the model yet: its weights are gathered whole on every rank for these passes.
        with full_parameters(trainer.model):
            trainer.train_dataset = trainer.precompute_reference(train_set, "training")
            if eval_set is not None:
                eval_set = trainer.eval_dataset = trainer.precompute_reference(eval_set, "evaluation")

    heldout = heldout_prompts(eval_text, dpo_args.heldout_samples) if eval_text is not None else []
    sampling = dict(max_new_tokens=dpo_args.heldout_max_new_tokens, max_prompt_length=dpo_args.max_prompt_length,
                    batch_size=training_args.per_device_eval_batch_size, seed=training_args.seed + 1234,
                    device=training_args.device)
    has_reference = lora_args.peft == "lora" or ref_model is not None
    scorer = None
    if dpo_args.heldout_reward_model and (trainer.is_world_process_zero() or zero == 3):
        scorer = heldout_scorer(dpo_args, model_args.trust_remote_code, training_args.device)
    # Held-out sampling on rank 0; under ZeRO-3 on every rank (gathering the weights is a collective), the same
    # prompts and seed, rank 0 writing.
    evaluate_heldout = bool(heldout) and (trainer.is_world_process_zero() or zero == 3)
    before = after = None
    if evaluate_heldout:
        with full_parameters(trainer.model):
            before = heldout_eval(trainer.model, trainer.ref_model, tokenizer, heldout, sampling, has_reference,
                                  "before DPO", scorer)

    train_and_save(trainer, training_args, resume, len(train_set), tokenizer)
    if eval_set is not None:
        evaluate_and_save(trainer, len(eval_set), with_perplexity=False)
    if evaluate_heldout:
        with full_parameters(trainer.model, engine=trainer.model_wrapped):
            after = heldout_eval(trainer.model, trainer.ref_model, tokenizer, heldout, sampling, has_reference,
                                 "after DPO", scorer)
    if not trainer.is_world_process_zero():
        return
    keys = (*REWARD_KEYS, *LOGP_KEYS)
    plot = plot_trainer_history(trainer.state.log_history, training_args.output_dir,
                                extra_keys=(*keys, *(f"eval_{k}" for k in REWARD_KEYS)))
    logger.info("Saved the %s and tokenizer to %s; training curves: %s",
                "adapter" if lora_args.peft == "lora" else "model", training_args.output_dir, plot)
    if after is not None:
        write_summary(Path(training_args.output_dir), trainer.state.global_step, backend.device, heldout, before,
                      after, plot, wall_time_s=time.perf_counter() - run_started, precision=precision_name(training_args))


def heldout_scorer(dpo_args: DPOArguments, trust_remote_code: bool, device) -> RewardScorer:
    """The --heldout_reward_model as a raw scorer (its input cut like rl_training's: prompt + response)."""
    path = dpo_args.heldout_reward_model
    reward_tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    reward_model = load_sequence_classifier(path, reward_tokenizer, flag="--heldout_reward_model")
    reward_model.to(device).requires_grad_(False)
    return RewardScorer(reward_model, reward_tokenizer, batch_size=16,
                        max_length=dpo_args.max_prompt_length + dpo_args.heldout_max_new_tokens)


def heldout_eval(model, ref_model, tokenizer, prompts, sampling: dict, has_reference: bool, label: str,
                 scorer: RewardScorer | None = None) -> dict:
    """Sampled responses to held-out prompts, their mean length, the fraction ending with EOS (not cut at
    ``--heldout_max_new_tokens``), KL to the reference and (with a scorer) the reward model's raw score."""
    responses = sample_responses(model, tokenizer, prompts, **sampling)
    finished = ends_with_eos(responses, tokenizer.eos_token_id).tolist()
    metrics = {"eval/response_length": sum(len(r) for r in responses) / max(len(responses), 1),
               "eval/finished": sum(finished) / max(len(finished), 1)}
    if has_reference:
        metrics["eval/kl"] = heldout_kl(model, ref_model, tokenizer, prompts, responses, sampling["max_prompt_length"],
                                        sampling["batch_size"], sampling["device"])
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    raw_scores = []
    if scorer is not None:
        raw_scores = scorer(prompts, texts).tolist()
        metrics["eval/raw_scores"] = sum(raw_scores) / max(len(raw_scores), 1)
    logger.info("Held-out %s (%d prompts): %s", label, len(prompts), metrics)
    return {"metrics": metrics, "responses": texts, "raw_scores": raw_scores,
            "lengths": [len(r) for r in responses], "finished": finished}


def precision_name(training_args) -> str:
    return "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"


def write_summary(output_dir: Path, steps: int, device: str, prompts, before: dict, after: dict, plot,
                  wall_time_s: float, precision: str) -> None:
    """``eval_samples.jsonl`` and ``summary.json`` in the shape ``rlhf.report`` reads (as PPO's)."""
    samples = [{"prompt": p, "response_before": b, "response_after": a, "length_before": lb, "length_after": la,
                "finished_before": fb, "finished_after": fa}
               for p, b, a, lb, la, fb, fa in zip(prompts, before["responses"], after["responses"], before["lengths"],
                                                  after["lengths"], before["finished"], after["finished"])]
    for sample, first, last in zip(samples, before["raw_scores"], after["raw_scores"]):
        sample.update(rm_score_before=first, rm_score_after=last)
    with (output_dir / "eval_samples.jsonl").open("w") as handle:
        handle.writelines(json.dumps(s) + "\n" for s in samples)
    summary = {
        **({"result": heldout_result(before["metrics"], after["metrics"], "reward-model",
                                   extra={"finished": "eval/finished"})} if after["raw_scores"] else {}),
        "algorithm": "dpo", "steps": steps, "backend": device, "precision": precision,
        "wall_time_s": round(wall_time_s, 1),  # this invocation's (a resumed run: since resuming)
        "eval_before": before["metrics"], "eval_after": after["metrics"], "samples": samples[:4],
        "paths": {"plot": str(plot) if plot else None, "adapter": str(output_dir),
                  "eval_samples": str(output_dir / "eval_samples.jsonl")},
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("Held-out summary: %s", output_dir / "summary.json")


if __name__ == "__main__":
    exit_job(run_cli(main))
