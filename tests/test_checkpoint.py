"""rlhf/checkpoint.py: atomic directories, the COMPLETE marker, newest-complete lookup, pruning, metrics log."""

from __future__ import annotations

import json
import logging

import pytest

from rlhf.checkpoint import (
    COMPLETE_MARKER,
    MetricsLog,
    atomic_directory,
    checkpoint_step,
    is_complete,
    latest_checkpoint,
    mark_complete,
    prune_checkpoints,
)


def make_checkpoint(root, step: int, complete: bool = True):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_text(str(step))
    if complete:
        mark_complete(folder)
    return folder


def test_atomic_directory_renames_into_place_with_marker(tmp_path):
    final = tmp_path / "checkpoint-3"
    with atomic_directory(final) as folder:
        assert folder != final and not final.exists()  # nothing visible under the final name while writing
        (folder / "a.txt").write_text("x")
    assert is_complete(final) and (final / "a.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]  # no temporary left behind


def test_atomic_directory_failure_keeps_previous_version(tmp_path):
    final = tmp_path / "checkpoint-3"
    with atomic_directory(final) as folder:
        (folder / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as folder:
            (folder / "a.txt").write_text("half")
            raise RuntimeError("killed while saving")
    assert (final / "a.txt").read_text() == "old" and is_complete(final)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]


def test_atomic_directory_replaces_existing(tmp_path):
    final = tmp_path / "checkpoint-1"
    for text in ("first", "second"):
        with atomic_directory(final) as folder:
            (folder / "a.txt").write_text(text)
    assert (final / "a.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


def test_latest_checkpoint_skips_incomplete_with_warning(tmp_path, caplog):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 10)  # numeric, not lexicographic, order
    make_checkpoint(tmp_path, 12, complete=False)
    (tmp_path / "checkpoint-notanumber").mkdir()
    (tmp_path / "notes.txt").write_text("user file")
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        found = latest_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoint-10"
    assert "checkpoint-12" in caplog.text and COMPLETE_MARKER in caplog.text


def test_latest_checkpoint_none(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    make_checkpoint(tmp_path, 1, complete=False)
    assert latest_checkpoint(tmp_path) is None


def test_checkpoint_step():
    assert checkpoint_step("/x/checkpoint-42") == 42
    with pytest.raises(ValueError):
        checkpoint_step("/x/checkpoint-final")


def test_prune_keeps_newest_complete_protected_and_incomplete(tmp_path):
    for step in (1, 2, 3, 4):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 5, complete=False)
    (tmp_path / "notes.txt").write_text("user file")
    prune_checkpoints(tmp_path, keep=2, protect=(str(tmp_path / "checkpoint-1"),))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-1", "checkpoint-3", "checkpoint-4", "checkpoint-5", "notes.txt",
    ]


def test_prune_without_limit_keeps_everything(tmp_path):
    for step in (1, 2):
        make_checkpoint(tmp_path, step)
    prune_checkpoints(tmp_path, keep=None)
    prune_checkpoints(tmp_path, keep=0)
    assert len(list(tmp_path.iterdir())) == 2


def test_metrics_log_resume_drops_rows_after_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in (1, 2, 3):
        log.append({"step": step, "loss": float(step), "bad": float("nan")})
    assert [r["step"] for r in log.rows()] == [1, 2, 3]
    assert json.loads(path.read_text().splitlines()[0])["bad"] == "nan"  # valid JSON, not NaN
    resumed = MetricsLog(path, resume_step=2)
    resumed.append({"step": 3, "loss": 30.0})
    assert [(r["step"], r["loss"]) for r in resumed.rows()] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    fresh = MetricsLog(path)  # a new run starts a new log
    assert fresh.rows() == []


# ---------------------------------------------------------------- file checks (issue 26)


def test_checkpoint_problem_finds_empty_truncated_and_missing_files(tmp_path):
    import torch
    from safetensors.torch import save_file

    from rlhf.checkpoint import checkpoint_problem

    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    torch.save({"a": torch.zeros(64)}, folder / "state.pt")
    save_file({"w": torch.zeros(64)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "README.md").write_text("")  # not a file a resume reads: its content is not checked
    assert checkpoint_problem(folder, ("state.pt",)) is None
    assert checkpoint_problem(folder, ("missing.pt",)) == "has no missing.pt"

    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[:-10])
    assert "model.safetensors is truncated" in checkpoint_problem(folder)
    (folder / "model.safetensors").write_bytes(weights[:5])
    assert "model.safetensors is truncated" in checkpoint_problem(folder)
    (folder / "model.safetensors").write_bytes(weights)

    state = (folder / "state.pt").read_bytes()
    (folder / "state.pt").write_bytes(state[: len(state) - 30])
    assert "state.pt is truncated" in checkpoint_problem(folder)
    (folder / "state.pt").write_bytes(b"")
    assert checkpoint_problem(folder) == "state.pt is empty"
    (folder / "state.pt").write_bytes(state)

    (folder / "config.json").write_text('{"a": ')
    assert checkpoint_problem(folder).startswith("config.json is not valid JSON")
