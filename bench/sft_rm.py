"""SFT, reward-model and DPO training benchmark worker (main ``.venv``): our pipeline vs trl 1.16's trainers.

    .venv/bin/python bench/sft_rm.py --task sft --impl ours --packing on  --workload W.json --out OUT.json
    .venv/bin/python bench/sft_rm.py --task sft --impl trl  --packing off --workload W.json --out OUT.json
    .venv/bin/python bench/sft_rm.py --task rm  --impl ours|trl --workload W.json --out OUT.json
    .venv/bin/python bench/sft_rm.py --task dpo --impl ours|trl --workload W.json --out OUT.json

Data: the demo preference data (variable length), prompts in the plain template, answer = ``chosen``.

- SFT ``ours``: ``finetune_clm.py``'s own pieces: ``tokenize_split`` (answer-only labels, EOS, optional
  ``--dataset_concatenation`` packing into ``max_length`` blocks with restarting position ids), its collators
  (``DataCollatorForSeq2Seq`` or ``PackedCollator``), transformers' ``Trainer``.
  SFT ``trl``: ``SFTTrainer`` on prompt/completion rows (completion-only loss), ``packing=True`` = its
  default ``bfd`` strategy (padding-free rows with position ids).
- RM ``ours``: ``reward_modeling.py``'s pieces (``tokenize_pairs``, ``RewardPairCollator``,
  ``make_reward_trainer_class(Trainer)``); ``trl``: ``RewardTrainer`` on prompt/chosen/rejected rows.
- DPO ``ours``: ``dpo_training.py``'s pieces (``tokenize_preferences`` with ``max_prompt_length`` = half the
  max length, ``DPOPairCollator``, ``make_dpo_trainer_class(Trainer)``, base-model dropout off, LoRA dropout
  kept); ``trl``: ``DPOTrainer`` on prompt/chosen/rejected rows (``disable_dropout=True``, its default).
  Both: sigmoid loss, ``dpo_beta``, reference = the policy with its LoRA adapter disabled (one extra
  forward without grad per batch), nothing precomputed. TRL computes the answers' log-probs through its
  ``fused_lm_head`` path, ours from the full logits (``rlhf.dpo.answer_logps``).

Equal settings: the same base model and LoRA (SFT and DPO r8/alpha16/dropout .05, RM r8/alpha32/dropout .1
on q/k/v/o, score head trained in full), batch size (pairs for RM and DPO), max length, learning rate, the
workload's precision (fp32, or bf16 autocast on fp32 weights as our scripts' --bf16), no gradient checkpointing,
no evaluation, logging or saving during the run. A step's time is the time between
two ``on_step_end`` callbacks (data loading included); tokens are counted by a forward pre-hook on the
model when gradients are on (real tokens = attention-mask sum, or all tokens for padding-free/packed rows;
DPO's reference forward is not counted). ``active_dropout`` in the result counts the dropout modules with
p > 0 in the trained model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (  # noqa: E402
    LORA_TARGETS, PLAIN_TEMPLATE, PeakMemory, count_params, demo_rows, is_bf16, load_workload, log, summarize_steps,
    write_result,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["sft", "rm", "dpo"], required=True)
    parser.add_argument("--impl", choices=["ours", "trl"], required=True)
    parser.add_argument("--packing", choices=["on", "off"], default="off")
    parser.add_argument("--workload", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    memory = PeakMemory()
    wl = load_workload(args.workload)

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    from rlhf.modeling import load_causal_lm, load_sequence_classifier, load_tokenizer

    batch, length = wl["sft_batch_size"], wl["sft_max_length"]
    total_steps = wl["sft_warmup"] + wl["sft_steps"]
    rows = demo_rows()
    prompts = [PLAIN_TEMPLATE.format(**r) for r in rows]
    tokenizer = load_tokenizer(wl["model_dir"])
    common_args = dict(
        output_dir=tempfile.mkdtemp(prefix="bench-sft-rm-"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, max_steps=total_steps, learning_rate=1e-4, bf16=is_bf16(wl), fp16=False,
        gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no",
        logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    seq_lora = dict(target_modules=LORA_TARGETS, bias="none")
    causal_lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM", **seq_lora)
    pairs = Dataset.from_list([{"prompt": p, "chosen": r["chosen"], "rejected": r["rejected"]}
                               for p, r in zip(prompts, rows)])
    units_per_step = batch  # pairs (RM, DPO); SFT counts tokens only

    if args.task == "sft":
        model = load_causal_lm(wl["model_dir"])
        lora = causal_lora
        if args.impl == "ours":
            from peft import get_peft_model
            from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

            from finetune_clm import FinetuneArguments, tokenize_split
            from rlhf.sft_data import PackedCollator

            ft = FinetuneArguments(max_seq_length=length, max_source_length=length * 3 // 4,
                                   dataset_concatenation=args.packing == "on")
            text = Dataset.from_list([{"prompt": p, "chosen": r["chosen"]} for p, r in zip(prompts, rows)])
            train_set = tokenize_split(text, tokenizer, ft, None)
            collator = PackedCollator(tokenizer.pad_token_id) if args.packing == "on" else \
                DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
            model = get_peft_model(model, lora)
            trainer = Trainer(model=model, args=TrainingArguments(**common_args, remove_unused_columns=False),
                              train_dataset=train_set, data_collator=collator, processing_class=tokenizer)
        else:
            from trl import SFTConfig, SFTTrainer

            data = Dataset.from_list([{"prompt": p, "completion": r["chosen"]} for p, r in zip(prompts, rows)])
            config = SFTConfig(**common_args, max_length=length, packing=args.packing == "on")
            trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                                 peft_config=lora)
        units_per_step = None
    elif args.task == "rm":
        model = load_sequence_classifier(wl["model_dir"], tokenizer)
        lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, task_type="SEQ_CLS", **seq_lora)
        if args.impl == "ours":
            from peft import get_peft_model
            from transformers import Trainer, TrainingArguments

            from rlhf.reward import RewardPairCollator, make_reward_trainer_class, tokenize_pairs
            from rlhf.training import prepare_pair_training_args

            train_set, _ = tokenize_pairs(pairs, tokenizer, length, "truncate", "demo")
            training_args = TrainingArguments(**common_args)
            prepare_pair_training_args(training_args)
            model = get_peft_model(model, lora)
            trainer = make_reward_trainer_class(Trainer)(
                model=model, args=training_args, train_dataset=train_set, data_collator=RewardPairCollator(tokenizer),
                processing_class=tokenizer,
            )
        else:
            from trl import RewardConfig, RewardTrainer

            config = RewardConfig(**common_args, max_length=length)
            trainer = RewardTrainer(model=model, args=config, train_dataset=pairs, processing_class=tokenizer,
                                    peft_config=lora)
    else:
        model = load_causal_lm(wl["model_dir"])
        model.config.use_cache = False
        if args.impl == "ours":
            from peft import get_peft_model
            from transformers import Trainer, TrainingArguments

            from rlhf.dpo import DPOPairCollator, disable_dropout, make_dpo_trainer_class, tokenize_preferences
            from rlhf.training import prepare_pair_training_args

            train_set, _ = tokenize_preferences(pairs, tokenizer, length, length // 2)
            training_args = TrainingArguments(**common_args)
            prepare_pair_training_args(training_args)
            disable_dropout(model)
            trainer = make_dpo_trainer_class(Trainer)(
                model=get_peft_model(model, causal_lora), args=training_args, train_dataset=train_set,
                data_collator=DPOPairCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                beta=wl["dpo_beta"], loss_type="sigmoid",
            )
        else:
            from trl import DPOConfig, DPOTrainer

            config = DPOConfig(**common_args, max_length=length, beta=wl["dpo_beta"], loss_type=["sigmoid"],
                               disable_dropout=True, precompute_ref_log_probs=False)
            trainer = DPOTrainer(model=model, args=config, train_dataset=pairs, processing_class=tokenizer,
                                 peft_config=causal_lora)

    n_params = count_params(trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    counts = {"tokens": 0, "padded": 0}

    def count_tokens(_module, a, kw):
        if not torch.is_grad_enabled():
            return
        ids = kw.get("input_ids", a[0] if a else None)
        mask = kw.get("attention_mask")
        counts["padded"] += ids.numel()
        counts["tokens"] += int(mask.sum()) if mask is not None else ids.numel()

    trainer.model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    marks, steps = [], []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **kw):
            marks.append(time.perf_counter())
            steps.append({"step_s": marks[-1] - marks[-2], "tokens": counts["tokens"],
                          "padded_tokens": counts["padded"]})
            counts.update(tokens=0, padded=0)

    trainer.add_callback(StepTimer())
    memory.reset()
    trainer.train()
    for i, s in enumerate(steps):
        log(f"{args.task} {args.impl} packing={args.packing} step {i}: {s['step_s']:.2f} s, {s['tokens']} tokens")
    write_result(args.out, {
        "framework": args.impl, "task": args.task, "packing": args.packing, "size": wl["size"],
        "precision": wl.get("precision", "fp32"),
        "n_params": n_params, "trainable_params": trainable, "units_per_step": units_per_step,
        "active_dropout": sum(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in trainer.model.modules()),
        "steps": steps, "median": summarize_steps(steps, wl["sft_warmup"]), "memory": memory.report(),
        "throughput": throughput(steps[wl["sft_warmup"]:], units_per_step),
    })


def throughput(measured: list[dict], units_per_step: int | None) -> dict:
    """Totals over the measured steps (variable-length batches: sum of tokens / sum of seconds)."""
    seconds = sum(s["step_s"] for s in measured)
    tokens = sum(s["tokens"] for s in measured)
    padded = sum(s["padded_tokens"] for s in measured)
    out = {"seconds": seconds, "tokens": tokens, "padded_tokens": padded, "tokens_per_s": tokens / seconds,
           "padding_fraction": 1 - tokens / padded if padded else 0.0}
    if units_per_step:
        out["units_per_s"] = units_per_step * len(measured) / seconds
    return out


if __name__ == "__main__":
    main()
