"""gaudi_spawn.py: exact launcher commands (dry run), user errors, and real runs."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ports import free_port

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import gaudi_spawn  # noqa: E402
from rlhf.errors import UserError, run_cli  # noqa: E402

PY = sys.executable
TEST_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def spawn(*args: str, cwd: Path, extra_env: dict[str, str] | None = None, timeout: int = 120):
    env = {**os.environ, **TEST_ENV, "PYTHONPATH": str(REPO), **(extra_env or {})}
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    return subprocess.run(
        [PY, str(REPO / "gaudi_spawn.py"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture
def script(tmp_path: Path) -> str:
    path = tmp_path / "train.py"
    path.write_text("print('hi')\n")
    return str(path)


@pytest.fixture
def dry(monkeypatch, capsys):
    """Run gaudi_spawn.main in-process with a pinned machine: 2 sockets x 16 cores, Open MPI 4."""
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setattr(gaudi_spawn, "cpu_topology", lambda: (2, 16))
    monkeypatch.setattr(gaudi_spawn, "openmpi_major_version", lambda mpirun="mpirun": 4)
    monkeypatch.setattr(gaudi_spawn.shutil, "which", lambda name: f"/usr/bin/{name}")

    def run(*args: str) -> str:
        monkeypatch.setattr(sys, "argv", ["gaudi_spawn.py", "--dry_run", *args])
        assert run_cli(gaudi_spawn.main) == 0
        out = capsys.readouterr().out
        assert out.count("\n") == 1, out
        return out.strip()

    return run


# ------------------------------------------------------------------------------ exact commands


def test_single_card(dry, script):
    assert dry(script, "--lr", "1e-4") == f"{shlex.quote(PY)} {script} --lr 1e-4"


def test_mpi_8_cards(dry, script):
    # 2 sockets x 16 physical cores shared by 8 cards -> 4 cores per card
    expected = (
        "mpirun -n 8 --bind-to core --map-by socket:PE=4 --rank-by core --report-bindings "
        f"--allow-run-as-root {shlex.quote(PY)} {script} --output_dir out"
    )
    assert dry("--world_size", "8", "--use_mpi", script, "--output_dir", "out") == expected


def test_mpi_rank_by_slot_with_open_mpi_5(dry, script, monkeypatch):
    monkeypatch.setattr(gaudi_spawn, "openmpi_major_version", lambda mpirun="mpirun": 5)
    assert " --rank-by slot " in dry("--world_size", "8", "--use_mpi", script)


def test_deepspeed_8_cards(dry, script):
    expected = (
        "deepspeed --num_nodes 1 --num_gpus 8 --no_local_rank --master_port 29500 "
        f"{script} --deepspeed ds.json"
    )
    assert dry("--world_size", "8", "--use_deepspeed", script, "--deepspeed", "ds.json") == expected


def test_deepspeed_single_card(dry, script):
    assert dry("--use_deepspeed", "--master_port", "1234", script) == (
        f"deepspeed --num_gpus 1 --master_port 1234 {script}"
    )


def test_deepspeed_multi_node_hostfile(dry, script, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two Gaudi servers\n10.0.0.1 slots=8\n\n10.0.0.2 slots=8\n")
    expected = (
        f"deepspeed --hostfile {hostfile} --master_addr 10.0.0.1 --no_local_rank --master_port 29501 "
        f"{script} --bf16"
    )
    assert dry("--hostfile", str(hostfile), "--use_deepspeed", "--master_port", "29501", script, "--bf16") == expected
    # --world_size must agree with the hostfile's 16 slots; --master_addr overrides the first host
    assert " --master_addr 10.0.0.9 " in dry(
        "--world_size", "16", "--hostfile", str(hostfile), "--use_deepspeed", "--master_addr", "10.0.0.9", script
    )
    with pytest.raises(UserError, match="16 slots"):
        gaudi_spawn.main(["--world_size", "8", "--hostfile", str(hostfile), "--use_deepspeed", script])


def test_torch_distributed_without_flags(dry, script):
    assert dry("--world_size", "2", script) == (
        f"{shlex.quote(PY)} -um torch.distributed.run --nproc_per_node=2 --master_addr localhost "
        f"--master_port 29500 {script}"
    )


def test_launcher_flags_after_script_belong_to_the_script(dry, script):
    # argparse REMAINDER: --world_size after the script is the script's own argument
    assert dry(script, "--world_size", "4", "--use_mpi") == f"{shlex.quote(PY)} {script} --world_size 4 --use_mpi"


def test_secrets_are_masked(dry, script):
    out = dry(script, "--hf_access_token", "hf_SECRET1", "--use_auth_token=hf_SECRET2", "--hub_token", "hf_S3",
              "--use_auth_token", "--x", "a b")
    assert "SECRET" not in out and "hf_S3" not in out
    assert out == (
        f"{shlex.quote(PY)} {script} --hf_access_token '***' '--use_auth_token=***' --hub_token '***' "
        "--use_auth_token --x 'a b'"
    )


# ------------------------------------------------------------------------------ pure helpers


@pytest.mark.parametrize(
    ("sockets", "cores", "world", "expected"),
    [
        (2, 40, 8, ("socket", 10)),  # Gaudi2 server: 2 x 40 cores, 8 cards -> 4 cards/socket, 10 cores each
        (2, 16, 8, ("socket", 4)),
        (1, 2, 2, ("socket", 1)),  # this CI box
        (8, 1, 8, ("slot", 1)),  # VM: one core per socket -> map by slot
        (1, 6, 4, ("socket", 1)),
    ],
)
def test_mpi_pe(sockets, cores, world, expected):
    assert gaudi_spawn.mpi_pe(sockets, cores, world) == expected


def test_mpi_pe_more_cards_than_cores():
    with pytest.raises(UserError, match="exceeds the 2 physical cores"):
        gaudi_spawn.mpi_pe(1, 2, 4)


def test_cpu_topology_parses_lscpu(monkeypatch):
    lscpu = "Architecture: x86_64\nCore(s) per socket:   40\nSocket(s):            2\n"

    def fake_run(cmd, **kwargs):
        assert cmd == ["lscpu"]
        return subprocess.CompletedProcess(cmd, 0, stdout=lscpu, stderr="")

    monkeypatch.setattr(gaudi_spawn.subprocess, "run", fake_run)
    assert gaudi_spawn.cpu_topology() == (2, 40)


def test_cpu_topology_without_lscpu(monkeypatch):
    def missing(cmd, **kwargs):
        raise FileNotFoundError(cmd[0])

    monkeypatch.setattr(gaudi_spawn.subprocess, "run", missing)
    sockets, cores = gaudi_spawn.cpu_topology()
    assert sockets >= 1 and cores >= 1


def test_openmpi_version_parsing(monkeypatch):
    outputs = {"a": "mpirun (Open MPI) 4.1.4\n\nReport bugs to ...\n", "b": "mpirun (Open MPI) 5.0.7\n",
               "c": "HYDRA build details:\n    Version: 4.1\n"}

    def fake_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 0, stdout=outputs[cmd[0]], stderr="")

    monkeypatch.setattr(gaudi_spawn.subprocess, "run", fake_run)
    assert [gaudi_spawn.openmpi_major_version(k) for k in "abc"] == [4, 5, None]


# ------------------------------------------------------------------------------ user errors


def _one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("gaudi_spawn.py: error: ")
    for needle in needles:
        assert needle in lines[0]


def test_both_launchers_is_a_user_error(tmp_path, script):
    _one_line_error(spawn("--world_size", "8", "--use_mpi", "--use_deepspeed", script, cwd=tmp_path),
                    "--use_mpi and --use_deepspeed")


def test_missing_script_is_a_user_error(tmp_path):
    _one_line_error(spawn("--dry_run", "nope.py", cwd=tmp_path), "nope.py not found")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--world_size", "0"], "--world_size must be >= 1"),
        (["--hostfile", "missing_hosts"], "hostfile missing_hosts not found"),
        (["--hostfile", "HOSTS", "--use_mpi"], "needs --use_deepspeed"),
        (["--hostfile", "BAD", "--use_deepspeed"], "line 1"),
    ],
)
def test_other_user_errors(dry, script, tmp_path, args, needle):
    (tmp_path / "HOSTS").write_text("node1 slots=8\n")
    (tmp_path / "BAD").write_text("node1 8\n")
    args = [str(tmp_path / a) if a in ("HOSTS", "BAD") else a for a in args]
    with pytest.raises(UserError, match=needle):
        gaudi_spawn.main(["--dry_run", *args, script])


def test_missing_launcher_binaries_say_how_to_install(monkeypatch, script):
    monkeypatch.setattr(gaudi_spawn.shutil, "which", lambda name: None)
    monkeypatch.setattr(gaudi_spawn, "cpu_topology", lambda: (1, 8))
    with pytest.raises(UserError, match="apt-get install openmpi-bin"):
        gaudi_spawn.main(["--world_size", "2", "--use_mpi", script])
    with pytest.raises(UserError, match="pip install deepspeed"):
        gaudi_spawn.main(["--world_size", "2", "--use_deepspeed", script])


def test_no_optimum_import():
    code = "import sys, gaudi_spawn, rlhf.distributed; assert not [m for m in sys.modules if m.startswith(('optimum', 'torch', 'transformers'))]"
    subprocess.run([PY, "-c", code], cwd=REPO, check=True, env={**os.environ, **TEST_ENV})


# ------------------------------------------------------------------------------ real runs


def test_single_card_run_returns_the_jobs_exit_code(tmp_path):
    job = tmp_path / "job.py"
    job.write_text(
        "import os, sys\n"
        "print('args', sys.argv[1:], os.environ['MASTER_ADDR'], os.environ['MASTER_PORT'])\n"
        "sys.exit(3)\n"
    )
    result = spawn("--world_size", "1", "--master_port", "29555", str(job), "--hf_access_token", "hf_TOPSECRET",
                   cwd=tmp_path)
    assert result.returncode == 3, result
    # the job saw the real token; the launcher's own line shows it masked
    assert "args ['--hf_access_token', 'hf_TOPSECRET'] localhost 29555" in result.stdout
    launcher_lines = [line for line in result.stderr.splitlines() if line.startswith("gaudi_spawn:")]
    assert launcher_lines and all("TOPSECRET" not in line for line in launcher_lines)
    assert "status 3" in result.stderr


WORKER = """
import json, sys
import torch
import torch.distributed as dist
from rlhf.distributed import setup_distributed_env

info = setup_distributed_env()
dist.init_process_group("gloo")
value = torch.tensor([float(info.rank + 1)])
dist.all_reduce(value)
record = {"rank": info.rank, "local_rank": info.local_rank, "world_size": info.world_size,
          "pg_world_size": dist.get_world_size(), "main": info.is_main_process, "sum": value.item()}
with open(f"{sys.argv[1]}/rank{info.rank}.json", "w") as f:
    json.dump(record, f)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (apt-get install openmpi-bin)")
def test_mpi_two_processes_all_reduce(tmp_path):
    if gaudi_spawn.openmpi_major_version() is None:
        pytest.skip("mpirun on PATH is not Open MPI")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs: mpirun --bind-to core places one process per core")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    result = spawn("--world_size", "2", "--use_mpi", "--master_port", str(free_port()), str(worker),
                   str(tmp_path), cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    records = sorted((json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")), key=lambda r: r["rank"])
    assert [(r["rank"], r["local_rank"], r["world_size"], r["pg_world_size"], r["main"]) for r in records] == [
        (0, 0, 2, 2, True),
        (1, 1, 2, 2, False),
    ]
    assert all(r["sum"] == 3.0 for r in records)  # 1 + 2


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (apt-get install openmpi-bin)")
def test_mpi_failing_rank_exit_code_comes_back(tmp_path):
    if gaudi_spawn.openmpi_major_version() is None:
        pytest.skip("mpirun on PATH is not Open MPI")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs: mpirun --bind-to core places one process per core")
    job = tmp_path / "fail.py"
    job.write_text("import os, sys\nsys.exit(5 if os.environ['OMPI_COMM_WORLD_RANK'] == '1' else 0)\n")
    result = spawn("--world_size", "2", "--use_mpi", str(job), cwd=tmp_path)
    assert result.returncode == 5, result.stdout + result.stderr
