"""What the Trainer-based stages (SFT, reward model) share around `trainer.train()`.

Output-dir safety, resume resolution, logging setup, the train / save / metrics / plot sequence,
and the reliability layer every stage's trainer class gets through ``reliable_trainer_class``:

- checkpoints are complete or detectably incomplete: ``checkpoint-<step>/COMPLETE`` is written
  after everything else, and older checkpoints are only rotated away once the new one is complete;
  ``--resume_from_checkpoint true`` takes the newest complete one (``rlhf.checkpoint``);
- SIGTERM / SIGINT finish the current step, write a checkpoint and stop; ``train_and_save`` then
  raises ``Interrupted`` (exit 128 + signal) instead of saving the model as if training finished;
- resuming a run that already finished (its checkpoint at the planned last step, its final outputs
  written) changes nothing: one "Run already finished at step N" line, exit 0 (``trainer_run_finished``);
  a run stopped after its last checkpoint but before the final save saves that checkpoint's model
  without training a step more;
- a non-finite training loss stops the run (``TrainingDiverged``, exit 3) naming the step, or with
  ``--skip_nonfinite_batches`` drops that batch's gradients; a checkpoint is never written from
  non-finite weights, so the last one on disk is a good one.

``finetune_clm.py`` and ``reward_modeling.py`` stay linear and say the same things.

Stage-agnostic pieces (no TrainingArguments needed, for the PPO loop as well): ``resolve_resume(value,
output_dir, required=(), flag=...)``, ``check_output_dir(output_dir, overwrite, resuming)``,
``already_finished(resumed_step, total_steps)`` and ``StopOnSignal`` (``install``/``restore`` or
``with``, then read ``signal_number``).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

from rlhf.checkpoint import (
    COMPLETE_MARKER,
    checkpoint_problem,
    checkpoint_step,
    is_complete,
    latest_checkpoint,
    mark_complete,
    prune_checkpoints,
)
from rlhf.errors import Interrupted, TrainingDiverged, UserError
from rlhf.plotting import plot_trainer_history

logger = logging.getLogger("rlhf")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
TRAINER_STATE_FILE = "trainer_state.json"  # in each Trainer checkpoint
FINAL_RESULTS_FILE = "train_results.json"  # in output_dir, written once the final model is saved


@dataclass
class RunArguments:
    """Run-level flags transformers 5 dropped from TrainingArguments, and our reliability options."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output_dir that already holds a run."}
    )
    skip_nonfinite_batches: bool = field(
        default=False,
        metadata={"help": "Skip a batch whose loss is NaN/inf (its gradients are dropped) instead of stopping."},
    )


def prepare_pair_training_args(training_args) -> None:
    """What the preference-pair stages (reward model, DPO) need of TrainingArguments, whatever was passed."""
    if training_args.remove_unused_columns:
        logger.info("Setting remove_unused_columns=False: the pair collator needs the chosen/rejected columns")
        training_args.remove_unused_columns = False
    if not training_args.label_names:
        training_args.label_names = []  # no label column: the pairwise losses need none


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


def check_training_args(training_args) -> None:
    """Flag values TrainingArguments accepts silently but that cannot train."""
    if not training_args.learning_rate >= 0 or not math.isfinite(training_args.learning_rate):
        raise UserError(f"--learning_rate {training_args.learning_rate} must be a finite number >= 0; pass e.g. 1e-4")
    if training_args.weight_decay < 0:
        raise UserError(f"--weight_decay {training_args.weight_decay} must be >= 0")
    if training_args.max_grad_norm is not None and training_args.max_grad_norm < 0:
        raise UserError(f"--max_grad_norm {training_args.max_grad_norm} must be >= 0 (0 turns clipping off)")


def resume_requested(value) -> bool:
    """Whether a ``--resume_from_checkpoint`` value asks for a resume (unset/false/none/"" do not)."""
    return value is not None and value is not False and str(value).lower() not in ("false", "none", "")


def resolve_resume(
    value, output_dir: str | Path, *, required: Sequence[str] | Callable[[Path], Sequence[str]] = (),
    flag: str = "--resume_from_checkpoint",
) -> Path | None:
    """The checkpoint a ``--resume_from_checkpoint`` value names, for any stage; None when it is off.

    ``true`` takes the newest complete ``checkpoint-*`` in ``output_dir`` (incomplete ones are skipped
    with a warning); a path must be a complete checkpoint (``COMPLETE`` marker). Either way the
    checkpoint must hold every file in ``required`` (e.g. the PPO state file; a function of the
    checkpoint gives them per checkpoint) and none of its files may be damaged
    (``rlhf.checkpoint.checkpoint_problem``): a damaged one is refused, naming the newest intact one
    before it, so a run never continues with a fresh optimizer or without its state. Anything else
    is a ``UserError`` naming the fix."""
    if not resume_requested(value):
        return None
    if value is True or str(value).lower() == "true":
        path = latest_checkpoint(output_dir)
        if path is None:
            raise UserError(
                f"{flag} true but {output_dir} has no complete checkpoint-* folder; drop the flag to start fresh"
            )
    else:
        path = Path(value)
        if not path.is_dir():
            raise UserError(f"{flag} {value}: no such checkpoint directory; check the path")
        if not is_complete(path):
            raise UserError(
                f"{flag} {value}: checkpoint is incomplete (no {COMPLETE_MARKER} marker; the run "
                f"stopped while saving it); pass an earlier checkpoint or {flag} true"
            )
    problem = checkpoint_problem(path, tuple(required(path) if callable(required) else required))
    if problem is not None:
        raise UserError(f"{flag}: checkpoint {path} is damaged or not this stage's ({problem}), so a resume from it "
                        f"would lose state; {intact_alternative(path, required, flag)}")
    logger.info("Resuming from %s", path)
    return path


def intact_alternative(damaged: Path, required, flag: str) -> str:
    """How to go on past a damaged checkpoint: the newest intact one before it, or a fresh start."""
    try:
        step = checkpoint_step(damaged)
    except ValueError:
        step = None
    candidate = latest_checkpoint(damaged.parent, before=step, quiet=True) if step is not None else None
    while candidate is not None:
        if checkpoint_problem(candidate, tuple(required(candidate) if callable(required) else required)) is None:
            return (f"move it out of the way to resume from {candidate} (the newest intact one) with {flag} true, "
                    f"or pass {flag} {candidate}")
        candidate = latest_checkpoint(damaged.parent, before=checkpoint_step(candidate), quiet=True)
    return "restore it from a backup, or start afresh without the flag in a new --output_dir"


def trainer_resume_files(checkpoint: Path) -> tuple[str, ...]:
    """What a Trainer resume reads besides the weights: its state, the optimizer and the LR schedule
    (a DeepSpeed checkpoint keeps both in the engine's folder that its ``latest`` file names)."""
    latest = checkpoint / "latest"
    if latest.is_file():
        return (TRAINER_STATE_FILE, latest.read_text().strip())
    return (TRAINER_STATE_FILE, "optimizer.pt", "scheduler.pt")


def resolve_trainer_resume(training_args) -> str | None:
    """``resolve_resume`` for the Trainer stages: from TrainingArguments, as the str ``trainer.train`` takes."""
    found = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir,
                           required=trainer_resume_files)
    return str(found) if found is not None else None


def already_finished(resumed_step: int | None, total_steps: int) -> bool:
    """True (and says so in one line) when the resumed checkpoint is at or past the run's last step.

    Any stage: the caller then exits 0 without training, saving or evaluating."""
    if resumed_step is None or resumed_step < total_steps:
        return False
    logger.info("Run already finished at step %d (of %d planned); nothing to do", resumed_step, total_steps)
    return True


def checkpoint_global_step(checkpoint: str | Path) -> int | None:
    """``global_step`` recorded in a Trainer checkpoint's ``trainer_state.json`` (None if unreadable)."""
    import json

    path = Path(checkpoint) / TRAINER_STATE_FILE
    try:
        return int(json.loads(path.read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def planned_trainer_steps(trainer) -> int:
    """The optimizer steps ``trainer.train()`` runs in total under the current flags, computed as the
    Trainer does: ``--max_steps`` if set, else epochs x ceil(batches per epoch / accumulation)."""
    args = trainer.args
    if args.max_steps > 0:
        return int(args.max_steps)
    batches = len(trainer.get_train_dataloader())
    per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def trainer_run_finished(trainer, resume: str | None) -> bool:
    """A Trainer stage resumed from a checkpoint at the run's last step whose final outputs are written
    (``train_results.json``, saved after the model): True after logging "run already finished"."""
    if resume is None:
        return False
    if not (Path(trainer.args.output_dir) / FINAL_RESULTS_FILE).is_file():
        return False  # stopped before the final save: let training finish the run
    return already_finished(checkpoint_global_step(resume), planned_trainer_steps(trainer))


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


# ---------------------------------------------------------------- signals


class StopOnSignal:
    """On SIGTERM/SIGINT: remember the signal so the current step can finish, a checkpoint be written
    and the run stop. A second signal while waiting stops at once with the default action.

    Any stage's loop: ``install()`` (or ``with StopOnSignal() as stop:``), check ``stop.signal_number``
    (None until a signal came) after each step, ``restore()`` the previous handlers at the end.
    As a Trainer callback (``make_stop_callback``, which subclasses ``TrainerCallback`` lazily so this
    module imports without transformers) it installs at ``on_train_begin``, sets ``should_save`` and
    ``should_training_stop`` at the next step end and restores at ``on_train_end``.
    """

    def __init__(self):
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, number, _frame) -> None:
        if self.signal_number is not None:  # second signal: stop now, as the user asked twice
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            return
        self.signal_number = number
        logger.warning("Received %s: finishing this step, then writing a checkpoint", signal.Signals(number).name)

    def install(self) -> None:
        if self._previous:
            return
        for number in STOP_SIGNALS:
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread: leave the defaults
                self._previous.pop(number, None)

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def __enter__(self) -> "StopOnSignal":
        self.install()
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()

    # TrainerCallback hooks
    def on_train_begin(self, args, state, control, **kwargs):
        self.install()

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal_number is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()


def make_stop_callback() -> StopOnSignal:
    from transformers import TrainerCallback

    class StopOnSignalCallback(StopOnSignal, TrainerCallback):
        pass

    return StopOnSignalCallback()


# ---------------------------------------------------------------- the trainer mixin


class ReliableTrainerMixin:
    """Atomic-by-marker checkpoints, stop-on-signal and non-finite loss handling for any Trainer class."""

    def __init__(self, *args, skip_nonfinite_batches: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_nonfinite_batches = skip_nonfinite_batches
        self.skipped_nonfinite_batches = 0
        self.stop_callback = make_stop_callback()
        self.add_callback(self.stop_callback)

    def training_step(self, model, inputs, *args, **kwargs):
        import torch

        loss = super().training_step(model, inputs, *args, **kwargs)
        if bool(torch.isfinite(loss).all()):
            return loss
        step = self.state.global_step + 1
        if not self.skip_nonfinite_batches:
            raise TrainingDiverged(
                f"training loss is {loss.item()} at step {step} (epoch {self.state.epoch or 0:.2f}); the last "
                "complete checkpoint is intact - resume from it with a lower --learning_rate, or pass "
                "--skip_nonfinite_batches to skip such batches"
            )
        model.zero_grad(set_to_none=True)  # no gradient, so the optimizer leaves every weight as it is
        self.skipped_nonfinite_batches += 1
        logger.warning("Skipping a batch at step %d: training loss is %s (%d skipped so far)", step, loss.item(),
                       self.skipped_nonfinite_batches)
        # With logging_nan_inf_filter (the default) the Trainer logs the running mean in its place.
        return loss.detach() if self.args.logging_nan_inf_filter else torch.zeros_like(loss)

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        step = self.state.global_step
        from rlhf.zero import nonfinite_parameter

        bad = nonfinite_parameter(self.model)  # every rank: under ZeRO-3 each checks its partitions
        if bad is not None:
            raise TrainingDiverged(
                f"weight {bad} is not finite at step {step}, so no checkpoint was written; the last complete "
                "checkpoint is intact - resume from it with a lower --learning_rate"
            )
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"checkpoint-{step}"
        if self.args.should_save and (folder / COMPLETE_MARKER).exists():
            (folder / COMPLETE_MARKER).unlink()  # overwritten in place: incomplete until saved again
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # the base class must not rotate before this one is complete
        try:
            super()._save_checkpoint(model, trial, *args, **kwargs)
        finally:
            self.args.save_total_limit = limit
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()  # every rank's files (rng states, shards) are written
        if self.args.should_save:
            mark_complete(folder)
            best = self.state.best_model_checkpoint
            prune_checkpoints(run_dir, limit, protect=(best,) if best else ())

    def _save(self, output_dir=None, state_dict=None, *args, **kwargs):
        """Every model write (final and checkpoints) goes through here: the writing rank refuses ZeRO-3
        placeholders (other ranks may get here with no state dict, only to join collectives)."""
        from rlhf.zero import check_no_placeholders

        if self.args.should_save:
            check_no_placeholders(self.model.state_dict() if state_dict is None else state_dict,
                                  f"the model to {output_dir or self.args.output_dir}")
        return super()._save(output_dir, state_dict, *args, **kwargs)


def reliable_trainer_class(base_trainer_class: type) -> type:
    """``base_trainer_class`` (Trainer, GaudiTrainer or a subclass) with ``ReliableTrainerMixin`` in front.

    The class takes one more keyword argument, ``skip_nonfinite_batches``."""
    if issubclass(base_trainer_class, ReliableTrainerMixin):
        return base_trainer_class
    name = f"Reliable{base_trainer_class.__name__}"
    return type(name, (ReliableTrainerMixin, base_trainer_class), {"__qualname__": name})


# ---------------------------------------------------------------- train / evaluate


def train_and_save(trainer, training_args, resume: str | None, num_train_samples: int, tokenizer) -> dict:
    """Train, then save model, tokenizer, metrics, trainer state and training curves (rank 0 writes).

    Stopped by a signal: nothing is saved as final; raises ``Interrupted`` naming the checkpoint."""
    stop = getattr(trainer, "stop_callback", None)
    resumed_step = checkpoint_global_step(resume) if resume is not None else None
    if resumed_step is not None and resumed_step >= planned_trainer_steps(trainer):
        # Stopped after its last checkpoint but before the final save: training again would add a step.
        logger.info("Checkpoint %s is at the run's last step %d; saving the final model from it without training",
                    resume, resumed_step)
        metrics = load_finished_checkpoint(trainer, resume)
        result = SimpleNamespace(metrics=metrics)
    else:
        try:
            result = trainer.train(resume_from_checkpoint=resume)
        finally:
            if stop is not None:
                stop.restore()
    if stop is not None and stop.signal_number is not None:
        checkpoint = Path(training_args.output_dir) / f"checkpoint-{trainer.state.global_step}"
        raise Interrupted(
            f"checkpoint {checkpoint} written at step {trainer.state.global_step}; resume with the same command "
            "plus --resume_from_checkpoint",
            128 + stop.signal_number,
        )
    trainer.save_model()
    metrics = dict(result.metrics)
    metrics["train_samples"] = num_train_samples
    skipped = getattr(trainer, "skipped_nonfinite_batches", 0)
    if skipped:
        metrics["train_skipped_nonfinite_batches"] = skipped
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)
        plot = plot_trainer_history(trainer.state.log_history, training_args.output_dir, extra_keys=("eval_accuracy",))
        if plot:
            logger.info("Training curves: %s", plot)
    return metrics


def load_finished_checkpoint(trainer, checkpoint: str) -> dict:
    """Put a last-step checkpoint's weights and state into ``trainer`` (no training); returns the
    train metrics the run had logged (the final summary is only logged after the last checkpoint)."""
    from transformers.trainer_callback import TrainerState

    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_FILE))
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    metrics = {"epoch": trainer.state.epoch or 0.0}
    if losses:
        metrics["train_loss"] = sum(losses) / len(losses)
    return metrics


def evaluate_and_save(trainer, num_eval_samples: int, with_perplexity: bool) -> dict:
    metrics = trainer.evaluate()
    metrics["eval_samples"] = num_eval_samples
    if with_perplexity and "eval_loss" in metrics:
        metrics["perplexity"] = math.exp(metrics["eval_loss"]) if metrics["eval_loss"] < 700 else float("inf")
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    return metrics
