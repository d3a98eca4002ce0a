#!/usr/bin/env python
"""Stage 1 of RLHF: supervised fine-tuning of a causal LM on prompt -> answer pairs.

Loss only on the answer tokens (``--train_on_inputs`` to include the prompt), EOS appended unless
truncated, optional ``--dataset_concatenation`` packing that keeps documents apart, LoRA by default
(``--peft none`` for a full fine-tune), perplexity on a validation split when one is given.

Usage (a local tiny model and the demo data; any hub id works where there is network)::

    python -m rlhf.tiny_model --output_dir /tmp/tiny
    python finetune_clm.py --model_name_or_path /tmp/tiny --train_file data/demo/train.jsonl \
        --output_dir /tmp/sft --peft lora --max_steps 20 --do_train --device cpu

    # the reference's command (8 GPUs)
    torchrun --nproc_per_node 8 finetune_clm.py --model_name_or_path meta-llama/Llama-2-7b-chat-hf \
        --bf16 True --dataset_name Intel/orca_dpo_pairs --dataset_concatenation \
        --per_device_train_batch_size 2 --gradient_accumulation_steps 4 --learning_rate 1e-4 \
        --num_train_epochs 3 --save_strategy steps --save_steps 2000 --save_total_limit 1 \
        --logging_steps 1 --do_train --overwrite_output_dir --log_level info \
        --output_dir ./llama2_7b_se --peft lora --use_fast_tokenizer false

    # Gaudi, one card
    python finetune_clm.py ... --device hpu --use_habana --use_lazy_mode

Flags can also come from a YAML/JSON file: ``python finetune_clm.py sft.yaml``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from rlhf.arguments import parse_stage_args, public_dict
from rlhf.data import DataArguments, prepare_examples, load_splits, resolve_template
from rlhf.distributed import exit_job, setup_distributed_env
from rlhf.errors import UserError, run_cli
from rlhf.modeling import (
    LoraArguments,
    ModelArguments,
    check_model_path,
    count_parameters,
    load_causal_lm,
    load_model_tokenizer,
    lora_config,
)
from rlhf.sft_data import PackedCollator, pack_examples, tokenize_example
from rlhf.training import (
    RunArguments,
    check_output_dir,
    check_training_args,
    evaluate_and_save,
    reliable_trainer_class,
    resolve_trainer_resume,
    setup_logging,
    train_and_save,
    trainer_run_finished,
)
from rlhf.zero import prepare_deepspeed

logger = logging.getLogger("rlhf")


@dataclass
class FinetuneArguments:
    max_seq_length: int = field(default=512, metadata={"help": "Longest tokenized example (prompt + answer)."})
    max_source_length: int | None = field(
        default=None, metadata={"help": "Longest prompt (default 3/4 of --max_seq_length); longer keep their end."}
    )
    train_on_inputs: bool = field(default=False, metadata={"help": "Also compute the loss on prompt tokens."})
    dataset_concatenation: bool = field(
        default=False, metadata={"help": "Pack examples into full --max_seq_length blocks (documents kept apart)."}
    )

    def check(self) -> None:
        if self.max_source_length is None and self.max_seq_length > 0:
            self.max_source_length = max(1, self.max_seq_length * 3 // 4)
        if self.max_seq_length <= 0 or self.max_source_length <= 0:
            raise UserError("--max_seq_length and --max_source_length must be positive")
        if self.max_source_length >= self.max_seq_length:
            raise UserError(
                f"--max_source_length {self.max_source_length} leaves no room for the answer within "
                f"--max_seq_length {self.max_seq_length}; make it smaller"
            )


def tokenize_split(dataset, tokenizer, args: FinetuneArguments, workers: int | None):
    def tokenize(row: dict) -> dict:
        return tokenize_example(
            row["prompt"], row["chosen"], tokenizer, args.max_seq_length, args.max_source_length,
            args.train_on_inputs,
        )

    tokenized = dataset.map(tokenize, remove_columns=dataset.column_names, num_proc=workers, desc="Tokenizing")
    if args.dataset_concatenation:
        from datasets import Dataset

        tokenized = Dataset.from_list(pack_examples(list(tokenized), args.max_seq_length))
    return tokenized


def main() -> None:
    dist = setup_distributed_env(supports_deepspeed=True)  # DeepSpeed: rlhf.zero.prepare_deepspeed below
    parsed = parse_stage_args(
        (ModelArguments, DataArguments, FinetuneArguments, LoraArguments, RunArguments), True, sys.argv[1:]
    )
    model_args, data_args, ft_args, lora_args, run_args, training_args = parsed.values
    backend = parsed.backend
    setup_logging(training_args)
    data_args.check()
    ft_args.check()
    lora_args.check()
    check_training_args(training_args)
    backend.check_training_precision(training_args)  # --bf16 without bf16 units, --fp16 on CPU
    prepare_deepspeed(training_args)  # before from_pretrained: ZeRO-3 partitions the model as it loads
    model_path = check_model_path(model_args.model_name_or_path, "--model_name_or_path")
    lora_args.check_targets(model_path, model_args.trust_remote_code)
    resume = resolve_trainer_resume(training_args)
    check_output_dir(training_args.output_dir, run_args.overwrite_output_dir, resume is not None)
    if not (training_args.do_train or training_args.do_eval):
        raise UserError("nothing to do; pass --do_train and/or --do_eval")
    logger.info("Backend: %s (rank %d of %d)", backend.device, dist.rank, dist.world_size)
    logger.info("Arguments: %s", {**public_dict(model_args), **public_dict(data_args), **public_dict(ft_args)})

    tokenizer = load_model_tokenizer(model_args, model_path)
    train_raw, eval_raw, train_source, eval_source = load_splits(data_args, seed=training_args.seed)
    template = resolve_template(data_args.prompt_template, tokenizer)
    with training_args.main_process_first(desc="preprocessing"):
        train_text, fmt = prepare_examples(train_raw, train_source, tokenizer, template, allow_sft=True)
        train_set = tokenize_split(train_text, tokenizer, ft_args, data_args.preprocessing_num_workers)
        eval_set = None
        if eval_raw is not None:
            eval_text, _ = prepare_examples(eval_raw, eval_source, tokenizer, template, allow_sft=True)
            eval_set = tokenize_split(eval_text, tokenizer, ft_args, data_args.preprocessing_num_workers)
    logger.info("Data: %s format, %d training %s", fmt, len(train_set), "blocks" if ft_args.dataset_concatenation else "examples")

    from transformers import set_seed

    set_seed(training_args.seed)  # the LoRA initialisation: the same adapter for the same --seed (and on resume)
    model = load_causal_lm(
        model_path, dtype=backend.trainer_model_dtype(training_args),
        trust_remote_code=model_args.trust_remote_code, cache_dir=model_args.cache_dir,
        revision=model_args.model_revision, low_cpu_mem_usage=model_args.low_cpu_mem_usage,
    )
    model.config.use_cache = False  # training needs no KV cache, and packing is only separated without one
    if lora_args.peft == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(lora_args, "CAUSAL_LM"))
    trainable, total = count_parameters(model)
    logger.info("Parameters: %d trainable of %d (%.2f%%)", trainable, total, 100 * trainable / total)

    if ft_args.dataset_concatenation:
        collator = PackedCollator(tokenizer.pad_token_id, pad_to=ft_args.max_seq_length if backend.is_gaudi else None)
    else:
        from transformers import DataCollatorForSeq2Seq

        collator = DataCollatorForSeq2Seq(
            tokenizer, padding="max_length" if backend.is_gaudi else True,
            max_length=ft_args.max_seq_length if backend.is_gaudi else None, label_pad_token_id=-100,
        )
    trainer = reliable_trainer_class(parsed.trainer_class)(
        model=model, args=training_args, train_dataset=train_set if training_args.do_train else None,
        eval_dataset=eval_set, data_collator=collator, processing_class=tokenizer,
        **backend.trainer_kwargs(training_args),
        skip_nonfinite_batches=run_args.skip_nonfinite_batches,
    )
    if training_args.do_train and trainer_run_finished(trainer, resume):
        return  # resumed at the end of a finished run: change nothing
    if training_args.do_train:
        train_and_save(trainer, training_args, resume, len(train_set), tokenizer)
    if training_args.do_eval or (eval_set is not None and training_args.do_train):
        if eval_set is None:
            raise UserError("--do_eval needs held-out data; pass --validation_file or --validation_split_percentage")
        evaluate_and_save(trainer, len(eval_set), with_perplexity=True)


if __name__ == "__main__":
    exit_job(run_cli(main))
