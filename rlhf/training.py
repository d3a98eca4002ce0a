"""What the Trainer-based stages (SFT, reward model) share around `trainer.train()`.

Output-dir safety, resume resolution, logging setup, and the train / save / metrics / plot
sequence, so `finetune_clm.py` and `reward_modeling.py` stay linear and say the same things.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.errors import UserError
from rlhf.plotting import plot_trainer_history

logger = logging.getLogger("rlhf")


@dataclass
class RunArguments:
    """Run-level flags transformers 5 dropped from TrainingArguments but our users still pass."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output_dir that already holds a run."}
    )


def setup_logging(training_args) -> None:
    level = training_args.get_process_log_level()
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)]
    )
    import datasets
    import transformers

    for log in (logger, transformers.utils.logging.get_logger(), datasets.utils.logging.get_logger()):
        log.setLevel(level)
    logger.setLevel(min(level, logging.INFO) if training_args.should_log else level)


def resolve_resume(training_args) -> str | None:
    """`--resume_from_checkpoint` as a path; `true` means the newest complete checkpoint in output_dir."""
    from transformers.trainer_utils import get_last_checkpoint

    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", "none", ""):
        return None
    if str(value).lower() == "true":
        output_dir = Path(training_args.output_dir)
        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if last is None:
            raise UserError(
                f"--resume_from_checkpoint true but {output_dir} has no checkpoint-* folder; drop the flag to start fresh"
            )
        return last
    if not Path(value).is_dir():
        raise UserError(f"--resume_from_checkpoint {value}: no such checkpoint directory; check the path")
    return str(value)


def check_output_dir(output_dir: str, overwrite: bool, resuming: bool) -> None:
    """Refuse to mix a new run into a directory that holds another one."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--output_dir {output_dir} is a file; give a directory path")
    if resuming or overwrite or not path.is_dir() or not any(path.iterdir()):
        return
    raise UserError(
        f"--output_dir {output_dir} already holds files; pass --overwrite_output_dir to write over them "
        "or --resume_from_checkpoint true to continue that run"
    )


def train_and_save(trainer, training_args, resume: str | None, num_train_samples: int, tokenizer) -> dict:
    """Train, then save model, tokenizer, metrics, trainer state and training curves (rank 0 writes)."""
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    metrics = dict(result.metrics)
    metrics["train_samples"] = num_train_samples
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)
        plot = plot_trainer_history(trainer.state.log_history, training_args.output_dir, extra_keys=("eval_accuracy",))
        if plot:
            logger.info("Training curves: %s", plot)
    return metrics


def evaluate_and_save(trainer, num_eval_samples: int, with_perplexity: bool) -> dict:
    metrics = trainer.evaluate()
    metrics["eval_samples"] = num_eval_samples
    if with_perplexity and "eval_loss" in metrics:
        metrics["perplexity"] = math.exp(metrics["eval_loss"]) if metrics["eval_loss"] < 700 else float("inf")
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    return metrics
