"""rlhf.deepspeed_ops: an interrupted build's lock is removed, a build in progress is left alone."""

import os
import subprocess
import sys
import time
from pathlib import Path

from rlhf.deepspeed_ops import OPS, STALE_LOCK_S, remove_stale_locks

REPO = Path(__file__).resolve().parents[1]


def make_lock(root: Path, age_s: float) -> Path:
    lock = root / OPS[0] / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_an_old_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    fresh = make_lock(tmp_path / "fresh", age_s=30)
    assert remove_stale_locks(tmp_path / "fresh") == [] and fresh.exists()
    stale = make_lock(tmp_path / "stale", age_s=STALE_LOCK_S + 60)
    assert remove_stale_locks(tmp_path / "stale") == [stale] and not stale.exists()
    assert remove_stale_locks(tmp_path / "nothing-built-yet") == []


def test_the_cli_removes_the_lock_in_torch_extensions_dir(tmp_path):
    stale = make_lock(tmp_path, age_s=STALE_LOCK_S * 2)
    result = subprocess.run([sys.executable, "-m", "rlhf.deepspeed_ops", "--remove_stale_locks"], cwd=REPO,
                            env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and "interrupted build" in result.stdout
