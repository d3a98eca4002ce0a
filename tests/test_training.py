"""rlhf/training.py: resume resolution, output-dir and flag checks, signal stop, and the reliable
Trainer mixin (COMPLETE marker, deferred rotation, non-finite loss) on a toy model in-process."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rlhf.checkpoint import COMPLETE_MARKER, is_complete, mark_complete
from rlhf.errors import Interrupted, TrainingDiverged, UserError
from rlhf.training import (
    ReliableTrainerMixin,
    StopOnSignal,
    already_finished,
    check_output_dir,
    check_training_args,
    planned_trainer_steps,
    reliable_trainer_class,
    resolve_resume,
    resolve_trainer_resume,
    train_and_save,
    trainer_run_finished,
)


def make_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    """A Trainer checkpoint with the files a resume reads (tiny but well-formed)."""
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    torch.save({"state": {}}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    if complete:
        mark_complete(folder)
    return folder


# ---------------------------------------------------------------- resume / output dir / flags


def resume_args(output_dir, value):
    return SimpleNamespace(output_dir=str(output_dir), resume_from_checkpoint=value)


def test_resolve_resume_off(tmp_path):
    for value in (None, False, "false", "False", "none", ""):
        assert resolve_resume(value, tmp_path) is None
        assert resolve_trainer_resume(resume_args(tmp_path, value)) is None


def test_resolve_resume_true_takes_newest_complete(tmp_path, caplog):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4, complete=False)  # killed while saving
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        assert resolve_resume("true", tmp_path) == tmp_path / "checkpoint-2"
    assert "checkpoint-4" in caplog.text and "incomplete" in caplog.text.lower()
    assert resolve_resume(True, str(tmp_path)) == tmp_path / "checkpoint-2"
    assert resolve_trainer_resume(resume_args(tmp_path, "True")) == str(tmp_path / "checkpoint-2")


def test_resolve_resume_true_without_checkpoint_is_user_error(tmp_path):
    make_checkpoint(tmp_path, 4, complete=False)
    with pytest.raises(UserError, match="no complete checkpoint"):
        resolve_resume("true", tmp_path)
    with pytest.raises(UserError):
        resolve_trainer_resume(resume_args(tmp_path / "missing", "True"))
    with pytest.raises(UserError, match="^--resume true but"):
        resolve_resume("true", tmp_path / "missing", flag="--resume")  # the stage's own flag name


def test_resolve_resume_explicit_paths(tmp_path):
    good = make_checkpoint(tmp_path, 2)
    bad = make_checkpoint(tmp_path, 4, complete=False)
    assert resolve_resume(str(good), tmp_path) == good
    assert resolve_trainer_resume(resume_args(tmp_path, str(good))) == str(good)
    with pytest.raises(UserError, match="incomplete"):
        resolve_resume(str(bad), tmp_path)
    with pytest.raises(UserError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-9"), tmp_path)
    with pytest.raises(UserError, match=r"not this stage's \(has no ppo_state.pt\)"):
        resolve_resume(str(good), tmp_path, required=("ppo_state.pt",))
    torch.save({"step": 2}, good / "ppo_state.pt")
    assert resolve_resume(str(good), tmp_path, required=("ppo_state.pt",)) == good


def test_already_finished_says_so_once(caplog):
    with caplog.at_level(logging.INFO, logger="rlhf"):
        assert not already_finished(None, 10)
        assert not already_finished(9, 10)
        assert not caplog.text
        assert already_finished(10, 10) and already_finished(12, 10)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "Run already finished at step 10 (of 10 planned); nothing to do"
    assert len(lines) == 2


def test_check_output_dir(tmp_path):
    check_output_dir(str(tmp_path / "new"), overwrite=False, resuming=False)  # missing: fine
    (tmp_path / "empty").mkdir()
    check_output_dir(str(tmp_path / "empty"), overwrite=False, resuming=False)
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--overwrite_output_dir"):
        check_output_dir(str(used), overwrite=False, resuming=False)
    check_output_dir(str(used), overwrite=True, resuming=False)
    check_output_dir(str(used), overwrite=False, resuming=True)
    assert (used / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="is a file"):
        check_output_dir(str(used / "notes.txt"), overwrite=True, resuming=False)


@pytest.mark.parametrize(
    "field, value", [("learning_rate", -1e-4), ("learning_rate", float("nan")), ("weight_decay", -0.1), ("max_grad_norm", -1.0)]
)
def test_check_training_args_rejects_out_of_range(field, value):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    check_training_args(args)
    setattr(args, field, value)  # TrainingArguments itself accepts these silently
    with pytest.raises(UserError, match=field):
        check_training_args(args)


# ---------------------------------------------------------------- signals


def test_stop_on_signal_sets_save_and_stop_and_restores_handlers():
    previous = signal.getsignal(signal.SIGTERM)
    stop = StopOnSignal()
    stop.install()
    try:
        control = SimpleNamespace(should_save=False, should_training_stop=False)
        stop.on_step_end(None, None, control)
        assert not control.should_save
        os.kill(os.getpid(), signal.SIGTERM)  # handled: the test process survives
        assert stop.signal_number == signal.SIGTERM
        stop.on_step_end(None, None, control)
        assert control.should_save and control.should_training_stop
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) == previous


def test_stop_on_signal_outside_a_trainer_and_second_signal_kills(tmp_path):
    """A plain loop (PPO) uses install/restore or ``with``; a second signal ends the process with the
    default action (killed by SIGTERM, not a Python exception)."""
    previous = signal.getsignal(signal.SIGINT)
    with StopOnSignal() as stop:
        assert stop.signal_number is None
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal_number == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) == previous
    script = (
        "import os, signal\n"
        "from rlhf.training import StopOnSignal\n"
        "stop = StopOnSignal(); stop.install()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('first', stop.signal_number, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('survived', flush=True)\n"
    )
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGTERM, result.stderr
    assert result.stdout.split() == ["first", str(int(signal.SIGTERM))]
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- the mixin on a toy Trainer run


class Toy(nn.Module):
    """y = w.x, squared error; returns NaN loss on the forward calls listed in ``nan_calls`` (1-based)."""

    def __init__(self, nan_calls=()):
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.nan_calls = set(nan_calls)
        self.calls = 0

    def forward(self, x, labels):
        self.calls += 1
        loss = ((self.linear(x).squeeze(-1) - labels) ** 2).mean()
        if self.calls in self.nan_calls:
            loss = loss * float("nan")
        return {"loss": loss}


def toy_data(n=16):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=generator)
    return [{"x": x[i], "labels": x[i].sum()} for i in range(n)]


def toy_trainer(tmp_path, nan_calls=(), skip=False, **overrides):
    from transformers import Trainer, TrainingArguments

    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4, save_steps=1,
        learning_rate=0.1, report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0,
    )
    settings.update(overrides)
    torch.manual_seed(0)
    cls = reliable_trainer_class(Trainer)
    return cls(model=Toy(nan_calls), args=TrainingArguments(**settings), train_dataset=toy_data(),
               skip_nonfinite_batches=skip)


def toy_weights(folder: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))["linear.weight"]


def test_reliable_trainer_class_wraps_once():
    from transformers import Trainer

    cls = reliable_trainer_class(Trainer)
    assert issubclass(cls, ReliableTrainerMixin) and issubclass(cls, Trainer)
    assert reliable_trainer_class(cls) is cls
    assert cls.__name__ == "ReliableTrainer"


def test_checkpoints_get_marker_and_rotation_waits_for_it(tmp_path, monkeypatch):
    from transformers import Trainer

    seen = []
    original = Trainer._save_checkpoint

    def spy(self, model, trial):  # the base class's save: the previous checkpoint must still be there
        out = Path(self.args.output_dir)
        seen.append(sorted(p.name for p in out.glob("checkpoint-*")))
        assert self.args.save_total_limit is None  # rotation inside the base save is off
        original(self, model, trial)
        assert not is_complete(out / f"checkpoint-{self.state.global_step}")  # marker comes after

    monkeypatch.setattr(Trainer, "_save_checkpoint", spy)
    trainer = toy_trainer(tmp_path, save_total_limit=1)
    trainer.train()
    out = tmp_path / "out"
    assert seen == [[], ["checkpoint-1"], ["checkpoint-2"], ["checkpoint-3"]]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    assert (out / "checkpoint-4" / COMPLETE_MARKER).is_file()
    assert trainer.args.save_total_limit == 1


def test_resave_over_existing_checkpoint_clears_stale_marker(tmp_path, monkeypatch):
    from transformers import Trainer

    stale = make_checkpoint(tmp_path / "out", 1)  # e.g. a previous run written over
    markers = []
    original = Trainer._save_checkpoint

    def spy(self, model, trial):
        markers.append((stale / COMPLETE_MARKER).exists())
        original(self, model, trial)

    monkeypatch.setattr(Trainer, "_save_checkpoint", spy)
    toy_trainer(tmp_path, max_steps=1).train()
    assert markers == [False] and is_complete(stale)


def test_nonfinite_loss_raises_naming_step_and_keeps_last_checkpoint(tmp_path):
    trainer = toy_trainer(tmp_path, nan_calls={3})
    with pytest.raises(TrainingDiverged, match=r"training loss is nan at step 3.*--skip_nonfinite_batches"):
        trainer.train()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert is_complete(out / "checkpoint-2") and torch.isfinite(toy_weights(out / "checkpoint-2")).all()


def test_skip_nonfinite_batches_leaves_weights_untouched_for_that_step(tmp_path):
    trainer = toy_trainer(tmp_path, nan_calls={3}, skip=True)
    trainer.train()
    out = tmp_path / "out"
    assert trainer.state.global_step == 4 and trainer.skipped_nonfinite_batches == 1
    assert torch.equal(toy_weights(out / "checkpoint-2"), toy_weights(out / "checkpoint-3"))  # no update at step 3
    assert not torch.equal(toy_weights(out / "checkpoint-3"), toy_weights(out / "checkpoint-4"))  # training went on
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 4 and all(v == v for v in losses)  # no NaN in the logs


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    trainer = toy_trainer(tmp_path, max_steps=2)
    trainer.train()
    with torch.no_grad():
        trainer.model.linear.weight[0, 0] = float("inf")
    trainer.state.global_step = 3
    with pytest.raises(TrainingDiverged, match="linear.weight is not finite at step 3"):
        trainer._save_checkpoint(trainer.model, None)
    assert not (tmp_path / "out" / "checkpoint-3").exists()


def test_train_and_save_after_signal_raises_interrupted_without_final_save(tmp_path):
    trainer = toy_trainer(tmp_path, max_steps=50, save_steps=1000)

    class SignalAtStep2:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    from transformers import TrainerCallback

    trainer.add_callback(type("SignalAtStep2", (SignalAtStep2, TrainerCallback), {})())
    # our StopOnSignal callback runs before the one above at step 2, so it stops at the end of step 3
    tokenizer = SimpleNamespace(save_pretrained=lambda *_: pytest.fail("the tokenizer must not be saved"))
    with pytest.raises(Interrupted) as caught:
        train_and_save(trainer, trainer.args, None, 16, tokenizer)
    out = tmp_path / "out"
    assert caught.value.exit_code == 128 + signal.SIGTERM
    assert f"checkpoint {out / 'checkpoint-3'} written at step 3" in str(caught.value)
    assert "--resume_from_checkpoint" in str(caught.value)
    assert is_complete(out / "checkpoint-3")
    assert not (out / "model.safetensors").exists() and not (out / "train_results.json").exists()
    assert signal.getsignal(signal.SIGTERM) is not trainer.stop_callback._handle  # handlers restored
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3


# ---------------------------------------------------------------- resuming a finished run


def test_planned_trainer_steps_follows_max_steps_or_epochs(tmp_path):
    assert planned_trainer_steps(toy_trainer(tmp_path, max_steps=7)) == 7
    # 16 rows / batch 4 = 4 batches; accumulation 3 -> 2 updates per epoch; 1.5 epochs -> 3
    trainer = toy_trainer(tmp_path, max_steps=-1, num_train_epochs=1.5, gradient_accumulation_steps=3)
    assert planned_trainer_steps(trainer) == 3
    trainer.train()
    assert trainer.state.global_step == 3  # the Trainer agrees


def test_trainer_run_finished_needs_last_step_and_final_outputs(tmp_path, caplog):
    toy_trainer(tmp_path, max_steps=4, save_steps=2).train()
    out = tmp_path / "out"
    last, middle = str(out / "checkpoint-4"), str(out / "checkpoint-2")
    assert not trainer_run_finished(toy_trainer(tmp_path, max_steps=4), None)
    assert not trainer_run_finished(toy_trainer(tmp_path, max_steps=4), last)  # final save never happened
    (out / "train_results.json").write_text("{}")
    assert not trainer_run_finished(toy_trainer(tmp_path, max_steps=4), middle)
    assert not trainer_run_finished(toy_trainer(tmp_path, max_steps=6), last)  # a longer run continues
    with caplog.at_level(logging.INFO, logger="rlhf"):
        assert trainer_run_finished(toy_trainer(tmp_path, max_steps=4), last)
    assert "Run already finished at step 4 (of 4 planned); nothing to do" in caplog.text


def test_train_and_save_from_last_checkpoint_saves_without_training(tmp_path):
    """Stopped after the last checkpoint, before the final save: resuming saves that checkpoint's model
    and trains no step more (before, the Trainer ran step max_steps + 1)."""
    toy_trainer(tmp_path, max_steps=4, save_steps=2).train()
    out = tmp_path / "out"
    trainer = toy_trainer(tmp_path, max_steps=4, save_steps=2)
    tokenizer = SimpleNamespace(save_pretrained=lambda *_: None)
    metrics = train_and_save(trainer, trainer.args, str(out / "checkpoint-4"), 16, tokenizer)
    assert trainer.state.global_step == 4 and trainer.model.calls == 0  # no forward pass at all
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert torch.equal(toy_weights(out), toy_weights(out / "checkpoint-4"))
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert metrics["train_samples"] == 16 and metrics["train_loss"] > 0


# ---------------------------------------------------------------- damaged checkpoints (issue 26)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage, fragment", [
    (lambda c: truncate(c / "trainer_state.json"), "trainer_state.json is not valid JSON"),
    (lambda c: (c / "optimizer.pt").unlink(), "has no optimizer.pt"),
    (lambda c: (c / "scheduler.pt").unlink(), "has no scheduler.pt"),
    (lambda c: truncate(c / "optimizer.pt"), "optimizer.pt is truncated"),
    (lambda c: (c / "trainer_state.json").write_text("{}"), "trainer_state.json has no global_step"),
])
def test_damaged_checkpoint_with_marker_is_refused_naming_the_intact_one(damage, fragment, tmp_path):
    """COMPLETE exists but a file a resume reads is missing or truncated: refused, never resumed with a fresh
    optimizer or a traceback; the message names the newest intact checkpoint before it."""
    intact = make_checkpoint(tmp_path, 2)
    damaged = make_checkpoint(tmp_path, 4)
    damage(damaged)
    before = {p.name: p.read_bytes() for p in damaged.iterdir()}
    for value in ("true", str(damaged)):
        with pytest.raises(UserError) as error:
            resolve_trainer_resume(resume_args(tmp_path, value))
        message = str(error.value)
        assert "\n" not in message and fragment in message and str(damaged) in message, message
        assert f"resume from {intact}" in message
    assert {p.name: p.read_bytes() for p in damaged.iterdir()} == before  # left as it was
    assert resolve_trainer_resume(resume_args(tmp_path, str(intact))) == str(intact)


def test_damaged_checkpoint_without_an_intact_one_says_how_to_go_on(tmp_path):
    damaged = make_checkpoint(tmp_path, 2)
    (damaged / "optimizer.pt").unlink()
    with pytest.raises(UserError, match="restore it from a backup, or start afresh"):
        resolve_trainer_resume(resume_args(tmp_path, "true"))


def test_truncated_ppo_state_is_refused(tmp_path):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    torch.save({"step": 3, "optimizer": {"state": {}}}, folder / "ppo_state.pt")
    mark_complete(folder)
    assert resolve_resume("true", tmp_path, required=("ppo_state.pt",)) == folder
    truncate(folder / "ppo_state.pt", 0.9)
    with pytest.raises(UserError, match="ppo_state.pt is truncated"):
        resolve_resume("true", tmp_path, required=("ppo_state.pt",))


def test_deepspeed_checkpoint_needs_its_engine_folder_not_optimizer_pt(tmp_path):
    from rlhf.training import trainer_resume_files

    folder = make_checkpoint(tmp_path, 2)
    (folder / "optimizer.pt").unlink()
    (folder / "scheduler.pt").unlink()
    (folder / "latest").write_text("global_step2")
    assert trainer_resume_files(folder) == ("trainer_state.json", "global_step2")
    with pytest.raises(UserError, match="has no global_step2"):
        resolve_trainer_resume(resume_args(tmp_path, "true"))
    (folder / "global_step2").mkdir()
    assert resolve_trainer_resume(resume_args(tmp_path, "true")) == str(folder)
