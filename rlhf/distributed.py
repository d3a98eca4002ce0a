"""Rank, local rank and world size of this process, from whatever launched it.

``torchrun``, ``accelerate launch`` and ``deepspeed`` export ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` themselves. ``mpirun`` (how
``gaudi_spawn.py --use_mpi`` runs a job, as optimum-habana does) exports only its own
variables:

* Open MPI: ``OMPI_COMM_WORLD_RANK``, ``OMPI_COMM_WORLD_SIZE``, ``OMPI_COMM_WORLD_LOCAL_RANK``,
  ``OMPI_COMM_WORLD_LOCAL_SIZE``;
* MPICH / Intel MPI (Hydra): ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``, ``MPI_LOCALNRANKS``.

``setup_distributed_env()`` maps those onto the ``torch.distributed`` names, so that
``transformers.Trainer``, accelerate and ``torch.distributed.init_process_group`` (``env://``)
initialise from them. Call it first thing in a stage script's ``main()``, before building
``TrainingArguments``. It imports neither torch nor optimum.

In a process of a multi-process job (world size > 1, read from ``os.environ``) it also:

* registers an exit hook (``release_distributed_resources``) that destroys the ``torch.distributed``
  process group, if one was initialised. A gloo process group left alive at interpreter exit can abort the process
  ("terminate called without an active exception", exit 134 under ``mpirun``) when its peer
  is still running, e.g. while rank 0 alone writes the final model;
* ``exit_job(code)`` ends a stage script (``exit_job(run_cli(main))``). The exit hook alone did not
  stop that abort (seen in about 1 of 30 two-process launches on 2 CPU cores: rank 1, done, aborted
  in its teardown; torchrun then killed rank 0 while it wrote the final model and failed the job).
  So a rank that finished its work waits for the others, runs the exit hooks, and leaves without
  the interpreter's teardown, where native threads (gloo's, Arrow's) are destroyed;
* removes, at exit, this rank's DeepSpeed shared-memory buffer. On CPU, DeepSpeed's communication
  backend creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``
  (69 MB a rank) and never unlinks it: /dev/shm is memory, so every DeepSpeed run left 69 MB a rank
  held until reboot (5 GB here after a day of test runs, enough to get a training run OOM-killed).
  Unlinking at exit is safe: every rank has mapped every buffer by then, and a mapping outlives its
  name. A rank killed with SIGKILL still leaves its buffer behind;
* on ranks other than 0, turns off the ``datasets`` progress bars, so that only rank 0 shows
  progress (the Trainer and ``rl_training.py`` already keep other ranks' logs at warning level).

A launch that asks for DeepSpeed (``deepspeed_launch()``: the ``deepspeed`` launcher, also behind
``gaudi_spawn.py --use_deepspeed``, or ``accelerate launch --use_deepspeed``) is refused with one
line (exit 2) unless the script passes ``setup_distributed_env(supports_deepspeed=True)``: a script
that does not run under DeepSpeed would otherwise train with plain data parallelism and exit 0.
"""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from typing import MutableMapping, NoReturn

from rlhf.errors import UserError

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = "29500"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class _MpiVars:
    name: str
    rank: str
    size: str
    local_rank: tuple[str, ...]
    local_size: tuple[str, ...]


_MPI_FLAVOURS = (
    _MpiVars(
        "Open MPI",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        ("OMPI_COMM_WORLD_LOCAL_RANK",),
        ("OMPI_COMM_WORLD_LOCAL_SIZE",),
    ),
    _MpiVars(
        "MPICH/Intel MPI",
        "PMI_RANK",
        "PMI_SIZE",
        ("MPI_LOCALRANKID", "PMI_LOCAL_RANK"),
        ("MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"),
    ),
)


def _int_var(env: MutableMapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value.strip())
    except ValueError:
        raise UserError(
            f"environment variable {name}={value!r} is not an integer; unset it or fix the launcher"
        ) from None


def _first_int(env: MutableMapping[str, str], names: tuple[str, ...]) -> int | None:
    for name in names:
        if env.get(name, "").strip():
            return _int_var(env, name)
    return None


def _check(info: DistInfo, source: str) -> DistInfo:
    if info.world_size < 1:
        raise UserError(f"world size {info.world_size} from {source} must be >= 1; fix the launcher")
    if not 0 <= info.rank < info.world_size:
        raise UserError(
            f"rank {info.rank} from {source} is outside 0..{info.world_size - 1}; fix the launcher"
        )
    if info.local_rank < 0:
        raise UserError(f"local rank {info.local_rank} from {source} is negative; fix the launcher")
    return info


def dist_info_from_env(env: MutableMapping[str, str] | None = None) -> tuple[DistInfo, dict[str, str]]:
    """Work out rank/local rank/world size; return them and the variables to export.

    Pure: reads ``env`` (default ``os.environ``) and changes nothing.
    """
    env = os.environ if env is None else env
    has_rank, has_size = bool(env.get("RANK", "").strip()), bool(env.get("WORLD_SIZE", "").strip())

    if has_rank and has_size:  # torchrun / accelerate / deepspeed / already set up
        rank, world_size = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE")
        local_rank = _first_int(env, ("LOCAL_RANK",))
        info = DistInfo(rank, rank if local_rank is None else local_rank, world_size)
        return _check(info, "RANK/WORLD_SIZE"), {}

    for flavour in _MPI_FLAVOURS:
        if not (env.get(flavour.rank, "").strip() and env.get(flavour.size, "").strip()):
            continue
        rank, world_size = _int_var(env, flavour.rank), _int_var(env, flavour.size)
        local_rank = _first_int(env, flavour.local_rank)
        local_size = _first_int(env, flavour.local_size)
        if local_rank is None:  # no per-node numbering exported: assume one node
            local_rank = rank
        info = _check(DistInfo(rank, local_rank, world_size), f"{flavour.name} ({flavour.rank})")

        exports = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank)}
        if local_size is not None:
            exports["LOCAL_WORLD_SIZE"] = str(local_size)
        if not env.get("MASTER_ADDR", "").strip():
            if local_size is not None and local_size < world_size:
                raise UserError(
                    f"the {flavour.name} job spans several nodes ({world_size} ranks, {local_size} on "
                    "this node) but MASTER_ADDR is not set; export MASTER_ADDR=<rank-0 host> to all "
                    "ranks (Open MPI: mpirun -x MASTER_ADDR=...)"
                )
            exports["MASTER_ADDR"] = DEFAULT_MASTER_ADDR
        if not env.get("MASTER_PORT", "").strip():
            exports["MASTER_PORT"] = DEFAULT_MASTER_PORT
        return info, exports

    if has_rank or has_size:
        present, missing = ("RANK", "WORLD_SIZE") if has_rank else ("WORLD_SIZE", "RANK")
        raise UserError(
            f"{present} is set but {missing} is not; set both (or neither for a single process)"
        )
    return DistInfo(rank=0, local_rank=0, world_size=1), {}


def deepspeed_launch(env: MutableMapping[str, str] | None = None) -> str | None:
    """The launcher that asked this process to run under DeepSpeed, or None.

    ``accelerate launch --use_deepspeed`` exports ``ACCELERATE_USE_DEEPSPEED=true``; the ``deepspeed``
    launcher (also behind ``gaudi_spawn.py --use_deepspeed``) exports ``CROSS_RANK``, ``CROSS_SIZE`` and
    ``LOCAL_SIZE`` to every worker."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_DEEPSPEED", "").strip().lower() in ("true", "1", "yes"):
        return "accelerate launch --use_deepspeed"
    if all(env.get(name, "").strip() for name in DEEPSPEED_LAUNCHER_VARS):
        return "the deepspeed launcher"
    return None


DEEPSPEED_LAUNCHER_VARS = ("CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE")


def setup_distributed_env(env: MutableMapping[str, str] | None = None, *, supports_deepspeed: bool = False) -> DistInfo:
    """Export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from an MPI launcher's variables if needed.

    Variables that are already set are never overwritten. Returns this process's ``DistInfo``.
    A single process (no launcher) gets rank 0 of 1 and nothing is exported.

    A script that does not run under DeepSpeed (``supports_deepspeed=False``, the default) refuses a
    launch that asks for it (``deepspeed_launch``), instead of training with plain data parallelism
    and reporting success.
    """
    own_process = env is None
    env = os.environ if env is None else env
    launch = deepspeed_launch(env)
    if launch is not None and not supports_deepspeed:
        script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "this script"
        raise UserError(
            f"{script} was started by {launch}, but it does not run under DeepSpeed (it would train with plain "
            "data parallelism instead); launch it with torchrun or accelerate launch --multi_gpu"
        )
    info, exports = dist_info_from_env(env)
    for name, value in exports.items():
        env[name] = value
    if own_process and info.is_distributed:
        _register_exit_hook()
        if not info.is_main_process:
            _quiet_replica_progress_bars()
    return info


_exit_hook_registered = False


def _register_exit_hook() -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(release_distributed_resources)
        _exit_hook_registered = True


def exit_job(code: int) -> NoReturn:
    """End a stage script's process with exit ``code`` (``exit_job(run_cli(main))``).

    In a multi-process job, a rank that succeeded (code 0) first waits for every other rank (a
    barrier: none tears down while another still writes the final model), then runs the exit hooks
    (``atexit``: the process group is destroyed, logs and trackers are flushed) and leaves with
    ``os._exit``, skipping the interpreter's teardown of native thread pools that can abort a
    finished process. A failed rank (code != 0) exits at once: the others may never reach the
    barrier; their next collective fails instead."""
    dist = _process_group()
    if code != 0 or dist is None or dist.get_world_size() < 2:
        sys.exit(code)
    dist.barrier()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def release_distributed_resources() -> None:
    """The exit hook: remove this rank's DeepSpeed shared-memory buffer, then destroy the
    ``torch.distributed`` process group if one is initialised (no barrier: a rank that stops early
    must not wait for the others; their next collective then fails instead of hanging until the
    timeout)."""
    remove_deepspeed_shm_buffer()
    dist = _process_group()
    if dist is not None:
        dist.destroy_process_group()


def remove_deepspeed_shm_buffer() -> None:
    """Unlink the shared-memory file DeepSpeed's CPU allreduce created for this rank, if there is one
    (DeepSpeed never does)."""
    env = os.environ
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_"
            f"{env.get('RANK', '')}")
    try:
        os.unlink(f"/dev/shm/{name}")
    except FileNotFoundError:  # not a DeepSpeed run, or not on CPU
        pass


def _quiet_replica_progress_bars() -> None:
    env_flag = "HF_DATASETS_DISABLE_PROGRESS_BARS"
    os.environ.setdefault(env_flag, "1")  # read by datasets when it is imported later
    for module_name, function in (("datasets.utils.tqdm", "disable_progress_bars"),
                                  ("datasets.utils.logging", "disable_progress_bar")):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, function):
            getattr(module, function)()
            return


def _process_group():
    """``torch.distributed`` if a process group is initialised (without importing torch)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None
