"""``python -m rlhf.deepspeed_ops``: compile the C++ ops DeepSpeed builds at run time on this machine (on
CPU: the shared-memory comm op, about 60 s) into ``TORCH_EXTENSIONS_DIR``, so that runs and tests reuse
them. Run by ``make setup-deepspeed`` (and so by ``make test``), not by the demo, which never uses them.

torch guards a build with a ``lock`` file in the op's build folder and makes every other process wait, without
end, while it exists; a build that is killed (Ctrl-C, a timeout) leaves it behind, and then every DeepSpeed run
and test on the machine hangs. ``build_ops`` removes such a lock first: one older than ``STALE_LOCK_S`` (a build
takes about 60 s), so a build in progress elsewhere is left alone; ``--remove_stale_locks`` does only that."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

OPS = ("deepspeed_shm_comm",)
STALE_LOCK_S = 600.0


def build_root() -> Path:
    """The folder torch builds extensions in (``TORCH_EXTENSIONS_DIR``, else its per-Python, per-accelerator cache)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    accelerator = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def remove_stale_locks(root: Path, max_age_s: float = STALE_LOCK_S, now: float | None = None) -> list[Path]:
    """Delete the build locks of ``OPS`` under ``root`` older than ``max_age_s``: an interrupted build's."""
    now = time.time() if now is None else now
    removed = []
    for name in OPS:
        lock = root / name / "lock"
        if lock.is_file() and now - lock.stat().st_mtime > max_age_s:
            lock.unlink()
            removed.append(lock)
    return removed


def report_stale_locks_removed() -> None:
    for lock in remove_stale_locks(build_root()):
        print(f"removed {lock}: an interrupted build's lock, on which every DeepSpeed run would wait")


def build_ops() -> str:
    """Compile the C++ ops DeepSpeed builds at run time on this machine (on CPU: the shared-memory
    comm op, about 60 s), into ``TORCH_EXTENSIONS_DIR``, so that runs and tests reuse them."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return f"nothing to build ahead for the {accelerator.device_name()} accelerator"
    report_stale_locks_removed()
    import importlib

    build_shm_op = importlib.import_module("deepspeed.comm.torch").build_shm_op  # not the `torch` name in deepspeed.comm
    return "built deepspeed_shm_comm" if build_shm_op() is not None else "shm comm op not compatible here"


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--remove_stale_locks", action="store_true",
                        help="only delete the build locks an interrupted build left (make test runs this first)")
    if parser.parse_args(argv).remove_stale_locks:
        report_stale_locks_removed()
    else:
        print(build_ops())


if __name__ == "__main__":
    main()
