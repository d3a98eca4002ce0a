"""Launch a stage script on one or several cards (Gaudi HPUs, or CPU processes for testing).

Usage:
    python gaudi_spawn.py [--world_size N] [--use_mpi | --use_deepspeed] [--hostfile F]
                          [--master_addr A] [--master_port P] [--dry_run]
                          script.py [script args...]

Builds the same commands as optimum-habana's ``DistributedRunner`` (``examples/gaudi_spawn.py``)
without importing optimum:

* one card (``--world_size 1``):   ``python script.py args``
  (with ``--use_deepspeed``:       ``deepspeed --num_gpus 1 --master_port P script.py args``)
* ``--world_size N --use_mpi``:    ``mpirun -n N --bind-to core --map-by socket:PE=k --rank-by core
  --report-bindings --allow-run-as-root python script.py args``, where k = physical cores of the
  machine (``lscpu``: sockets x cores per socket) // N, i.e. the cores per socket shared among the
  cards on that socket. With 1 core per socket (a VM) it maps by ``slot``. With Open MPI 5 it ranks
  by ``slot`` (Open MPI 5 changed ``--rank-by``; optimum-habana made the same change).
* ``--world_size N --use_deepspeed``: ``deepspeed --num_nodes 1 --num_gpus N --no_local_rank
  --master_port P script.py args``
* ``--hostfile F --use_deepspeed`` (multi-node): ``deepspeed --hostfile F --master_addr A
  --no_local_rank --master_port P script.py args``; A defaults to the first host of F and the
  world size is the sum of the hostfile's ``slots=``.
* ``--world_size N`` with neither flag: ``python -um torch.distributed.run --nproc_per_node=N
  --master_addr A --master_port P script.py args``.

The job gets MASTER_ADDR/MASTER_PORT in its environment (defaults: the current values, else
localhost and 29500); workers map the MPI variables with ``rlhf.distributed.setup_distributed_env``.
``--dry_run`` prints the command (one shell-quoted line) and exits 0. Otherwise the exit code is the
job's. Values of ``--hf_access_token``, ``--use_auth_token``, ``--hub_token`` and ``--token`` are
masked in everything printed and passed unchanged to the job.

Options are parsed with argparse rather than HfArgumentParser: HfArgumentParser turns bool fields
into ``--use_mpi [BOOL]``, which would swallow the script name in ``--use_mpi train.py``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from rlhf.errors import UserError, run_cli

DEFAULT_MASTER_ADDR = "localhost"
DEFAULT_MASTER_PORT = 29500
SECRET_FLAGS = ("--hf_access_token", "--use_auth_token", "--hub_token", "--token")
MASK = "***"
INSTALL_MPI = "install Open MPI (Debian/Ubuntu: apt-get install openmpi-bin)"
INSTALL_DEEPSPEED = (
    "install DeepSpeed (pip install deepspeed; on Gaudi: "
    "pip install git+https://github.com/HabanaAI/DeepSpeed.git@<SynapseAI version>)"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gaudi_spawn.py",
        description="Run a training script on several cards with MPI, DeepSpeed or torch.distributed.",
        allow_abbrev=False,
    )
    parser.add_argument("--world_size", type=int, default=None, help="number of cards/processes (default 1)")
    parser.add_argument("--use_mpi", action="store_true", help="launch with mpirun (Open MPI)")
    parser.add_argument("--use_deepspeed", action="store_true", help="launch with the deepspeed launcher")
    parser.add_argument("--hostfile", default=None, help="DeepSpeed hostfile for a multi-node run")
    parser.add_argument("--master_addr", default=None, help="rendezvous address (default localhost)")
    parser.add_argument("--master_port", type=int, default=None, help="rendezvous port (default 29500)")
    parser.add_argument("--dry_run", action="store_true", help="print the command and exit")
    parser.add_argument("training_script", help="the script to run, followed by its own arguments")
    parser.add_argument("training_script_args", nargs=argparse.REMAINDER)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# MPI process placement


def mpi_pe(sockets: int, cores_per_socket: int, world_size: int) -> tuple[str, int]:
    """``(map_by, k)`` for ``--map-by <map_by>:PE=k``: physical cores per process, as optimum-habana.

    k = (sockets * cores_per_socket) // world_size, i.e. a socket's cores divided among the cards
    on that socket. One core per socket means a VM: map by slot instead of socket.
    """
    if sockets < 1 or cores_per_socket < 1:
        raise ValueError(f"bad CPU topology: {sockets} sockets x {cores_per_socket} cores")
    if world_size < 1:
        raise ValueError(f"bad world size {world_size}")
    pe = (sockets * cores_per_socket) // world_size
    if pe < 1:
        raise UserError(
            f"--world_size {world_size} exceeds the {sockets * cores_per_socket} physical cores that "
            "mpirun --bind-to core can bind; use fewer processes, or drop --use_mpi to launch with "
            "torch.distributed"
        )
    return ("slot" if cores_per_socket == 1 else "socket"), pe


def _lscpu_field(text: str, label: str) -> int | None:
    match = re.search(rf"^{re.escape(label)}:\s*(\d+)\s*$", text, flags=re.MULTILINE)
    return int(match.group(1)) if match else None


def cpu_topology() -> tuple[int, int]:
    """``(sockets, physical cores per socket)`` from lscpu, else /proc/cpuinfo, else cpu_count."""
    try:
        text = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=True, timeout=30,
            env={**os.environ, "LC_ALL": "C"},
        ).stdout
        sockets, cores = _lscpu_field(text, "Socket(s)"), _lscpu_field(text, "Core(s) per socket")
        if sockets and cores:
            return sockets, cores
    except (OSError, subprocess.SubprocessError):
        pass
    try:  # Linux without util-linux: count distinct (physical id, core id) pairs
        cores_by_socket: dict[str, set[str]] = {}
        socket = core = None
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "physical id":
                socket = value
            elif key == "core id":
                core = value
            elif not key and socket is not None and core is not None:
                cores_by_socket.setdefault(socket, set()).add(core)
                socket = core = None
        if cores_by_socket:
            return len(cores_by_socket), min(len(c) for c in cores_by_socket.values())
    except OSError:
        pass
    return 1, max(1, os.cpu_count() or 1)  # may count hyperthreads: PE errs on the large side


def openmpi_major_version(mpirun: str = "mpirun") -> int | None:
    """Major version of Open MPI's mpirun, None if absent or not Open MPI."""
    try:
        out = subprocess.run(
            [mpirun, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"Open MPI\)?\s+v?(\d+)\.", out)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------
# Commands


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """DeepSpeed hostfile lines ``<host> slots=<n>`` (``#`` comments, blank lines allowed)."""
    hosts: list[tuple[str, int]] = []
    for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", line)
        if not match or int(match.group(2)) < 1:
            raise UserError(
                f"hostfile {path} line {number} is {raw.strip()!r}; each line must be '<host> slots=<n>' "
                "with n >= 1"
            )
        host = match.group(1)
        if any(host == seen for seen, _ in hosts):
            raise UserError(f"hostfile {path} lists host {host} twice; list each host once")
        hosts.append((host, int(match.group(2))))
    if not hosts:
        raise UserError(f"hostfile {path} lists no hosts; add lines '<host> slots=<n>'")
    return hosts


def build_command(
    script: str,
    script_args: list[str],
    *,
    world_size: int = 1,
    use_mpi: bool = False,
    use_deepspeed: bool = False,
    hostfile: str | None = None,
    hostfile_master: str | None = None,
    master_addr: str = DEFAULT_MASTER_ADDR,
    master_port: int = DEFAULT_MASTER_PORT,
    cpu_counts: tuple[int, int] | None = None,
    rank_by: str = "core",
    python: str | None = None,
) -> list[str]:
    """The job's argv. Pure: topology (``cpu_counts`` = sockets, cores per socket) is passed in."""
    python = python or sys.executable
    job = [script, *script_args]
    if use_mpi and use_deepspeed:
        raise UserError("--use_mpi and --use_deepspeed cannot be used together; choose one launcher")
    if hostfile is not None:
        if not use_deepspeed:
            raise UserError(
                "--hostfile starts a multi-node run, which needs --use_deepspeed; add it or drop --hostfile"
            )
        return ["deepspeed", "--hostfile", hostfile, "--master_addr", hostfile_master or master_addr,
                "--no_local_rank", "--master_port", str(master_port), *job]
    if world_size == 1:
        if use_deepspeed:
            return ["deepspeed", "--num_gpus", "1", "--master_port", str(master_port), *job]
        return [python, *job]
    if use_deepspeed:
        return ["deepspeed", "--num_nodes", "1", "--num_gpus", str(world_size), "--no_local_rank",
                "--master_port", str(master_port), *job]
    if use_mpi:
        if cpu_counts is None:
            raise ValueError("cpu_counts is required for an MPI command")
        map_by, pe = mpi_pe(*cpu_counts, world_size)
        return ["mpirun", "-n", str(world_size), "--bind-to", "core", "--map-by", f"{map_by}:PE={pe}",
                "--rank-by", rank_by, "--report-bindings", "--allow-run-as-root", python, *job]
    return [python, "-um", "torch.distributed.run", f"--nproc_per_node={world_size}",
            "--master_addr", master_addr, "--master_port", str(master_port), *job]


def mask_secrets(argv: list[str]) -> list[str]:
    """A copy of ``argv`` with the values of token flags replaced by ``***``."""
    masked = list(argv)
    for i, arg in enumerate(masked):
        for flag in SECRET_FLAGS:
            if arg.startswith(flag + "="):
                masked[i] = f"{flag}={MASK}"
            elif arg == flag and i + 1 < len(masked) and not masked[i + 1].startswith("-"):
                masked[i + 1] = MASK
    return masked


def _run(command: list[str], env: dict[str, str]) -> int:
    proc = subprocess.Popen(command, env=env)
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # the job got the same SIGINT: give it time to stop cleanly
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.terminate()
            code = proc.wait()
    return 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as a shell does


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    if args.use_mpi and args.use_deepspeed:
        raise UserError("--use_mpi and --use_deepspeed cannot be used together; choose one launcher")
    if args.world_size is not None and args.world_size < 1:
        raise UserError(f"--world_size must be >= 1, got {args.world_size}")
    if args.master_port is not None and not 0 < args.master_port < 65536:
        raise UserError(f"--master_port must be in 1..65535, got {args.master_port}")
    if not Path(args.training_script).is_file():
        raise UserError(f"training script {args.training_script} not found; give the path of a .py file")

    master_addr = args.master_addr or os.environ.get("MASTER_ADDR") or DEFAULT_MASTER_ADDR
    env_port = os.environ.get("MASTER_PORT", "")
    master_port = args.master_port or (int(env_port) if env_port.isdigit() else DEFAULT_MASTER_PORT)
    world_size = args.world_size or 1
    hostfile_master = None
    if args.hostfile is not None:
        if not Path(args.hostfile).is_file():
            raise UserError(f"hostfile {args.hostfile} not found; give a file of '<host> slots=<n>' lines")
        hosts = read_hostfile(args.hostfile)
        total = sum(slots for _, slots in hosts)
        if args.world_size is not None and args.world_size != total:
            raise UserError(
                f"--world_size {args.world_size} does not match the {total} slots of {args.hostfile}; "
                "drop --world_size (the hostfile decides) or make them agree"
            )
        world_size = total
        hostfile_master = args.master_addr or hosts[0][0]
        master_addr = hostfile_master

    mpi = args.use_mpi and world_size > 1 and args.hostfile is None
    launcher = "deepspeed" if args.use_deepspeed else ("mpirun" if mpi else None)
    ompi_major = openmpi_major_version() if mpi and shutil.which("mpirun") else None
    command = build_command(
        args.training_script,
        args.training_script_args,
        world_size=world_size,
        use_mpi=args.use_mpi,
        use_deepspeed=args.use_deepspeed,
        hostfile=args.hostfile,
        hostfile_master=hostfile_master,
        master_addr=master_addr,
        master_port=master_port,
        cpu_counts=cpu_topology() if mpi else None,
        rank_by="slot" if ompi_major is not None and ompi_major >= 5 else "core",
    )
    shown = shlex.join(mask_secrets(command))
    if args.dry_run:
        print(shown, flush=True)
        return 0

    if launcher == "mpirun":
        if not shutil.which("mpirun"):
            raise UserError(f"--use_mpi needs mpirun, which is not installed; {INSTALL_MPI}")
        if ompi_major is None:
            raise UserError(f"mpirun on PATH is not Open MPI, whose options this launcher uses; {INSTALL_MPI}")
    if launcher == "deepspeed" and not shutil.which("deepspeed"):
        raise UserError(f"--use_deepspeed needs the deepspeed launcher, which is not installed; {INSTALL_DEEPSPEED}")

    env = {**os.environ, "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}
    print(f"gaudi_spawn: MASTER_ADDR={master_addr} MASTER_PORT={master_port}; running: {shown}",
          file=sys.stderr, flush=True)
    code = _run(command, env)
    if code != 0:
        print(f"gaudi_spawn: the job exited with status {code}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(run_cli(main))
