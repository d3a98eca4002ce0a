"""The three training stages as 2-process jobs on CPU (gloo), through each launcher users use.

* ``torchrun --nproc_per_node 2`` (``python -m torch.distributed.run``): SFT, RM, PPO;
* ``python gaudi_spawn.py --world_size 2 --use_mpi`` (``mpirun``; workers map the Open MPI variables
  with ``rlhf.distributed.setup_distributed_env``): SFT, RM, PPO; skipped without Open MPI or 2 CPUs;
* ``accelerate launch --multi_gpu --num_processes 2`` (accelerate's multi-process launcher; on a
  machine without GPUs it starts CPU processes and the scripts use gloo): PPO.

Each run checks what only a real multi-process run can get wrong: the exit status, no traceback or
abort on stderr, outputs written once by rank 0 (one log line per event, one metrics row per step,
the same files as a single-process run), and that both ranks took part (the Trainer's epoch counts
2 x per-device batch samples per step; PPO's summary says world size 2). Tiny model, a few steps.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ports import free_port

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TRAIN = REPO / "data" / "demo" / "train.jsonl"
TEST = REPO / "data" / "demo" / "test.jsonl"
WORLD = 2
TIMEOUT = 300
QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1"]

SFT_STEPS, SFT_BATCH = 4, 2
SFT_ARGS = [
    "--train_file", str(TRAIN), "--validation_file", str(TEST), "--do_train", "--do_eval",
    "--max_steps", str(SFT_STEPS), "--per_device_train_batch_size", str(SFT_BATCH),
    "--per_device_eval_batch_size", "16", "--max_eval_samples", "32", "--learning_rate", "1e-3",
    "--save_strategy", "steps", "--save_steps", "2", *QUIET,
]
RM_STEPS, RM_BATCH = 4, 4
RM_ARGS = [
    "--train_file", str(TRAIN), "--validation_file", str(TEST), "--max_steps", str(RM_STEPS),
    "--per_device_train_batch_size", str(RM_BATCH), "--per_device_eval_batch_size", "32",
    "--save_strategy", "no", "--reward_stats_samples", "16", *QUIET,
]
PPO_STEPS = 2
PPO_ARGS = [
    "--train_file", str(TRAIN), "--steps", str(PPO_STEPS), "--batch_size", "4", "--mini_batch_size", "2",
    "--gradient_accumulation_steps", "1", "--ppo_epochs", "2", "--output_max_length", "8", "--eval_samples", "4",
    "--device", "cpu",
]

SFT_FILES = {"adapter_config.json", "adapter_model.safetensors", "all_results.json", "train_results.json",
             "eval_results.json", "trainer_state.json", "training_curves.png", "tokenizer_config.json"}
RM_FILES = {"config.json", "model.safetensors", "all_results.json", "train_results.json", "eval_results.json",
            "trainer_state.json", "training_curves.png", "tokenizer_config.json"}
PPO_FILES = {"adapter_config.json", "adapter_model.safetensors", "value_head.safetensors", "metrics.jsonl",
             "summary.json", "eval_samples.jsonl", "eval_before.json", "training_curves.png", "merged"}

# A launcher variable left in the test's own environment would change what the job sees.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "ACCELERATE_USE_CPU", "HF_TOKEN")
BAD_STDERR = re.compile(r"Traceback|terminate called|Aborted|Segmentation fault|\bError\b|error:|"
                        r"[A-Za-z]+Error\b|exited on signal")


def _have_open_mpi() -> str | None:
    """None if ``gaudi_spawn.py --use_mpi`` can run 2 ranks here, else why not."""
    if shutil.which("mpirun") is None:
        return "mpirun not installed (Debian/Ubuntu: apt-get install openmpi-bin)"
    import gaudi_spawn

    if gaudi_spawn.openmpi_major_version() is None:
        return "mpirun on PATH is not Open MPI, whose options gaudi_spawn.py uses"
    if len(os.sched_getaffinity(0)) < WORLD:
        return f"needs {WORLD} CPUs: mpirun --bind-to core places one rank per core"
    return None


MPI_MISSING = _have_open_mpi()
needs_mpi = pytest.mark.skipif(MPI_MISSING is not None, reason=str(MPI_MISSING))


def job_env(home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in LAUNCHER_VARS and not key.startswith(("OMPI_", "PMI_", "PMIX_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", HF_HOME=str(home))  # HF_HOME: no user accelerate config is read
    return env


def launch(launcher: str, script: str, args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    port = str(free_port())
    if launcher == "torchrun":
        prefix = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
                  "--master_addr", "127.0.0.1", "--master_port", port]
    elif launcher == "mpi":
        prefix = [sys.executable, "gaudi_spawn.py", "--world_size", str(WORLD), "--use_mpi", "--master_port", port]
    elif launcher == "accelerate":
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", port]
    elif launcher == "single":
        prefix = [sys.executable]
    else:
        raise ValueError(launcher)
    return subprocess.run([*prefix, script, *args], cwd=REPO, env=job_env(tmp / "hf_home"), capture_output=True,
                          text=True, timeout=TIMEOUT)


def assert_clean(result: subprocess.CompletedProcess, world: int = WORLD) -> str:
    """Exit 0, nothing alarming on stderr, rank 0 alone logs. Returns stdout + stderr."""
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    bad = [line for line in result.stderr.splitlines() if BAD_STDERR.search(line)]
    assert not bad, "\n".join(bad[:20]) + "\n---\n" + result.stderr[-4000:]
    # rlhf's INFO lines come from rank 0 only (other ranks log at warning level)
    assert log.count(f"Backend: cpu (rank 0 of {world})") == 1, log[-4000:]
    for rank in range(1, world):
        assert f"(rank {rank} of {world})" not in log, log[-4000:]
    return log


def steps_per_epoch(samples: int, batch: int, world: int) -> int:
    """Batches per epoch on each rank: DistributedSampler pads to ceil(samples / world) per rank."""
    return math.ceil(math.ceil(samples / world) / batch)


def check_trainer_run(output: Path, log: str, steps: int, batch: int, files: set[str]) -> dict:
    names = {p.name for p in output.iterdir()}
    assert files <= names, sorted(names)
    assert not [n for n in names if re.search(r"rank[_-]?1|\.tmp|partial", n)], sorted(names)
    results = json.loads((output / "all_results.json").read_text())
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    losses = [row for row in state["log_history"] if "loss" in row]
    assert [row["step"] for row in losses] == list(range(1, steps + 1))  # logged once per step
    assert all(math.isfinite(row["loss"]) for row in losses)
    # Both ranks consumed data: each optimizer step took WORLD x batch samples.
    expected_epoch = steps / steps_per_epoch(results["train_samples"], batch, WORLD)
    assert state["epoch"] == pytest.approx(expected_epoch, rel=1e-3), (state["epoch"], expected_epoch)
    assert state["epoch"] != pytest.approx(steps / steps_per_epoch(results["train_samples"], batch, 1), rel=1e-3)
    assert log.count("***** train metrics *****") == 1
    assert log.count("***** eval metrics *****") == 1
    return results


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multiprocess")


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir, tmp) -> str:
    """A one-output sequence classifier on the tiny model (random score head), saved with its tokenizer."""
    from rlhf.tiny_model import build_tiny_reward_model

    return build_tiny_reward_model(tiny_model_dir, str(tmp / "reward_model"))


@pytest.fixture(scope="module")
def ppo_single(tiny_model_dir, reward_model, tmp) -> Path:
    """The same PPO run as one process: what a 2-process run is compared with."""
    output = tmp / "ppo-single"
    result = launch("single", "rl_training.py", [*ppo_flags(tiny_model_dir, reward_model), "--output_dir",
                                                 str(output)], tmp)
    assert_clean(result, world=1)
    return output


def ppo_flags(model: str, reward_model: str) -> list[str]:
    return ["--model_name", model, "--reward_model_name", reward_model, *PPO_ARGS]


# ---------------------------------------------------------------------------------------------
# SFT and reward model (transformers Trainer: DistributedSampler, DDP, rank-0 saves)

LAUNCHERS = ["torchrun", pytest.param("mpi", marks=needs_mpi)]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_sft_two_processes(launcher, tiny_model_dir, tmp):
    output = tmp / f"sft-{launcher}"
    result = launch(launcher, "finetune_clm.py",
                    ["--model_name_or_path", tiny_model_dir, "--output_dir", str(output), *SFT_ARGS], tmp)
    log = assert_clean(result)
    results = check_trainer_run(output, log, SFT_STEPS, SFT_BATCH, SFT_FILES)
    assert math.isfinite(results["train_loss"]) and math.isfinite(results["perplexity"])
    assert results["eval_samples"] == 32
    # checkpoints from a multi-process run: one per save, each with every rank's RNG state
    checkpoints = sorted(p.name for p in output.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    for name in checkpoints:
        saved = {p.name for p in (output / name).iterdir()}
        assert {"trainer_state.json", "adapter_model.safetensors", "rng_state_0.pth", "rng_state_1.pth"} <= saved


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_reward_model_two_processes(launcher, tiny_model_dir, tmp):
    output = tmp / f"rm-{launcher}"
    result = launch(launcher, "reward_modeling.py",
                    ["--model_name_or_path", tiny_model_dir, "--output_dir", str(output), *RM_ARGS], tmp)
    log = assert_clean(result)
    results = check_trainer_run(output, log, RM_STEPS, RM_BATCH, RM_FILES)
    # evaluation gathered every held-out pair from both ranks (no duplicates, none missing)
    assert results["eval_samples"] == len(TEST.read_text().splitlines())
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    config = json.loads((output / "config.json").read_text())
    assert len(config["id2label"]) == 1  # the merged one-output classifier PPO loads
    assert math.isfinite(config["reward_mean"]) and config["reward_std"] > 0


# ---------------------------------------------------------------------------------------------
# PPO (accelerate: DDP, per-rank prompt shards, stats reduced across ranks, rank-0 outputs)


def check_ppo_run(output: Path, log: str, single: Path) -> None:
    names = {p.name for p in output.iterdir()}
    assert PPO_FILES <= names, sorted(names)
    assert names == {p.name for p in single.iterdir()}  # the same files as a single-process run
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    single_rows = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, PPO_STEPS + 1))  # one row per step: rank 0 alone
    assert [sorted(row) for row in rows] == [sorted(row) for row in single_rows]
    for row in rows:
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row
        assert row["ppo/minibatches"] == 2 * 2  # per rank: batch 4 / mini-batch 2, x 2 PPO epochs
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == PPO_STEPS and summary["world_size"] == WORLD
    assert set(summary["eval_after"]) == set(json.loads((single / "summary.json").read_text())["eval_after"])
    assert len((output / "eval_samples.jsonl").read_text().splitlines()) == 4
    # prompts are sharded: each rank gets half of the training prompts (400 rows - 4 held out)
    assert f"PPO: {PPO_STEPS} steps of 4 rollouts x {WORLD} processes (198 prompts per process)" in log
    assert log.count("Done: ") == 1


@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("mpi", marks=needs_mpi), "accelerate"])
def test_ppo_two_processes(launcher, tiny_model_dir, reward_model, ppo_single, tmp):
    output = tmp / f"ppo-{launcher}"
    result = launch(launcher, "rl_training.py",
                    [*ppo_flags(tiny_model_dir, reward_model), "--output_dir", str(output)], tmp)
    log = assert_clean(result)
    check_ppo_run(output, log, ppo_single)


def test_ppo_prompt_shards_are_disjoint_and_equal(tiny_model_dir, tmp):
    """An odd number of prompts still gives every rank the same number of steps (no rank waits forever)."""
    import rl_training
    from rlhf.data import DataArguments
    from rlhf.modeling import load_tokenizer
    from rlhf.ppo import PPOConfig

    rows = [json.loads(line) for line in TRAIN.read_text().splitlines()[:9]]
    data = tmp / "nine.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    config = PPOConfig(batch_size=2, mini_batch_size=1, gradient_accumulation_steps=1)
    data_args = DataArguments(train_file=str(data))
    shards = [rl_training.load_prompts(data_args, config, 0, tokenizer, WORLD, rank)[0] for rank in range(WORLD)]
    single = rl_training.load_prompts(data_args, config, 0, tokenizer, 1, 0)[0]
    assert len(single) == 9
    assert [len(shard) for shard in shards] == [4, 4]
    assert shards == [single[0:8:2], single[1:8:2]]  # interleaved, disjoint, the 9th prompt dropped
