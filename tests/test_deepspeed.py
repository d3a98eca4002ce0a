"""DeepSpeed ZeRO-2 and ZeRO-3, LoRA and full fine-tune, for SFT, the reward model, DPO and PPO, really run.

Each DeepSpeed run is 2 CPU processes (gloo) on the tiny model, 3 optimizer steps, and is compared
with a plain 2-process ``torchrun`` run of the same settings (one per stage and PEFT mode, shared by
the ZeRO-2 and ZeRO-3 cases):

* the same loss at every step (relative tolerance ``LOSS_RTOL``);
* the final weights, loaded back with ``from_pretrained`` (SFT: the LoRA adapter on the base model,
  or the full model; RM: the merged classifier), equal within ``WEIGHT_ATOL`` (absolute, fp32: a
  tenth of the learning rate, i.e. of one Adam step), and training moved them by ten times more
  (``MIN_CHANGE``), so the comparison can fail;
* no 0-element tensor in any written safetensors file (a ZeRO-3 save from ungathered partitions
  writes such tensors and would otherwise "succeed").

ZeRO-2 uses the shipped ``configs/deepspeed/zero2.json``. ZeRO-3 uses ``tests/configs/zero3_release.json``:
the shipped ``zero3.json`` with limits that make ZeRO-3 release every parameter after use (the
shipped limits keep a tiny model whole and would hide save bugs). The launchers are spread over the
cases: ``deepspeed``, ``torchrun --deepspeed``, ``accelerate launch --use_deepspeed
--deepspeed_config_file`` and ``gaudi_spawn.py --use_deepspeed``.

DeepSpeed builds a C++ shared-memory comm op on first use on CPU (about 60 s); the jobs get
``TORCH_EXTENSIONS_DIR=<venv>/torch_extensions`` (unless already set) and the venv's ``bin`` first on
``PATH`` (its ninja), so it is built once per venv (``make setup-deepspeed`` builds it; ``make test`` builds it beside the
first tests, and a job that starts first waits on torch's build lock) and reused.

PPO (its own loop on the DeepSpeed engine) is killed with SIGKILL after its first checkpoint, resumed,
and compared with an uninterrupted plain run (``test_ppo_zero_killed_resumed_matches_plain_run``).

Also here: a DeepSpeed launch with no config is refused with exit 2 and one line (PPO in a subprocess,
the Trainer stages in-process), and PPO's DeepSpeed config checks.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from ports import free_port

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed is not installed (make setup installs it)")

TRAIN = REPO / "data" / "demo" / "train.jsonl"
TEST = REPO / "data" / "demo" / "test.jsonl"
ZERO = {2: REPO / "configs" / "deepspeed" / "zero2.json", 3: REPO / "tests" / "configs" / "zero3_release.json"}
WORLD = 2
STEPS = 3
TIMEOUT = 600
LEARNING_RATE = 1e-3
LOSS_RTOL = 1e-5
# Partitioned gradients are summed in another order; Adam turns a tiny difference in a near-zero gradient
# into a step of up to the learning rate, so a few weights may differ by a fraction of one step. Measured
# here: 0 to 1e-6, and 4e-5 for the full RM under ZeRO-3. Allowed: a tenth of the learning rate.
WEIGHT_ATOL = LEARNING_RATE / 10
MIN_CHANGE = LEARNING_RATE  # training must move some weight by more than this (a comparison that can fail)

COMMON = ["--max_steps", str(STEPS), "--per_device_train_batch_size", "2", "--learning_rate", str(LEARNING_RATE),
          "--max_train_samples", "48", "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1",
          "--seed", "0"]
SFT_ARGS = [*COMMON, "--train_file", str(TRAIN), "--do_train", "--max_seq_length", "128",
            "--save_strategy", "steps", "--save_steps", str(STEPS)]
RM_ARGS = [*COMMON, "--train_file", str(TRAIN), "--validation_file", str(TEST), "--max_eval_samples", "16",
           "--per_device_eval_batch_size", "8", "--max_length", "128", "--save_strategy", "no",
           "--reward_stats_samples", "8"]
# DPO also samples 2 held-out prompts before and after training (under ZeRO-3: with the weights gathered on every rank)
DPO_ARGS = [*COMMON, "--train_file", str(TRAIN), "--validation_file", str(TEST), "--max_eval_samples", "8",
            "--per_device_eval_batch_size", "4", "--max_length", "128", "--save_strategy", "no",
            "--heldout_samples", "2", "--heldout_max_new_tokens", "8"]

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE", "HF_TOKEN")
BAD_STDERR = re.compile(r"Traceback|terminate called|Aborted|Segmentation fault|\bError\b|error:|"
                        r"[A-Za-z]+Error\b|exited on signal")

# (stage script, ZeRO stage, PEFT mode) -> launcher: each stage under ZeRO-2 and ZeRO-3, LoRA and full
# fine-tune each covered, every launcher used; the RM's ZeRO-3 merged save (the path that wrote empty
# tensors) with both PEFT modes; DPO's frozen reference copy under ZeRO-3 (its own inference engine).
CASES = {
    ("sft", 2, "none"): "gaudi_spawn",
    ("sft", 3, "lora"): "torchrun",
    ("rm", 2, "lora"): "accelerate",
    ("rm", 3, "lora"): "deepspeed",
    ("rm", 3, "none"): "gaudi_spawn",
    ("dpo", 2, "lora"): "deepspeed",
    ("dpo", 3, "lora"): "torchrun",
    ("dpo", 3, "none"): "accelerate",
}
SCRIPTS = {"sft": "finetune_clm.py", "rm": "reward_modeling.py", "dpo": "dpo_training.py"}
STAGE_ARGS = {"sft": SFT_ARGS, "rm": RM_ARGS, "dpo": DPO_ARGS}


def job_env(home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in LAUNCHER_VARS and not key.startswith(("OMPI_", "PMI_", "ACCELERATE_"))}
    venv_bin = str(Path(sys.executable).parent)
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", HF_HOME=str(home), PATH=venv_bin + os.pathsep + env.get("PATH", ""),
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path(sys.prefix) / "torch_extensions"))
    return env


def launch(launcher: str, script: str, args: list[str], zero: int | None, tmp: Path) -> subprocess.CompletedProcess:
    """Run a 2-process job to its end; it must leave no DeepSpeed shared-memory buffer behind (DeepSpeed's CPU
    allreduce creates 69 MB a rank in /dev/shm and never unlinks it; rlhf.distributed's exit hook does)."""
    job = command(launcher, script, args, zero)
    result = subprocess.run(job, cwd=REPO, env=job_env(tmp / "hf_home"), capture_output=True, text=True,
                            timeout=TIMEOUT)
    left = shm_buffers(job)
    assert not left, f"left in /dev/shm: {left}"
    return result


def shm_buffers(job: list[str]) -> list[str]:
    """DeepSpeed's /dev/shm buffers of the job started by ``job`` (found by its master port)."""
    port = next(job[i + 1] for i, word in enumerate(job) if word in ("--master_port", "--main_process_port"))
    return sorted(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def command(launcher: str, script: str, args: list[str], zero: int | None) -> list[str]:
    port = str(free_port())
    config = [] if zero is None else ["--deepspeed", str(ZERO[zero])]
    if launcher == "torchrun":
        prefix = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
                  "--master_addr", "127.0.0.1", "--master_port", port]
    elif launcher == "deepspeed":  # the `deepspeed` command; it passes --local_rank=N to the script
        prefix = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(WORLD), "--master_port", port]
    elif launcher == "gaudi_spawn":  # runs `deepspeed --num_nodes 1 --num_gpus 2 --no_local_rank ...`
        prefix = [sys.executable, "gaudi_spawn.py", "--world_size", str(WORLD), "--use_deepspeed",
                  "--master_port", port]
    elif launcher == "accelerate":  # the config goes to accelerate, not to the script
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--num_processes",
                  str(WORLD), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", port, "--deepspeed_config_file", str(ZERO[zero])]
        config = []
    else:
        raise ValueError(launcher)
    return [*prefix, script, *args, *config]


def assert_clean(result: subprocess.CompletedProcess) -> str:
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    bad = [line for line in result.stderr.splitlines() if BAD_STDERR.search(line)]
    assert not bad, "\n".join(bad[:20]) + "\n---\n" + result.stderr[-4000:]
    assert log.count(f"Backend: cpu (rank 0 of {WORLD})") == 1, log[-4000:]
    return log


def losses(output: Path) -> list[float]:
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return [row["loss"] for row in history if "loss" in row]


def assert_no_empty_tensors(output: Path) -> None:
    from safetensors import safe_open

    files = list(output.rglob("*.safetensors"))
    assert files, f"no safetensors file under {output}"
    for path in files:
        with safe_open(str(path), "pt") as handle:
            empty = [key for key in handle.keys() if math.prod(handle.get_slice(key).get_shape()) == 0]
        assert not empty, f"{path}: 0-element tensors {empty[:5]}"


def load_weights(stage: str, peft: str, output: Path, base: str) -> dict:
    """The trained model as a user loads it, as fp32 CPU tensors by name."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if stage == "rm":  # always the merged classifier
        model = AutoModelForSequenceClassification.from_pretrained(output)
        config = json.loads((output / "config.json").read_text())
        assert math.isfinite(config["reward_mean"]) and config["reward_std"] > 0
    elif peft == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), output)
    else:
        model = AutoModelForCausalLM.from_pretrained(output)
    return {name: tensor.detach().to(torch.float32).clone() for name, tensor in model.state_dict().items()}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:10]
    for name in a:
        assert a[name].shape == b[name].shape, (name, a[name].shape, b[name].shape)
    return max(float((a[name] - b[name]).abs().max()) for name in a)


# ---------------------------------------------------------------------------------------------
# fixtures: the tiny model, and the plain 2-process runs everything is compared with


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deepspeed")


def stage_args(stage: str, peft: str, model: str, output: Path) -> list[str]:
    return ["--model_name_or_path", model, "--output_dir", str(output), "--peft", peft,
            *STAGE_ARGS[stage]]


PARAMETERS = re.compile(r"Parameters: \d+ trainable of \d+")


@pytest.fixture(scope="module")
def plain_run(tiny_model_dir, tmp):
    """``plain_run(stage, peft)``: (output dir, log) of a plain 2-process torchrun run, made once."""
    runs: dict[tuple[str, str], tuple[Path, str]] = {}

    def run(stage: str, peft: str) -> tuple[Path, str]:
        key = (stage, peft)
        if key not in runs:
            output = tmp / f"{stage}-{peft}-plain"
            result = launch("torchrun", SCRIPTS[stage], stage_args(stage, peft, tiny_model_dir, output), None, tmp)
            log = assert_clean(result)
            assert "DeepSpeed ZeRO" not in log
            runs[key] = output, log
        return runs[key]

    return run


# ---------------------------------------------------------------------------------------------
# the DeepSpeed runs


@needs_deepspeed
@pytest.mark.parametrize(("stage", "zero", "peft"), list(CASES), ids=[f"{s}-zero{z}-{p}" for s, z, p in CASES])
def test_zero_matches_plain_run(stage, zero, peft, tiny_model_dir, plain_run, tmp):
    from rlhf.checkpoint import COMPLETE_MARKER

    launcher = CASES[(stage, zero, peft)]
    plain, plain_log = plain_run(stage, peft)
    output = tmp / f"{stage}-{peft}-zero{zero}"
    result = launch(launcher, SCRIPTS[stage], stage_args(stage, peft, tiny_model_dir, output), zero, tmp)
    log = assert_clean(result)
    # DeepSpeed really ran, with the stage asked for, over both processes
    assert f"DeepSpeed ZeRO stage {zero} (" in log and f"), {WORLD} processes" in log, log[-4000:]
    # ZeRO-3 counts real sizes, not the 0-element placeholders (the plain run logs the same line)
    counts = PARAMETERS.findall(log)
    assert len(counts) == 1 and counts == PARAMETERS.findall(plain_log), (counts, PARAMETERS.findall(plain_log))
    trainable, total = map(int, re.findall(r"\d+", counts[0]))
    assert 0 < trainable <= total and (trainable < total) == (peft == "lora")

    # the same loss curve as the plain run
    ours, theirs = losses(output), losses(plain)
    assert len(ours) == len(theirs) == STEPS
    assert ours == pytest.approx(theirs, rel=LOSS_RTOL), (ours, theirs)

    # written weights: no placeholders, loadable with from_pretrained, equal to the plain run's
    assert_no_empty_tensors(output)
    trained = load_weights(stage, peft, output, tiny_model_dir)
    reference = load_weights(stage, peft, plain, tiny_model_dir)
    difference = max_difference(trained, reference)
    print(f"{stage} ZeRO-{zero} {peft} via {launcher}: losses {ours}, max weight difference {difference:.1e}")
    assert difference <= WEIGHT_ATOL
    initial = load_weights("sft", "none", Path(tiny_model_dir), tiny_model_dir) if stage != "rm" else None
    if initial is not None:
        base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in trained.items()}
        moved = max(float((base[k] - initial[k]).abs().max()) for k in initial if k in base)
        if peft == "lora":  # the base stays frozen; the adapter (B starts at 0) moved
            assert moved == 0.0
            assert max(float(v.abs().max()) for k, v in trained.items() if "lora_B" in k) > MIN_CHANGE
        else:
            assert moved > MIN_CHANGE
    if stage == "sft":  # the step-3 checkpoint holds the same weights as the final save
        checkpoint = output / f"checkpoint-{STEPS}"
        assert (checkpoint / COMPLETE_MARKER).is_file()
        assert max_difference(load_weights(stage, peft, checkpoint, tiny_model_dir), trained) == 0.0
    elif stage == "rm":
        assert "Saved the merged reward model" in log
        assert not (output / "adapter_model.safetensors").exists()
    else:  # DPO's held-out samples before training: the same tokens as the plain run's (generated from gathered weights)
        ours, theirs = (json.loads((run / "summary.json").read_text()) for run in (output, plain))
        assert [s["response_before"] for s in ours["samples"]] == [s["response_before"] for s in theirs["samples"]]
        assert len(ours["samples"]) == 2 and math.isfinite(ours["eval_after"]["eval/kl"])


# ---------------------------------------------------------------------------------------------
# PPO under the DeepSpeed engine: killed with SIGKILL after a checkpoint, resumed, compared with a plain run

PPO_STEPS = 6
PPO_ARGS = ["--train_file", str(TRAIN), "--steps", str(PPO_STEPS), "--save_freq", "2", "--batch_size", "4",
            "--mini_batch_size", "1", "--gradient_accumulation_steps", "2", "--ppo_epochs", "2",
            "--output_max_length", "8", "--eval_samples", "2", "--learning_rate", str(LEARNING_RATE),
            "--device", "cpu", "--seed", "0"]
PPO_METRICS = ("objective/raw_scores", "objective/scores", "objective/kl", "objective/kl_coef", "loss/policy",
               "loss/value", "policy/approxkl", "policy/clipfrac", "ppo/grad_norm", "ppo/optimizer_steps")
PPO_CASES = {2: "accelerate", 3: "torchrun"}  # ZeRO stage -> launcher (accelerate: the --use_deepspeed env route)


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir, tmp) -> str:
    """A one-output sequence classifier on the tiny model (random score head), saved with its tokenizer."""
    from rlhf.tiny_model import build_tiny_reward_model

    return build_tiny_reward_model(tiny_model_dir, str(tmp / "reward_model"))


def ppo_args(model: str, reward_model: str, output: Path) -> list[str]:
    return ["--model_name", model, "--reward_model_name", reward_model, "--output_dir", str(output), *PPO_ARGS]


@pytest.fixture(scope="module")
def ppo_plain(tiny_model_dir, reward_model, tmp) -> Path:
    output = tmp / "ppo-plain"
    log = assert_clean(launch("torchrun", "rl_training.py", ppo_args(tiny_model_dir, reward_model, output), None, tmp))
    assert "DeepSpeed ZeRO" not in log
    return output


def ppo_weights(output: Path) -> dict:
    from safetensors.torch import load_file

    return {**load_file(str(output / "adapter_model.safetensors")), **load_file(str(output / "value_head.safetensors"))}


def kill_after_first_checkpoint(command: list[str], output: Path, env: dict) -> None:
    """Start ``command`` (a 2-process launch) and SIGKILL all its processes once a checkpoint is complete."""
    import signal
    import time

    from rlhf.checkpoint import latest_checkpoint

    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while latest_checkpoint(output) is None and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        # The launcher and every worker (torch's elastic agent starts workers in sessions of their own): no
        # handler runs, nothing is flushed.
        import psutil

        launcher = psutil.Process(process.pid)
        workers = launcher.children(recursive=True)
        for proc in [*workers, launcher]:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        process.wait()
        psutil.wait_procs(workers, timeout=30)
        for buffer in shm_buffers(command):  # SIGKILL runs no exit hook: the killed job's buffers stay behind
            os.unlink(buffer)


@needs_deepspeed
@pytest.mark.parametrize("zero", list(PPO_CASES), ids=[f"zero{z}" for z in PPO_CASES])
def test_ppo_zero_killed_resumed_matches_plain_run(zero, tiny_model_dir, reward_model, ppo_plain, tmp):
    """PPO under the DeepSpeed engine (LoRA + value head, 2 processes), killed with SIGKILL after its first
    checkpoint and resumed with --resume_from_checkpoint, against an uninterrupted plain torchrun run of the same
    settings: the same metrics at every step (relative 1e-4; the rows before the kill from the first launch, the
    rest from the resumed one) and the same final adapter and value head (``WEIGHT_ATOL``). Accumulation windows
    (2 minibatches), engine clipping, generation from gathered ZeRO-3 weights, the reward model as a ZeRO-3
    inference engine and the engine's own checkpoint on every rank are all in that path: a resume that lost the
    optimizer state, a rank's RNG or a step, or an engine stepping after every backward, moves the numbers far
    more than the tolerance (measured: metrics within 1e-5 relative, weights within 2e-6)."""
    from rlhf.checkpoint import latest_checkpoint

    launcher = PPO_CASES[zero]
    output = tmp / f"ppo-zero{zero}"
    args = ppo_args(tiny_model_dir, reward_model, output)
    kill_after_first_checkpoint(command(launcher, "rl_training.py", args, zero), output, job_env(tmp / "hf_home"))
    assert not (output / "summary.json").exists(), "the run finished before it could be killed"
    killed_at = json.loads((latest_checkpoint(output) / "run_state.json").read_text())["step"]
    assert 0 < killed_at < PPO_STEPS

    log = assert_clean(launch(launcher, "rl_training.py", [*args, "--resume_from_checkpoint", "true"], zero, tmp))
    assert f"DeepSpeed ZeRO stage {zero} (" in log and f"), {WORLD} processes" in log, log[-4000:]
    assert re.search(rf"Resuming from \S+checkpoint-\d+ at step {killed_at}\b", log), log[-4000:]

    ours = metrics_rows(output)
    theirs = metrics_rows(ppo_plain)
    assert [row["step"] for row in ours] == [row["step"] for row in theirs] == list(range(1, PPO_STEPS + 1))
    for mine, plain in zip(ours, theirs):
        for key in PPO_METRICS:
            assert mine[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-7), (mine["step"], key, mine[key], plain[key])
    assert all(row["ppo/optimizer_steps"] == 4 for row in ours)  # 2 epochs x 2 windows of 2 minibatches

    # the final adapter, value head and merged model: loadable, no placeholders, equal to the plain run's
    assert_no_empty_tensors(output)
    trained, reference = ppo_weights(output), ppo_weights(ppo_plain)
    difference = max_difference(trained, reference)
    print(f"PPO ZeRO-{zero} via {launcher}, killed at step {killed_at}: max weight difference {difference:.1e}")
    assert difference <= WEIGHT_ATOL
    assert max(float(v.abs().max()) for k, v in trained.items() if "lora_B" in k) > MIN_CHANGE
    merged = load_weights("sft", "none", output / "merged", tiny_model_dir)
    assert max_difference(merged, load_weights("sft", "none", ppo_plain / "merged", tiny_model_dir)) <= WEIGHT_ATOL
    assert load_weights("sft", "lora", output, tiny_model_dir)  # the adapter loads onto the base with peft


def metrics_rows(output: Path) -> list[dict]:
    from rlhf.checkpoint import MetricsLog

    return MetricsLog.read(output / "metrics.jsonl")


# ---------------------------------------------------------------------------------------------
# refusals: a DeepSpeed launch that would silently run without DeepSpeed


def test_ppo_refuses_a_deepspeed_launcher_without_config(tmp):
    """``deepspeed rl_training.py ...`` without ``--deepspeed CONFIG`` would train plain DDP and exit 0."""
    env = {**job_env(tmp / "hf_home"), "CROSS_RANK": "0", "CROSS_SIZE": "1", "LOCAL_SIZE": "1"}  # that launcher's
    result = subprocess.run([sys.executable, "rl_training.py", "--model_name", "x", "--reward_fn",
                             "rlhf.demo_rule:rule_reward", "--output_dir", str(tmp / "x")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "started by the deepspeed launcher but without a DeepSpeed config" in lines[0]
    assert not (tmp / "x").exists()


@needs_deepspeed
def test_ppo_deepspeed_config_checks(tmp_path, monkeypatch):
    """PPO fills the config's "auto" values from its own settings and refuses what it cannot honour."""
    from rlhf.errors import UserError
    from rlhf.ppo import PPOConfig
    from rlhf.zero import ppo_deepspeed_plugin

    for name in ("ACCELERATE_USE_DEEPSPEED", "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    config = PPOConfig(batch_size=4, mini_batch_size=1, gradient_accumulation_steps=2, early_stopping=True)
    assert ppo_deepspeed_plugin(None, config, 2, "cpu") is None  # no DeepSpeed asked for
    with pytest.raises(UserError, match="--early_stopping and --gradient_accumulation_steps 2"):
        ppo_deepspeed_plugin(str(ZERO[2]), config, 2, "cpu")
    fixed = json.loads(ZERO[2].read_text())
    fixed["train_micro_batch_size_per_gpu"] = 3
    path = tmp_path / "fixed.json"
    path.write_text(json.dumps(fixed))
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu is 3 but PPO's settings make it 1"):
        ppo_deepspeed_plugin(str(path), PPOConfig(batch_size=4, mini_batch_size=1, gradient_accumulation_steps=2), 2,
                             "cpu")
    with pytest.raises(UserError, match="no such file"):
        ppo_deepspeed_plugin(str(tmp_path / "missing.json"), config, 2, "cpu")


def test_deepspeed_launch_detection():
    from rlhf.distributed import deepspeed_launch

    assert deepspeed_launch({}) is None
    assert deepspeed_launch({"ACCELERATE_USE_DEEPSPEED": "false"}) is None
    assert deepspeed_launch({"ACCELERATE_USE_DEEPSPEED": "true"}) == "accelerate launch --use_deepspeed"
    assert deepspeed_launch({"CROSS_RANK": "0", "CROSS_SIZE": "1", "LOCAL_SIZE": "2"}) == "the deepspeed launcher"
    assert deepspeed_launch({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_SIZE": "2"}) is None  # torchrun-like


def test_setup_refuses_deepspeed_unless_supported(monkeypatch):
    from rlhf.distributed import DistInfo, setup_distributed_env
    from rlhf.errors import UserError

    for env in ({"ACCELERATE_USE_DEEPSPEED": "true"}, {"CROSS_RANK": "0", "CROSS_SIZE": "1", "LOCAL_SIZE": "1"}):
        with pytest.raises(UserError, match="does not run under DeepSpeed"):
            setup_distributed_env(dict(env))
        assert setup_distributed_env(dict(env), supports_deepspeed=True) == DistInfo(0, 0, 1)


def test_trainer_stage_refuses_deepspeed_launcher_without_config(monkeypatch):
    """``deepspeed finetune_clm.py ...`` without ``--deepspeed CONFIG`` would train plain DDP."""
    from rlhf.errors import UserError
    from rlhf.zero import prepare_deepspeed

    args = SimpleNamespace(deepspeed=None, deepspeed_plugin=None)
    for name in ("ACCELERATE_USE_DEEPSPEED", "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert prepare_deepspeed(args) == 0
    for name, value in (("CROSS_RANK", "0"), ("CROSS_SIZE", "1"), ("LOCAL_SIZE", "2")):
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match="without a DeepSpeed config.*--deepspeed configs/deepspeed/zero2.json"):
        prepare_deepspeed(args)


@needs_deepspeed
def test_build_ops_fills_the_cache_the_jobs_use(monkeypatch, tmp):
    """``make setup-deepspeed`` and ``make test`` run ``python -m rlhf.deepspeed_ops`` with the jobs' TORCH_EXTENSIONS_DIR and PATH."""
    from rlhf.deepspeed_ops import build_ops

    env = job_env(tmp / "hf_home")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", env["TORCH_EXTENSIONS_DIR"])
    monkeypatch.setenv("PATH", env["PATH"])
    message = build_ops()
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        assert message == "built deepspeed_shm_comm"
        assert list(Path(env["TORCH_EXTENSIONS_DIR"]).rglob("deepspeed_shm_comm*.so"))


def test_one_process_gets_a_group_env(monkeypatch):
    """``python finetune_clm.py --deepspeed ...`` with no launcher: a 1-process group, not MPI discovery."""
    from rlhf.zero import _one_process_group_env

    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    # A private copy of the environment: what _one_process_group_env sets must not leak into later tests
    # (monkeypatch.delenv of an unset variable restores nothing, and a leaked RANK/MASTER_PORT makes every
    # later subprocess start a process group on that port).
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in names})
    _one_process_group_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert int(os.environ["MASTER_PORT"]) > 0
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "1234")
    _one_process_group_env()  # a launcher's variables are left alone
    assert (os.environ["RANK"], os.environ["MASTER_PORT"]) == ("1", "1234")


@needs_deepspeed
def test_zero3_config_must_gather_weights_on_save(tmp_path):
    from transformers import TrainingArguments

    from rlhf.errors import UserError
    from rlhf.zero import prepare_deepspeed

    config = json.loads(ZERO[3].read_text())
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    path = tmp_path / "no_gather.json"
    path.write_text(json.dumps(config))
    args = TrainingArguments(output_dir=str(tmp_path), deepspeed=str(path), report_to="none", use_cpu=True)
    with pytest.raises(UserError, match="stage3_gather_16bit_weights_on_model_save: true"):
        prepare_deepspeed(args)


def test_release_config_is_the_shipped_zero3_with_release_limits():
    shipped = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    test = json.loads(ZERO[3].read_text())
    forced = {"stage3_max_live_parameters": 1000, "stage3_max_reuse_distance": 0,
              "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 1000}
    assert {k: test["zero_optimization"][k] for k in forced} == forced
    for key in forced:
        shipped["zero_optimization"][key] = test["zero_optimization"][key]
    assert test == shipped


# ---------------------------------------------------------------------------------------------
# never write placeholders (in-process)


def test_placeholder_weights_are_refused(tmp_path):
    import torch

    from rlhf.zero import PlaceholderWeights, check_no_placeholders

    check_no_placeholders({"a": torch.ones(2), "b": torch.zeros(1)}, "x")
    with pytest.raises(PlaceholderWeights, match="1 tensor\\(s\\) have 0 elements \\(b\\)"):
        check_no_placeholders({"a": torch.ones(2), "b": torch.empty(0)}, "x")


def test_reward_model_save_refuses_placeholders(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoTokenizer

    from rlhf.modeling import load_sequence_classifier
    from rlhf.reward import save_reward_model
    from rlhf.zero import PlaceholderWeights

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_sequence_classifier(tiny_model_dir, tokenizer)
    model.score.weight.data = torch.empty(0)  # what rank 0 sees of a released ZeRO-3 parameter
    with pytest.raises(PlaceholderWeights, match="score.weight"):
        save_reward_model(model, tokenizer, str(tmp_path / "rm"), 0.0, 1.0)
    assert not (tmp_path / "rm" / "model.safetensors").exists()


def test_count_parameters_counts_zero3_placeholders():
    import torch

    from rlhf.modeling import count_parameters

    layer = torch.nn.Linear(4, 3)
    layer.weight.data = torch.empty(0)
    layer.weight.ds_numel = 12  # as deepspeed.zero.Init leaves it
    layer.bias.requires_grad_(False)
    assert count_parameters(layer) == (12, 15)


# ---------------------------------------------------------------------------------------------
# the memory table in docs/distributed.md


def test_parameter_counts_are_llama2s():
    from rlhf.zero_memory import LLAMA2

    assert [shape.causal_lm() for shape in LLAMA2] == [6_738_415_616, 13_015_864_320, 68_976_648_192]
    seven = LLAMA2[0]
    assert seven.lora() == 32 * 4 * 8 * (4096 + 4096)  # r 8 on four 4096x4096 projections per layer
    assert seven.classifier() == seven.causal_lm() - 32000 * 4096 + 4096


def test_model_states_formula():
    from rlhf.zero_memory import model_states_bytes

    n = 1000
    assert model_states_bytes(n, n, 8, 2) == 2 * n + 14 * n / 8  # 16-bit params replicated
    assert model_states_bytes(n, n, 8, 3) == 16 * n / 8  # everything partitioned
    assert model_states_bytes(n + 10, 10, 8, 2) == 2 * (n + 10) + 14 * 10 / 8  # LoRA: frozen base, 16 B/trainable
    assert model_states_bytes(n, n, 1, 2) == model_states_bytes(n, n, 1, 3) == 16 * n


@needs_deepspeed
def test_formula_against_deepspeed_estimators():
    """DeepSpeed's estimators count 18 bytes per parameter partitioned where the formula has 14 (ZeRO-2:
    gradient + Adam) or 16 (ZeRO-3: also the 16-bit weights), and for ZeRO-3 the largest layer in fp32."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from rlhf.zero_memory import LLAMA2, model_states_bytes

    for devices in (8, 16):
        for shape in LLAMA2:
            n, largest = shape.causal_lm(), shape.largest_layer()
            _, zero2 = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=devices, cpu_offload=False)
            _, zero3, _ = estimate_zero3_model_states_mem_needs(n, largest, num_gpus_per_node=devices,
                                                                cpu_offload=False, cpu_offload_params=False)
            assert zero2 - model_states_bytes(n, n, devices, 2) == pytest.approx(4 * n / devices, abs=1)
            assert zero3 - model_states_bytes(n, n, devices, 3) == pytest.approx(2 * n / devices + 4 * largest, abs=1)


def test_docs_hold_the_current_table():
    from rlhf.zero_memory import memory_table

    assert memory_table() in (REPO / "docs" / "distributed.md").read_text()


def test_nonfinite_parameter_checks_zero3_partitions():
    """The checkpoint guard looks at a ZeRO-3 parameter's own partition (``ds_tensor``), not its 0-element placeholder."""
    import torch

    from rlhf.zero import nonfinite_parameter

    layer = torch.nn.Linear(4, 3)
    assert nonfinite_parameter(layer) is None
    layer.weight.data = torch.empty(0)
    layer.weight.ds_id = 0
    layer.weight.ds_tensor = torch.tensor([1.0, float("nan")])
    assert nonfinite_parameter(layer) == "weight"
    layer.weight.ds_tensor = torch.ones(2)
    layer.bias.data[0] = float("inf")
    assert nonfinite_parameter(layer) == "bias"
    layer.bias.requires_grad_(False)  # frozen weights are not checked
    assert nonfinite_parameter(layer) is None
