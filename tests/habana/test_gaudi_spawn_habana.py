"""Multi-card Gaudi launch: ``gaudi_spawn.py --world_size N --use_mpi finetune_clm.py ...``.

The 8-card command is checked with ``--dry_run`` on a pinned Gaudi-host topology; a real
2-process run goes through mpirun (Open MPI) with Habana's software EMULATED on the CPU: both
ranks build GaudiTrainer and train together (gloo), which is all that can be checked without cards.
"""

from __future__ import annotations

import shlex
import shutil
import sys

import pytest

from habana_helpers import check_ok, instances, read_records, run_emulated

SFT_ARGS = ["--do_train", "--per_device_train_batch_size", "2", "--max_steps", "2", "--max_seq_length", "64",
            "--max_source_length", "32", "--report_to", "none", "--device", "hpu", "--use_habana", "--use_lazy_mode"]


def test_eight_card_mpi_command_dry_run(monkeypatch, capsys, tiny_model, demo_train):
    import gaudi_spawn
    from rlhf.errors import run_cli

    # A Gaudi2 host: 2 sockets x 40 physical cores, Open MPI 4 (Intel's images).
    monkeypatch.setattr(gaudi_spawn, "cpu_topology", lambda: (2, 40))
    monkeypatch.setattr(gaudi_spawn, "openmpi_major_version", lambda mpirun="mpirun": 4)
    script_args = ["--model_name_or_path", tiny_model, "--train_file", demo_train, "--output_dir", "/tmp/x", *SFT_ARGS]
    monkeypatch.setattr(sys, "argv", ["gaudi_spawn.py", "--world_size", "8", "--use_mpi", "--dry_run",
                                      "finetune_clm.py", *script_args])
    assert run_cli(gaudi_spawn.main) == 0
    command = shlex.split(capsys.readouterr().out.strip())
    assert command == ["mpirun", "-n", "8", "--bind-to", "core", "--map-by", "socket:PE=10", "--rank-by", "core",
                       "--report-bindings", "--allow-run-as-root", sys.executable, "finetune_clm.py", *script_args]


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun (openmpi-bin) is not installed")
def test_two_process_mpi_run_builds_gaudi_trainer_on_every_rank(tiny_model, demo_train, tmp_path):
    out = tmp_path / "out"
    result = run_emulated(
        ["gaudi_spawn.py", "--world_size", "2", "--use_mpi", "--master_port", "29561", "finetune_clm.py",
         "--model_name_or_path", tiny_model, "--train_file", demo_train, "--output_dir", str(out), *SFT_ARGS],
        tmp_path / "record", timeout=400,
        extra_env={"OMPI_MCA_rmaps_base_oversubscribe": "1", "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe"},
    )
    check_ok(result)
    assert "mpirun -n 2" in result.stderr
    records = [r for r in read_records(tmp_path / "record") if r["argv"][0].endswith("finetune_clm.py")]
    assert sorted(r["rank"] for r in records) == ["0", "1"]
    for record in records:
        assert len(instances(record, "GaudiTrainer")) == 1
        assert record["calls"]["mark_step"] > 0 and record["calls"]["FusedAdamW"] == 1
    assert (out / "adapter_model.safetensors").is_file()
    state = (out / "trainer_state.json").read_text()
    assert '"global_step": 2' in state
