"""Reliability of the three stages: interruption, bad input, bad numbers, output safety, secrets.

One test per failure kind, each over the stages it concerns:

- SIGKILL at a random moment after the first checkpoint, then resume: same step count and (CPU,
  fixed seed) the same final weights as an uninterrupted run (SFT, RM, PPO);
- SIGTERM / SIGINT: exit 128+N, one line saying how to resume, a complete checkpoint, no final
  model written as if training had finished; resuming completes;
- a half-written checkpoint is skipped by ``--resume_from_checkpoint true``, refused when named;
- non-finite loss / reward: exit 3 naming the step and the quantity, or skipped by option;
- a non-empty output_dir of another run is refused, user files are never deleted;
- bad input exits 2 with one line before any model is built; a tokenizer without pad token works;
- secrets never reach the outputs; weights are only loaded safely;
- the same user mistake given to every stage (SFT, RM, DPO, PPO, merge): a misspelt or unparsable
  config file, LoRA rank 0, LoRA targets the model lacks, a damaged checkpoint, a split that leaves
  no training row, identical preference pairs, an output path that is a file: exit 2, one line, no
  traceback, no model loaded and earlier outputs intact (issue 26).

The uninterrupted reference runs are module-scoped and shared. Runs whose exit code or signal
handling matters are subprocesses; the rest run in-process through ``run_cli(main)``.
"""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.checkpoint import COMPLETE_MARKER, is_complete
from rlhf.errors import run_cli

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dpo_training  # noqa: E402
import finetune_clm  # noqa: E402
import gaudi_spawn  # noqa: E402
import merge_peft_adapter  # noqa: E402
import reward_modeling  # noqa: E402
import rl_training  # noqa: E402

SECRET = "hf_RELIABILITYsecret1234567890"
ATOL = 1e-5
SCRIPTS = {"sft": "finetune_clm.py", "rm": "reward_modeling.py", "ppo": "rl_training.py", "dpo": "dpo_training.py",
           "merge": "merge_peft_adapter.py"}
MODULES = {"sft": finetune_clm, "rm": reward_modeling, "ppo": rl_training, "dpo": dpo_training,
           "merge": merge_peft_adapter}
FINAL_WEIGHTS = {
    "sft": ["adapter_model.safetensors"],
    "rm": ["model.safetensors"],
    "ppo": ["adapter_model.safetensors", "value_head.safetensors"],
}
TOTAL_STEPS = {"sft": 20, "rm": 20, "ppo": 16}  # long enough that a kill lands mid-training (7-9 more checkpoints after the first)


def clean_env(**extra: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("HF_TOKEN", None)
    env.update(extra)
    return env


# ---------------------------------------------------------------- shared inputs and reference runs


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join((REPO / "data" / "demo" / "train.jsonl").read_text().splitlines(keepends=True)[:40]))
    return str(path)


def stage_args(stage: str, model: str, data: str, reward_model: str | None = None) -> list[str]:
    """Small CPU runs: ``TOTAL_STEPS`` steps, a checkpoint every 2 steps, fixed seed."""
    trainer = ["--train_file", data, "--device", "cpu", "--report_to", "none", "--disable_tqdm", "true",
               "--logging_steps", "1", "--per_device_train_batch_size", "2", "--seed", "0",
               "--max_steps", str(TOTAL_STEPS[stage]), "--save_steps", "2"]
    if stage == "sft":
        return ["--model_name_or_path", model, "--do_train", *trainer]
    if stage == "rm":
        return ["--model_name_or_path", model, "--validation_split_percentage", "10", "--reward_stats_samples", "4",
                *trainer]
    return ["--model_name", model, "--reward_model_name", reward_model, "--train_file", data, "--device", "cpu",
            "--batch_size", "4", "--mini_batch_size", "2", "--gradient_accumulation_steps", "1", "--ppo_epochs", "1",
            "--output_max_length", "8", "--steps", str(TOTAL_STEPS["ppo"]), "--save_freq", "2", "--eval_samples", "0",
            "--batched_gen", "True", "--seed", "0", "--num_train_epochs", "5"]


def run(stage: str, args: list[str], output_dir: Path, env: dict | None = None, timeout: int = 300):
    return subprocess.run(
        [sys.executable, SCRIPTS[stage], *args, "--output_dir", str(output_dir)], cwd=REPO,
        env=env or clean_env(), capture_output=True, text=True, timeout=timeout,
    )


class Reference:
    def __init__(self, stage: str, args: list[str], output_dir: Path, result):
        self.stage, self.args, self.output_dir, self.result = stage, args, output_dir, result


@pytest.fixture(scope="module")
def references(tiny_model_dir, small_data, tmp_path_factory):
    """Uninterrupted runs of each stage, built lazily and once. The SFT one passes the token on the
    command line, RM and PPO get it from HF_TOKEN: the secrets test reads all three."""
    root = tmp_path_factory.mktemp("reference")
    built: dict[str, Reference] = {}

    def get(stage: str) -> Reference:
        if stage in built:
            return built[stage]
        reward_model = str(get("rm").output_dir) if stage == "ppo" else None
        args = stage_args(stage, tiny_model_dir, small_data, reward_model)
        extra = ["--hf_access_token", SECRET] if stage == "sft" else []
        env = clean_env() if stage == "sft" else clean_env(HF_TOKEN=SECRET)
        result = run(stage, args + extra, root / stage, env=env)
        assert result.returncode == 0, result.stderr[-4000:]
        built[stage] = Reference(stage, args, root / stage, result)
        return built[stage]

    return get


# ---------------------------------------------------------------- helpers for interrupted runs


def launch(stage: str, args: list[str], output_dir: Path, logs: Path) -> subprocess.Popen:
    logs.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, SCRIPTS[stage], *args, "--output_dir", str(output_dir)], cwd=REPO, env=clean_env(),
        stdout=(logs / "stdout").open("w"), stderr=(logs / "stderr").open("w"),
    )


def complete_checkpoints(output_dir: Path) -> list[Path]:
    return sorted((p for p in output_dir.glob("checkpoint-*") if is_complete(p)), key=lambda p: int(p.name.split("-")[1]))


def interrupt_after_first_checkpoint(proc: subprocess.Popen, output_dir: Path, logs: Path, signum: int) -> float:
    """Wait for a complete checkpoint, wait a random moment more, then send ``signum``. Returns the delay."""
    deadline = time.monotonic() + 240
    while not complete_checkpoints(output_dir):
        if proc.poll() is not None:
            pytest.fail(f"run ended (exit {proc.returncode}) before any checkpoint:\n{(logs / 'stderr').read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no checkpoint within 240 s")
        time.sleep(0.05)
    delay = random.uniform(0.0, 0.2)
    time.sleep(delay)
    assert proc.poll() is None, f"the run finished before the signal (delay {delay:.2f}s); make it longer"
    proc.send_signal(signum)
    proc.wait(timeout=240)
    return delay


def assert_same_final_weights(reference: Reference, output_dir: Path, context: str) -> None:
    for name in FINAL_WEIGHTS[reference.stage]:
        expected, got = load_file(str(reference.output_dir / name)), load_file(str(output_dir / name))
        assert expected.keys() == got.keys(), name
        for key in expected:
            assert torch.allclose(expected[key], got[key], atol=ATOL), f"{name}:{key} differs ({context})"


def assert_step_count(stage: str, output_dir: Path) -> None:
    if stage == "ppo":
        steps = [row["step"] for row in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines())]
        assert steps == list(range(1, TOTAL_STEPS["ppo"] + 1)), steps  # none missing, none twice
        assert json.loads((output_dir / "summary.json").read_text())["steps"] == TOTAL_STEPS["ppo"]
    else:
        assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == TOTAL_STEPS[stage]


def message_line(stderr: str, script: str) -> str:
    """run_cli's one line: the only stderr line that holds ``<script>: `` (PPO's progress bar is not
    closed before it, so it can follow the bar's last redraw on the same line, or be followed by one)."""
    lines = [line[line.index(f"{script}: "):] for line in stderr.replace("\r", "\n").splitlines()
             if f"{script}: " in line]
    assert len(lines) == 1, stderr[-4000:]
    return lines[0]


def looks_finished(stage: str, output_dir: Path) -> bool:
    names = {"sft": ["adapter_model.safetensors", "all_results.json"], "rm": ["model.safetensors", "all_results.json"],
             "ppo": ["adapter_model.safetensors", "summary.json", "merged"]}[stage]
    return any((output_dir / name).exists() for name in names)


# ---------------------------------------------------------------- interruption


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_sigkill_at_random_moment_then_resume_matches_uninterrupted_run(stage, references, tmp_path):
    reference = references(stage)
    output_dir = tmp_path / "out"
    proc = launch(stage, reference.args, output_dir, tmp_path / "killed")
    delay = interrupt_after_first_checkpoint(proc, output_dir, tmp_path / "killed", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not looks_finished(stage, output_dir)

    resumed = run(stage, [*reference.args, "--resume_from_checkpoint"], output_dir)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_step_count(stage, output_dir)
    assert_same_final_weights(reference, output_dir, f"killed {delay:.2f}s after the first checkpoint")


@pytest.mark.parametrize("stage, signum", [("sft", signal.SIGTERM), ("rm", signal.SIGINT), ("ppo", signal.SIGTERM)])
def test_signal_checkpoints_exits_128_plus_n_and_resumes(stage, signum, references, tmp_path):
    reference = references(stage)
    output_dir = tmp_path / "out"
    logs = tmp_path / "signalled"
    proc = launch(stage, reference.args, output_dir, logs)
    interrupt_after_first_checkpoint(proc, output_dir, logs, signum)
    stderr = (logs / "stderr").read_text()
    assert proc.returncode == 128 + signum, stderr[-4000:]
    assert "Traceback" not in stderr
    line = message_line(stderr, SCRIPTS[stage])
    assert line.startswith(f"{SCRIPTS[stage]}: interrupted: checkpoint "), line
    assert "resume with the same command plus --resume_from_checkpoint" in line
    checkpoint = Path(line.split("checkpoint ", 1)[1].split(" written at step ")[0])
    step = int(line.split(" written at step ")[1].split(";")[0])
    assert checkpoint == output_dir / f"checkpoint-{step}" and is_complete(checkpoint)
    assert complete_checkpoints(output_dir)[-1] == checkpoint
    assert not looks_finished(stage, output_dir)  # not saved as if training had finished

    resumed = run(stage, [*reference.args, "--resume_from_checkpoint"], output_dir)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_step_count(stage, output_dir)
    assert_same_final_weights(reference, output_dir, f"{signal.Signals(signum).name} at step {step}")


def test_half_written_checkpoint_is_skipped_and_refused_by_name(references, tmp_path, monkeypatch, capsys, caplog):
    """A checkpoint without its COMPLETE marker (killed while saving): `true` takes the one before
    with a warning and the run finishes like the uninterrupted one; naming it is a user error."""
    reference = references("sft")
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    shutil.copytree(reference.output_dir / "checkpoint-2", output_dir / "checkpoint-2")
    shutil.copytree(reference.output_dir / "checkpoint-4", output_dir / "checkpoint-4")
    (output_dir / "checkpoint-4" / COMPLETE_MARKER).unlink()
    (output_dir / "checkpoint-4" / "optimizer.pt").write_bytes(b"half")

    code, err = run_in_process(monkeypatch, capsys, "sft", [*reference.args, "--output_dir", str(output_dir),
                                                            "--resume_from_checkpoint", str(output_dir / "checkpoint-4")])
    assert code == 2 and "incomplete" in err.strip().splitlines()[-1], err

    code, err = run_in_process(monkeypatch, capsys, "sft", [*reference.args, "--output_dir", str(output_dir),
                                                            "--resume_from_checkpoint"])
    assert code == 0, err
    assert "Skipping incomplete checkpoint" in caplog.text and "checkpoint-4" in caplog.text
    assert "Resuming from" in caplog.text and str(output_dir / "checkpoint-2") in caplog.text
    assert_step_count("sft", output_dir)
    assert_same_final_weights(reference, output_dir, "resumed past a half-written checkpoint")
    assert is_complete(output_dir / "checkpoint-4")  # written again, complete this time


# ---------------------------------------------------------------- bad numbers


def run_in_process(monkeypatch, capsys, stage: str, argv: list[str]) -> tuple[int, str]:
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(sys, "argv", [SCRIPTS[stage], *argv])
    capsys.readouterr()
    code = run_cli(MODULES[stage].main)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_nonfinite_loss_stops_with_exit_3_or_is_skipped(stage, tiny_model_dir, small_data, tmp_path, monkeypatch, capsys):
    """--learning_rate 1e30 makes the weights explode after step 1, the loss is NaN at step 2."""
    args = [a if a != "8" else "4" for a in stage_args(stage, tiny_model_dir, small_data)] + [
        "--save_steps", "1", "--learning_rate", "1e30", "--output_dir", str(tmp_path / "out")]
    code, err = run_in_process(monkeypatch, capsys, stage, args)
    line = err.strip().splitlines()[-1]
    assert code == 3, err[-3000:]
    assert line.startswith(f"{SCRIPTS[stage]}: stopped: training loss is nan at step 2"), line
    assert "--skip_nonfinite_batches" in line
    assert [p.name for p in complete_checkpoints(tmp_path / "out")] == ["checkpoint-1"]  # the last one is kept
    assert not looks_finished(stage, tmp_path / "out")

    code, err = run_in_process(monkeypatch, capsys, stage, [*args, "--skip_nonfinite_batches", "--overwrite_output_dir"])
    assert code == 0, err[-3000:]
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert results["train_skipped_nonfinite_batches"] == TOTAL_STEPS[stage] - 1  # every step after the first


def test_nonfinite_reward_stops_ppo_with_exit_3_or_is_skipped(references, tiny_model_dir, small_data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    nan_rm = tmp_path / "nan_rm"
    model = AutoModelForSequenceClassification.from_pretrained(str(references("rm").output_dir))
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(nan_rm)
    for tokenizer_file in references("rm").output_dir.glob("tokenizer*"):
        shutil.copy(tokenizer_file, nan_rm)
    args = stage_args("ppo", tiny_model_dir, small_data, str(nan_rm))

    stopped = run("ppo", args, tmp_path / "out")
    assert stopped.returncode == 3, stopped.stderr[-4000:]
    assert "Traceback" not in stopped.stderr
    line = message_line(stopped.stderr, "rl_training.py")
    assert line.startswith("rl_training.py: stopped: reward") and "step 1" in line and "--skip_nonfinite_rewards" in line

    user_file = tmp_path / "out" / "notes.txt"
    user_file.write_text("mine")
    skipped = run("ppo", [*args, "--skip_nonfinite_rewards", "--overwrite_output_dir"], tmp_path / "out")
    assert skipped.returncode == 0, skipped.stderr[-4000:]
    assert "non-finite reward" in skipped.stdout + skipped.stderr
    assert user_file.read_text() == "mine"  # --overwrite_output_dir writes over, deletes nothing


# ---------------------------------------------------------------- output safety


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_output_dir_of_another_run_is_refused_and_left_alone(stage, tiny_model_dir, small_data, tmp_path, monkeypatch,
                                                               capsys):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    (output_dir / "checkpoint-7").mkdir()  # another run's
    before = sorted(p.relative_to(output_dir) for p in output_dir.rglob("*"))
    code, err = run_in_process(monkeypatch, capsys, stage, [
        *stage_args(stage, tiny_model_dir, small_data, tiny_model_dir), "--output_dir", str(output_dir)])
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert "--overwrite_output_dir" in line and "--resume_from_checkpoint" in line, line
    assert sorted(p.relative_to(output_dir) for p in output_dir.rglob("*")) == before
    assert (output_dir / "notes.txt").read_text() == "mine"


def test_overwrite_writes_over_and_never_deletes_user_files(tiny_model_dir, small_data, tmp_path, monkeypatch, capsys):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    (output_dir / "data").mkdir()
    (output_dir / "data" / "keep.jsonl").write_text("{}\n")
    args = [a if a != "8" else "1" for a in stage_args("sft", tiny_model_dir, small_data)]
    code, err = run_in_process(monkeypatch, capsys, "sft", [*args, "--output_dir", str(output_dir), "--overwrite_output_dir"])
    assert code == 0, err[-3000:]
    assert (output_dir / "adapter_model.safetensors").is_file()
    assert (output_dir / "notes.txt").read_text() == "mine" and (output_dir / "data" / "keep.jsonl").is_file()


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_inputs(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("bad")
    (root / "malformed.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen"\n')
    (root / "no_column.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    (root / "empty_value.jsonl").write_text('{"prompt": "a", "chosen": "", "rejected": "c"}\n')
    (root / "no_config").mkdir()
    two_labels = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    two_labels.save_pretrained(root / "two_labels")
    for tokenizer_file in Path(tiny_model_dir).glob("tokenizer*"):
        shutil.copy(tokenizer_file, root / "two_labels")
    return {"root": str(root), "tiny": tiny_model_dir}


# (stage, flags replacing/adding to the small run, fragment of the error line)
BAD_INPUT_CASES = [
    ("sft", {"--model_name_or_path": "/nonexistent/model"}, "no such directory"),
    ("sft", {"--model_name_or_path": "{root}/no_config"}, "config.json"),
    ("sft", {"--tokenizer_name": "/nonexistent/tokenizer"}, "tokenizer /nonexistent/tokenizer"),
    ("sft", {"--train_file": "/nonexistent/train.jsonl"}, "no such file"),
    ("sft", {"--train_file": "{root}/malformed.jsonl"}, "line 2"),
    ("sft", {"--train_file": "{root}/no_column.jsonl"}, "columns"),
    ("sft", {"--learning_rate": "-0.0001"}, "--learning_rate"),
    ("rm", {"--train_file": "{root}/empty_value.jsonl"}, "column 'chosen' is empty"),
    ("rm", {"--max_length": "4", "--overflow": "drop"}, "every pair is longer than --max_length 4"),
    ("rm", {"--learning_rate": "-0.0001"}, "--learning_rate"),
    ("ppo", {"--mini_batch_size": "3"}, "--mini_batch_size"),
    ("ppo", {"--learning_rate": "-0.0001"}, "--learning_rate"),
    ("ppo", {"--reward_model_name": "{tiny}"}, "one-output sequence classifier"),  # a causal LM
    ("ppo", {"--reward_model_name": "{root}/two_labels"}, "one-output sequence classifier"),
    ("ppo", {"--model_name": "/nonexistent/model"}, "no such directory"),
]


def with_flags(args: list[str], flags: dict[str, str]) -> list[str]:
    args = list(args)
    for flag, value in flags.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


@pytest.mark.parametrize("stage, flags, fragment", BAD_INPUT_CASES,
                         ids=[f"{s}-{'-'.join(f.strip('-') for f in flags)}" for s, flags, _ in BAD_INPUT_CASES])
def test_bad_input_exits_2_with_one_line_before_training(stage, flags, fragment, bad_inputs, small_data, tmp_path,
                                                         monkeypatch, capsys):
    flags = {k: v.format(**bad_inputs) for k, v in flags.items()}
    args = with_flags(stage_args(stage, bad_inputs["tiny"], small_data, bad_inputs["tiny"]), flags)

    def heavy(*_args, **_kwargs):
        raise AssertionError("the model was built before the input was checked")

    # the policy / trained model must not be built before the problem is found
    target = {"sft": (finetune_clm, "load_causal_lm"), "rm": (reward_modeling, "load_sequence_classifier"),
              "ppo": (rl_training, "build_policy")}[stage]
    monkeypatch.setattr(*target, heavy)
    code, err = run_in_process(monkeypatch, capsys, stage, [*args, "--output_dir", str(tmp_path / "out")])
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"{SCRIPTS[stage]}: error: "), line
    assert fragment in line, line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_contradictory_launcher_flags_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["gaudi_spawn.py", "--world_size", "2", "--use_mpi", "--use_deepspeed",
                                      "--dry_run", "finetune_clm.py"])
    assert run_cli(gaudi_spawn.main) == 2
    assert "--use_mpi and --use_deepspeed" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_tokenizer_without_pad_token_is_handled(stage, tiny_model_dir, small_data, tmp_path, monkeypatch, capsys):
    model = tmp_path / "no_pad"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    model_config = json.loads((model / "config.json").read_text())
    model_config["pad_token_id"] = None
    (model / "config.json").write_text(json.dumps(model_config))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(model)).pad_token is None
    args = [a if a != "8" else "2" for a in stage_args(stage, str(model), small_data)]
    code, err = run_in_process(monkeypatch, capsys, stage, [*args, "--output_dir", str(tmp_path / "out")])
    assert code == 0, err[-3000:]
    saved = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert saved.get("pad_token")  # saved with the pad token it trained with


# ---------------------------------------------------------------- secrets and safe loading


def test_tokens_never_reach_logs_or_outputs(references):
    for stage in ("sft", "rm", "ppo"):
        reference = references(stage)
        assert SECRET not in reference.result.stdout and SECRET not in reference.result.stderr, stage
        files = [p for p in reference.output_dir.rglob("*") if p.is_file()]
        assert any(p.name == "training_args.bin" for p in files) or stage == "ppo"
        for path in files:
            assert SECRET.encode() not in path.read_bytes(), path  # configs, metrics, trainer_state, training_args.bin


def test_training_args_bin_holds_no_hub_token(references):
    import pickle
    import zipfile

    # training_args.bin is torch.save's zip of a pickled TrainingArguments. It is our own test output,
    # so unpickling it here is fine; the code base itself never unpickles (next test).
    with zipfile.ZipFile(references("sft").output_dir / "training_args.bin") as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    unpickler = pickle.Unpickler(__import__("io").BytesIO(data))
    unpickler.persistent_load = lambda _pid: None
    args = unpickler.load()  # noqa: S301
    assert type(args).__name__ == "TrainingArguments"
    assert args.hub_token is None


def python_sources() -> list[Path]:
    """Our Python files: the repository without virtual environments, hidden folders and outputs."""
    skip = {"outputs", "node_modules", "__pycache__", "site-packages", "build", "dist"}
    found = []
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in skip and not d.startswith("venv")]
        found += [Path(folder) / f for f in files if f.endswith(".py")]
    return found


def test_weights_are_loaded_safely_everywhere():
    """Every torch.load passes weights_only=True; no pickle.load; trust_remote_code is never forced on."""
    problems = []
    for path in python_sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if name == "torch.load":
                value = keywords.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append(f"{path.relative_to(REPO)}:{node.lineno}: torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads") and "tests" not in path.relative_to(REPO).parts:
                problems.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}")
            value = keywords.get("trust_remote_code")
            if isinstance(value, ast.Constant) and value.value is True and "tests" not in path.relative_to(REPO).parts:
                problems.append(f"{path.relative_to(REPO)}:{node.lineno}: trust_remote_code=True")
    assert not problems, "\n".join(problems)


def test_trust_remote_code_is_off_by_default():
    from rlhf.modeling import ModelArguments

    assert ModelArguments().trust_remote_code is False
    assert rl_training.ScriptArguments().trust_remote_code is False


# ---------------------------------------------------------------- the same mistake, every stage (issue 26)

SWEEP_STAGES = ("sft", "rm", "dpo", "ppo", "merge")
HEAVY = {"sft": [(finetune_clm, "load_causal_lm")], "rm": [(reward_modeling, "load_sequence_classifier")],
         "dpo": [(dpo_training, "load_causal_lm")], "ppo": [(rl_training, "build_policy"), (rl_training, "build_reward")],
         "merge": [(merge_peft_adapter, "merge")]}


@pytest.fixture(scope="module")
def sweep_inputs(tiny_model_dir, small_data, tmp_path_factory) -> dict:
    """A tiny GPT-2 (Conv1D c_attn/c_proj/c_fc), a one-pair file and a file of identical pairs."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("sweep")
    gpt2 = root / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=512, n_positions=64, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(gpt2)
    for tokenizer_file in Path(tiny_model_dir).glob("tokenizer*"):
        shutil.copy(tokenizer_file, gpt2)
    rows = [json.loads(line) for line in Path(small_data).read_text().splitlines()]
    (root / "one.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (root / "same.jsonl").write_text("".join(json.dumps({**r, "rejected": r["chosen"]}) + "\n" for r in rows[:6]))
    return {"tiny": tiny_model_dir, "gpt2": str(gpt2), "data": small_data, "one": str(root / "one.jsonl"),
            "same": str(root / "same.jsonl")}


def sweep_args(stage: str, inputs: dict, out: Path, model: str | None = None, data: str | None = None) -> list[str]:
    """Each stage's smallest command; nothing in it is wrong."""
    model, data = model or inputs["tiny"], data or inputs["data"]
    trainer = ["--train_file", data, "--device", "cpu", "--report_to", "none", "--output_dir", str(out)]
    if stage == "sft":
        return ["--model_name_or_path", model, "--do_train", *trainer]
    if stage in ("rm", "dpo"):
        return ["--model_name_or_path", model, *trainer]
    if stage == "ppo":
        return ["--model_name", model, "--reward_model_name", inputs["tiny"], "--train_file", data, "--device", "cpu",
                "--output_dir", str(out)]
    return ["--adapter_model_name", str(out.parent / "adapter"), "--output_name", str(out)]


def argv_to_config(argv: list[str]) -> dict:
    config, i = {}, 0
    while i < len(argv):
        name = argv[i][2:]
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            config[name], i = argv[i + 1], i + 2
        else:
            config[name], i = True, i + 1
    return config


def damaged_checkpoint(out: Path, stage: str, damage: str) -> None:
    folder = out / "checkpoint-2"
    folder.mkdir(parents=True)
    if stage == "ppo":
        torch.save({"step": 2, "optimizer": {"state": {}}}, folder / "ppo_state.pt")
    else:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": []}))
        torch.save({"state": {}}, folder / "optimizer.pt")
        torch.save({"last_epoch": 2}, folder / "scheduler.pt")
    if damage == "truncated":
        target = folder / ("ppo_state.pt" if stage == "ppo" else "trainer_state.json")
        target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    else:
        (folder / "optimizer.pt").unlink()
    (folder / COMPLETE_MARKER).write_text("ok\n")


def yaml_of(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config)


def build_case(case: str, stage: str, inputs: dict, tmp_path: Path) -> tuple[list[str], str]:
    """(argv, fragment of the one error line) for one mistake given to one stage."""
    out = tmp_path / "out"
    base = sweep_args(stage, inputs, out)
    if case == "config_misspelt_key":
        path = tmp_path / "stage.yaml"
        path.write_text(yaml_of({**argv_to_config(base), "learning_rat": 0.001}))
        return [str(path)], "unknown key 'learning_rat'"
    if case == "config_syntax_error":
        path = tmp_path / "stage.yaml"
        path.write_text(yaml_of(argv_to_config(base)) + "learning_rate: [1\n")
        return ["--config", str(path)], f"line {len(path.read_text().splitlines()) + 1}, column 1"
    if case == "lora_rank_zero":
        flag = "--lora_r" if stage == "ppo" else "--lora_rank"  # the reference's name: an alias of --lora_rank
        return [*base, flag, "0"], "--lora_rank 0 must be a positive integer"
    if case == "lora_targets_not_in_model":
        return sweep_args(stage, inputs, out, model=inputs["gpt2"]), "its linear modules are c_attn c_fc c_proj"
    if case in ("checkpoint_truncated", "checkpoint_without_optimizer"):
        damaged_checkpoint(out, stage, "truncated" if case == "checkpoint_truncated" else "no_optimizer")
        fragment = ("is truncated" if stage == "ppo" else "trainer_state.json is not valid JSON") \
            if case == "checkpoint_truncated" else "has no optimizer.pt"
        return [*base, "--resume_from_checkpoint", "true"], fragment
    if case == "one_pair_under_validation_split":
        split = ["--validation_split_percentage", "2"] if stage in ("sft", "ppo") else []  # RM/DPO: the default
        return [*sweep_args(stage, inputs, out, data=inputs["one"]), *split], "1 row(s) are too few to hold out"
    if case == "identical_pairs_only":
        return [*sweep_args(stage, inputs, out, data=inputs["same"]), "--validation_split_percentage", "0"], \
            "chosen and rejected answers are identical"
    if case == "output_is_a_file":
        out.write_text("my notes\n")
        return base, "file"
    raise AssertionError(case)


SWEEP_CASES = [
    *[("config_misspelt_key", s) for s in SWEEP_STAGES],
    *[("config_syntax_error", s) for s in SWEEP_STAGES],
    *[("output_is_a_file", s) for s in SWEEP_STAGES],
    *[("lora_rank_zero", s) for s in ("sft", "rm", "dpo", "ppo")],
    *[("lora_targets_not_in_model", s) for s in ("sft", "rm", "dpo", "ppo")],
    *[("checkpoint_truncated", s) for s in ("sft", "rm", "dpo", "ppo")],
    *[("checkpoint_without_optimizer", s) for s in ("sft", "rm", "dpo")],  # PPO keeps its optimizer in ppo_state.pt
    *[("one_pair_under_validation_split", s) for s in ("sft", "rm", "dpo", "ppo")],
    *[("identical_pairs_only", s) for s in ("rm", "dpo")],  # SFT and PPO read no rejected answer
]


def snapshot(path: Path) -> dict:
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} \
        if path.exists() else {}


@pytest.mark.parametrize("case, stage", SWEEP_CASES, ids=[f"{c}-{s}" for c, s in SWEEP_CASES])
def test_same_mistake_every_stage_exits_2_with_one_line(case, stage, sweep_inputs, tmp_path, monkeypatch, capsys):
    argv, fragment = build_case(case, stage, sweep_inputs, tmp_path)
    before = snapshot(tmp_path / "out")

    def heavy(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the mistake was found")

    for module, name in HEAVY[stage]:
        monkeypatch.setattr(module, name, heavy)
    code, err = run_in_process(monkeypatch, capsys, stage, argv)
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert errors == [err.strip().splitlines()[-1]], err[-3000:]  # one error line, the last one
    assert errors[0].startswith(f"{SCRIPTS[stage]}: error: ") and fragment in errors[0], errors[0]
    assert snapshot(tmp_path / "out") == before  # earlier outputs (a checkpoint, a file) untouched


@pytest.mark.parametrize("stage", SWEEP_STAGES)
def test_same_mistake_on_the_real_command_line(stage, sweep_inputs, tmp_path):
    """The CLI itself, as a user runs it: a misspelt config key is exit 2 and one stderr line."""
    argv, fragment = build_case("config_misspelt_key", stage, sweep_inputs, tmp_path)
    result = subprocess.run([sys.executable, SCRIPTS[stage], *argv], cwd=REPO, env=clean_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip() and "real_accelerator" not in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0].startswith(f"{SCRIPTS[stage]}: error: ") and fragment in lines[0]
    assert not (tmp_path / "out").exists()
