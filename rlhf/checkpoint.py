"""Atomic checkpoint directories and the per-step metrics log.

A checkpoint is complete only when its ``COMPLETE`` marker exists, written after everything else.
PPO writes into a temporary sibling directory renamed into place (``atomic_directory``; all ranks
write into it when each saves its own state); the
Trainer-based stages save in place and add the marker afterwards (``rlhf.training``). Either way a
kill during a save leaves the previous checkpoint intact (older ones are pruned only after the new
one is complete), and resume never picks a half-written one.

``checkpoint_problem`` is the one check every stage's resume makes before anything loads: the files
the stage needs are there and none of the checkpoint's files is empty, truncated or unparsable
(JSON parses, torch files have their zip directory, safetensors hold the bytes their header names).
A damaged checkpoint is refused (``rlhf.training.resolve_resume``), never resumed with a part missing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

logger = logging.getLogger("rlhf")

COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


@contextmanager
def atomic_directory(final: str | Path, *, is_main: bool = True, barrier=None) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``final`` in one rename.

    Several processes writing one checkpoint: every one enters with ``barrier`` (a function all of
    them call, e.g. ``accelerator.wait_for_everyone``); they share the temporary directory, which the
    ``is_main`` process creates, and it is completed and renamed once all have written their files."""
    final = Path(final)
    temporary = final.with_name(f".{final.name}.tmp" if barrier is not None else f".{final.name}.tmp-{os.getpid()}")
    if is_main:
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir(parents=True)
    if barrier is not None:
        barrier()
    try:
        yield temporary
        if barrier is not None:
            barrier()  # every process's files are written
        if is_main:
            mark_complete(temporary)
            if final.exists():
                retired = final.with_name(f".{final.name}.old-{os.getpid()}")
                final.rename(retired)
                temporary.rename(final)
                shutil.rmtree(retired)
            else:
                temporary.rename(final)
        if barrier is not None:
            barrier()  # nobody goes on (or reads the checkpoint) before it is in place
    except BaseException:
        if is_main:
            shutil.rmtree(temporary, ignore_errors=True)
        raise


def mark_complete(checkpoint: str | Path) -> None:
    """Write the ``COMPLETE`` marker (the checkpoint's other files must already be written)."""
    marker = Path(checkpoint) / COMPLETE_MARKER
    with marker.open("w") as handle:
        handle.write("ok\n")
        handle.flush()
        os.fsync(handle.fileno())


def is_complete(checkpoint: str | Path) -> bool:
    return (Path(checkpoint) / COMPLETE_MARKER).is_file()


TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def file_problem(path: Path) -> str | None:
    """Why a checkpoint file could not be read back (empty, truncated, not what its name says), or None.

    Cheap: a JSON file is parsed, a torch file's zip central directory (written last) is read, a
    safetensors file's header is read and its length checked against the data it names."""
    if path.suffix not in (".json", ".safetensors", *TORCH_SUFFIXES):
        return None  # README.md, the COMPLETE marker, tokenizer text files: nothing a resume parses
    size = path.stat().st_size
    if size == 0:
        return "is empty"
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            return f"is not valid JSON ({' '.join(str(error).split())})"
    elif path.suffix in TORCH_SUFFIXES:
        if not zipfile.is_zipfile(path):
            return "is truncated or not a torch.save file (no zip directory at its end)"
    elif path.suffix == ".safetensors":
        with path.open("rb") as handle:
            head = handle.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if length is None or length > size - 8:
                return "is truncated (its header is cut short)"
            try:
                header = json.loads(handle.read(length))
            except (UnicodeDecodeError, ValueError):
                return "has an unreadable header"
        ends = [entry["data_offsets"][1] for key, entry in header.items()
                if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
        if ends and 8 + length + max(ends) > size:
            return "is truncated (shorter than the tensors its header names)"
    return None


def checkpoint_problem(checkpoint: str | Path, required: tuple[str, ...] | list[str] = ()) -> str | None:
    """What makes ``checkpoint`` unfit to resume from, in words, or None: a ``required`` file missing, or any of
    its files (top level) damaged. A ``trainer_state.json`` must also name its ``global_step``."""
    folder = Path(checkpoint)
    for name in required:
        if not (folder / name).exists():
            return f"has no {name}"
    for path in sorted(folder.iterdir()):
        if path.is_file():
            problem = file_problem(path)
            if problem is not None:
                return f"{path.name} {problem}"
    state = folder / "trainer_state.json"
    if state.is_file():
        data = json.loads(state.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("global_step"), int):
            return "trainer_state.json has no global_step"
    return None


def checkpoint_step(path: str | Path) -> int:
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint-<step> directory")
    return int(match.group(1))


def latest_checkpoint(output_dir: str | Path, *, before: int | None = None, quiet: bool = False) -> Path | None:
    """The newest complete ``checkpoint-<step>`` in ``output_dir`` (below step ``before`` if given);
    incomplete ones are skipped with a warning (unless ``quiet``)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)), key=checkpoint_step)
    for candidate in reversed(found):
        if before is not None and checkpoint_step(candidate) >= before:
            continue
        if is_complete(candidate):
            return candidate
        if not quiet:
            logger.warning("Skipping incomplete checkpoint %s (no %s marker)", candidate, COMPLETE_MARKER)
    return None


def prune_checkpoints(output_dir: str | Path, keep: int | None, protect: tuple = ()) -> None:
    """Keep the newest ``keep`` complete checkpoints (our own checkpoint-* folders only), and any in
    ``protect`` (e.g. the Trainer's best model). Incomplete ones are left alone: resume skips them and
    the next save of the same step completes them."""
    if not keep or keep <= 0:
        return
    folder = Path(output_dir)
    kept = {Path(p).resolve() for p in protect if p}
    found = sorted(
        (p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name) and is_complete(p)),
        key=checkpoint_step,
    )
    for old in found[:-keep]:
        if old.resolve() not in kept:
            shutil.rmtree(old)


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per step. On resume, rows after the
    checkpoint's step are dropped so steps are neither duplicated nor missing."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.is_file():
            kept = [row for row in self.read(self.path) if row.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    @staticmethod
    def read(path: str | Path) -> list[dict]:
        rows = []
        for line in Path(path).read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
        return rows

    def append(self, row: dict) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in row.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def rows(self) -> list[dict]:
        return self.read(self.path) if self.path.is_file() else []
