#!/usr/bin/env python
"""Stage 2 of RLHF: train a reward model on preference pairs.

A sequence classifier with one output scores prompt+chosen and prompt+rejected; the loss is
``-logsigmoid(r_chosen - r_rejected - margin)`` (margin from an optional ``margin`` column, else 0).
The score is read at the last real token of each text. LoRA by default (r 8, alpha 32, dropout 0.1,
score head trained in full), ``--peft none`` for a full fine-tune. ``--validation_split_percentage``
(2) of the training data is held out unless ``--validation_file`` or a validation split exists;
evaluation reports accuracy (chosen scored higher), mean margin and the score mean/std to
``eval_results.json``. Pairs longer than ``--max_length`` (512) tokens are truncated (keeping the
end of the text) or dropped (``--overflow drop``), and their number is logged.

The run always trains (the reference's command passes no ``--do_train``); ``--eval_only`` evaluates
``--model_name_or_path`` instead.
``output_dir`` gets the MERGED model and the tokenizer, loadable with
``AutoModelForSequenceClassification`` + ``AutoTokenizer``; its config holds ``reward_mean`` and
``reward_std`` (the scores of chosen and rejected answers of ``--reward_stats_samples`` (512) random
training pairs after training; 0: all pairs) and ``reward_stats_pairs`` (how many) for PPO to
normalise with, plus ``train_results.json``, ``eval_results.json`` and ``training_curves.png``.
Trainer checkpoints (``--save_strategy steps``) resume with ``--resume_from_checkpoint PATH|true``.

Usage (a local tiny model and the demo data)::

    python -m rlhf.tiny_model --output_dir /tmp/tiny
    python reward_modeling.py --model_name_or_path /tmp/tiny --train_file data/demo/train.jsonl \
        --validation_file data/demo/test.jsonl --output_dir /tmp/rm --num_train_epochs 10 \
        --learning_rate 1e-3 --per_device_train_batch_size 8 --peft none   # ~0.95 held-out accuracy

    # the reference's command (8 GPUs; data defaults to Intel/orca_dpo_pairs)
    torchrun --nnodes 1 --nproc_per_node 8 reward_modeling.py --model_name_or_path meta-llama/Llama-2-7b-hf \
        --output_dir llama2_7b_rm --log_level info --num_train_epochs 3 --logging_steps 1 \
        --per_device_train_batch_size 4

    # Gaudi: one card, or 8 through gaudi_spawn.py
    python reward_modeling.py ... --use_habana --use_lazy_mode
    python gaudi_spawn.py --world_size 8 --use_mpi reward_modeling.py ... --use_habana --use_lazy_mode

Flags can also come from a YAML/JSON file: ``python reward_modeling.py rm.yaml``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from rlhf.arguments import parse_stage_args, public_dict
from rlhf.data import DataArguments, load_splits, prepare_examples, resolve_template
from rlhf.distributed import exit_job, setup_distributed_env
from rlhf.errors import UserError, run_cli
from rlhf.modeling import (
    LoraArguments,
    ModelArguments,
    check_model_path,
    count_parameters,
    load_sequence_classifier,
    load_model_tokenizer,
    lora_config,
)
from rlhf.reward import (
    OVERFLOW_CHOICES,
    RewardPairCollator,
    find_score_head,
    longest_first,
    make_reward_trainer_class,
    reward_metrics,
    reward_stats_sample,
    save_reward_model,
    tokenize_pairs,
)
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
from rlhf.zero import model_to_save, prepare_deepspeed

logger = logging.getLogger("rlhf")
DEFAULT_DATASET = "Intel/orca_dpo_pairs"


@dataclass
class RewardArguments:
    max_length: int = field(default=512, metadata={"help": "Longest tokenized prompt + answer."})
    overflow: str = field(
        default="truncate",
        metadata={"help": "Pairs longer than --max_length: truncate (keep the end) or drop."},
    )
    eval_only: bool = field(
        default=False, metadata={"help": "Only evaluate --model_name_or_path (a trained reward model) on held-out data."}
    )
    reward_stats_samples: int = field(
        default=512,
        metadata={"help": "Training pairs (a random sample, seeded by --seed) scored after training for "
                          "reward_mean/reward_std; 0: all of them."},
    )

    def check(self) -> None:
        if self.max_length <= 0:
            raise UserError(f"--max_length {self.max_length} must be positive")
        if self.overflow not in OVERFLOW_CHOICES:
            raise UserError(f"--overflow {self.overflow!r} is not one of {', '.join(OVERFLOW_CHOICES)}")
        if self.reward_stats_samples < 0:
            raise UserError(f"--reward_stats_samples {self.reward_stats_samples} must be 0 (all) or positive")


@dataclass
class RewardDataArguments(DataArguments):
    validation_split_percentage: int = field(
        default=2, metadata={"help": "Percent of train held out when no validation split/file exists."}
    )


@dataclass
class RewardLoraArguments(LoraArguments):
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout."})


def main() -> None:
    dist = setup_distributed_env(supports_deepspeed=True)  # DeepSpeed: rlhf.zero.prepare_deepspeed below
    parsed = parse_stage_args(
        (ModelArguments, RewardDataArguments, RewardArguments, RewardLoraArguments, RunArguments), True, sys.argv[1:]
    )
    model_args, data_args, rm_args, lora_args, run_args, training_args = parsed.values
    backend = parsed.backend
    setup_logging(training_args)
    data_args.check(default_dataset=DEFAULT_DATASET)
    rm_args.check()
    lora_args.check()
    check_training_args(training_args)
    prepare_deepspeed(training_args)  # before from_pretrained: ZeRO-3 partitions the model as it loads
    backend.check_training_precision(training_args)  # --bf16 without bf16 units, --fp16 on CPU
    model_path = check_model_path(model_args.model_name_or_path, "--model_name_or_path")
    do_train = not rm_args.eval_only
    if do_train:
        lora_args.check_targets(model_path, model_args.trust_remote_code)
    resume = resolve_trainer_resume(training_args) if do_train else None
    if do_train:
        check_output_dir(training_args.output_dir, run_args.overwrite_output_dir, resume is not None)
    prepare_pair_training_args(training_args)
    logger.info("Backend: %s (rank %d of %d)", backend.device, dist.rank, dist.world_size)
    logger.info("Arguments: %s", {**public_dict(model_args), **public_dict(data_args), **public_dict(rm_args)})

    tokenizer = load_model_tokenizer(model_args, model_path)
    train_raw, eval_raw, train_source, eval_source = load_splits(data_args, seed=training_args.seed)
    if not do_train and eval_raw is None:
        raise UserError("--eval_only needs held-out data; pass --validation_file or --validation_split_percentage")
    template = resolve_template(data_args.prompt_template, tokenizer)
    workers = data_args.preprocessing_num_workers
    with training_args.main_process_first(desc="preprocessing"):
        train_text, fmt = prepare_examples(train_raw, train_source, tokenizer, template, allow_sft=False)
        train_set, overlong = tokenize_pairs(train_text, tokenizer, rm_args.max_length, rm_args.overflow, train_source, workers)
        report = [("training", overlong, len(train_text))]
        eval_set = None
        if eval_raw is not None:
            eval_text, _ = prepare_examples(eval_raw, eval_source, tokenizer, template, allow_sft=False)
            eval_set, eval_overlong = tokenize_pairs(
                eval_text, tokenizer, rm_args.max_length, rm_args.overflow, eval_source, workers
            )
            eval_set = longest_first(eval_set)
            report.append(("evaluation", eval_overlong, len(eval_text)))
    action = "dropped" if rm_args.overflow == "drop" else "truncated (their end kept)"
    for split, count, total in report:
        log = logger.warning if count else logger.info
        log("%d of %d %s pairs are longer than --max_length %d tokens%s", count, total, split, rm_args.max_length,
            f": {action}" if count else "")
    logger.info("Data: %s format, %d training pairs, %d evaluation pairs, template %s",
                fmt, len(train_set), len(eval_set) if eval_set is not None else 0, template)

    from transformers import set_seed

    set_seed(training_args.seed)  # the new score head's initialisation
    model = load_sequence_classifier(
        model_path, tokenizer, dtype=backend.trainer_model_dtype(training_args),
        trust_remote_code=model_args.trust_remote_code, cache_dir=model_args.cache_dir,
        revision=model_args.model_revision, low_cpu_mem_usage=model_args.low_cpu_mem_usage,
    )
    if lora_args.peft == "lora" and do_train:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(lora_args, "SEQ_CLS"))
        if not any(p.requires_grad for p in find_score_head(model).parameters()):
            raise RuntimeError("the score head is not trainable under LoRA; peft should keep it in modules_to_save")
    trainable, total = count_parameters(model)
    logger.info("Parameters: %d trainable of %d (%.2f%%)", trainable, total, 100 * trainable / total)

    trainer_class = reliable_trainer_class(make_reward_trainer_class(parsed.trainer_class))
    trainer = trainer_class(
        model=model, args=training_args, train_dataset=train_set if do_train else None, eval_dataset=eval_set,
        data_collator=RewardPairCollator(tokenizer, pad_to=rm_args.max_length if backend.is_gaudi else None),
        processing_class=tokenizer, compute_metrics=reward_metrics, **backend.trainer_kwargs(training_args),
        skip_nonfinite_batches=run_args.skip_nonfinite_batches,
    )
    if do_train and trainer_run_finished(trainer, resume):
        return  # resumed at the end of a finished run: change nothing
    if do_train:
        train_and_save(trainer, training_args, resume, len(train_set), tokenizer)
        stats_set = reward_stats_sample(train_set, rm_args.reward_stats_samples, training_args.seed)
        stats = trainer.predict(longest_first(stats_set), metric_key_prefix="train_scores").metrics
        mean, std = stats["train_scores_score_mean"], stats["train_scores_score_std"]
        sampled = (f"a random sample (seed {training_args.seed}; --reward_stats_samples 0 for all)"
                   if len(stats_set) < len(train_set) else "all of them")
        logger.info("Reward statistics over %d of %d training pairs, %s: mean %.4f, std %.4f (accuracy %.3f)",
                    len(stats_set), len(train_set), sampled, mean, std, stats["train_scores_accuracy"])
    if eval_set is not None:
        evaluate_and_save(trainer, len(eval_set), with_perplexity=False)
    if do_train:
        final = model_to_save(trainer)  # under ZeRO-3 every rank gathers the weights; rank 0 gets a plain copy
    if do_train and trainer.is_world_process_zero():
        save_reward_model(final, tokenizer, training_args.output_dir, mean, std, len(stats_set))
        logger.info("Saved the merged reward model and tokenizer to %s", training_args.output_dir)


if __name__ == "__main__":
    exit_job(run_cli(main))
