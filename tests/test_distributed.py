"""rlhf.distributed: mapping launcher environments onto RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*."""

from __future__ import annotations

import pytest

from rlhf import distributed
from rlhf.distributed import DistInfo, dist_info_from_env, setup_distributed_env
from rlhf.errors import UserError

ALL_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE",
    "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "PMI_LOCAL_RANK", "PMI_LOCAL_SIZE",
    "HF_DATASETS_DISABLE_PROGRESS_BARS",  # set by setup_distributed_env() on ranks other than 0
)


@pytest.fixture
def env(monkeypatch):
    """A clean launcher environment in os.environ; returns a setter."""
    for name in ALL_VARS:
        # setenv first: monkeypatch then removes the variable again after the test, also when the code
        # under test set it (delenv of an absent variable records nothing, so RANK/WORLD_SIZE exported by
        # setup_distributed_env() leaked into later tests, whose TrainingArguments then waited forever
        # for 8 ranks)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)

    def set_vars(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_vars


def exported():
    import os

    return {name: os.environ[name] for name in ALL_VARS[:6] if name in os.environ}


def test_open_mpi_is_mapped(env):
    env(OMPI_COMM_WORLD_RANK="3", OMPI_COMM_WORLD_SIZE="8", OMPI_COMM_WORLD_LOCAL_RANK="3",
        OMPI_COMM_WORLD_LOCAL_SIZE="8")
    assert setup_distributed_env() == DistInfo(rank=3, local_rank=3, world_size=8)
    assert exported() == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
                          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert not setup_distributed_env().is_main_process


def test_mpich_intel_mpi_is_mapped_and_master_kept(env):
    env(PMI_RANK="0", PMI_SIZE="2", MPI_LOCALRANKID="0", MASTER_ADDR="10.1.2.3", MASTER_PORT="1234")
    info = setup_distributed_env()
    assert info == DistInfo(rank=0, local_rank=0, world_size=2) and info.is_main_process and info.is_distributed
    assert exported() == {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                          "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "1234"}


def test_pmi_without_local_rank_assumes_one_node(env):
    env(PMI_RANK="1", PMI_SIZE="2")
    assert setup_distributed_env() == DistInfo(rank=1, local_rank=1, world_size=2)


def test_torchrun_variables_win_and_are_not_touched(env):
    env(RANK="1", WORLD_SIZE="4", LOCAL_RANK="0", MASTER_ADDR="node0", MASTER_PORT="4000",
        OMPI_COMM_WORLD_RANK="7", OMPI_COMM_WORLD_SIZE="9")
    before = exported()
    assert setup_distributed_env() == DistInfo(rank=1, local_rank=0, world_size=4)
    assert exported() == before


def test_no_launcher_is_one_process_and_exports_nothing(env):
    assert setup_distributed_env() == DistInfo(rank=0, local_rank=0, world_size=1)
    assert exported() == {}
    assert setup_distributed_env().is_main_process


def test_multi_node_mpi_without_master_addr_is_refused(env):
    env(OMPI_COMM_WORLD_RANK="9", OMPI_COMM_WORLD_SIZE="16", OMPI_COMM_WORLD_LOCAL_RANK="1",
        OMPI_COMM_WORLD_LOCAL_SIZE="8")
    with pytest.raises(UserError, match="MASTER_ADDR"):
        setup_distributed_env()
    env(MASTER_ADDR="10.0.0.1")
    assert setup_distributed_env() == DistInfo(rank=9, local_rank=1, world_size=16)


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "outside 0..1"),
        ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "0"}, "must be >= 1"),
    ],
)
def test_bad_environments_are_user_errors(env, values, needle):
    env(**values)
    with pytest.raises(UserError, match=needle):
        setup_distributed_env()


def test_pure_reader_changes_nothing():
    fake = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}
    info, exports = dist_info_from_env(fake)
    assert info == DistInfo(1, 1, 2)
    assert exports == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert fake == {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}
    setup_distributed_env(fake)  # an explicit mapping is updated instead of os.environ
    assert fake["RANK"] == "1" and fake["MASTER_PORT"] == "29500"


def test_exit_hook_registered_once_for_a_multi_process_job(env, monkeypatch):
    calls = []
    monkeypatch.setattr(distributed, "_exit_hook_registered", False)
    monkeypatch.setattr(distributed.atexit, "register", calls.append)
    setup_distributed_env()  # one process: no hook
    assert calls == []
    env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")
    setup_distributed_env()
    setup_distributed_env()
    assert calls == [distributed.release_distributed_resources]
    distributed.release_distributed_resources()  # no process group initialised: nothing to do, no error


EXIT_JOB_WORKER = """
import atexit, os, sys, time
from pathlib import Path
import torch.distributed as dist
from rlhf.distributed import exit_job, setup_distributed_env

setup_distributed_env()
dist.init_process_group("gloo")
rank, code = dist.get_rank(), int(sys.argv[2])
out = Path(sys.argv[1])
if rank == 0:
    time.sleep(2)  # rank 0 alone writes the final outputs
    (out / "rank0-wrote").write_text("done")
else:
    # what rank 1 sees when its exit hooks run
    atexit.register(lambda: (out / "rank1-saw").write_text(str((out / "rank0-wrote").exists())))
exit_job(code if rank == 1 else 0)
"""


@pytest.mark.parametrize("code", [0, 2])
def test_exit_job_waits_for_every_rank_only_on_success(tmp_path, code):
    """Two gloo processes under torchrun: rank 0 writes its outputs two seconds late. On success, rank 1's exit
    hooks run only after that (the barrier), and they do run (os._exit skips only the interpreter's teardown); a
    failed rank 1 (exit 2) leaves at once, without waiting for a barrier the others may never reach."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from ports import free_port

    script = tmp_path / "worker.py"
    script.write_text(EXIT_JOB_WORKER)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    for name in ALL_VARS:
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), str(script), str(tmp_path), str(code)],
        env=env, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert (result.returncode == 0) == (code == 0), log[-3000:]
    assert (tmp_path / "rank1-saw").read_text() == str(code == 0), log[-3000:]
