"""Tests for finetune_clm.py (SFT stage), run as a user runs it: a subprocess from the repo root."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import finetune_clm
from rlhf.backend import bf16_supported, choose_device
from rlhf.errors import run_cli

REPO = Path(__file__).resolve().parent.parent
SCRIPT = "finetune_clm.py"
TRAIN = "data/demo/train.jsonl"
SECRET = "hf_SECRETtoken0987654321"


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("HF_TOKEN", None)
    return subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Traceback" not in result.stderr


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, the error as the LAST stderr line, no traceback. Returns that line."""
    assert result.returncode == 2, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    line = lines[-1]
    assert line.startswith(f"{SCRIPT}: error:"), result.stderr[-4000:]
    assert len(lines) == 1, result.stderr[-4000:]  # nothing else (warnings, progress bars) on stderr
    for fragment in fragments:
        assert fragment in line, line
    return line


def run_in_process(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """``main`` under ``run_cli`` in this process (fast; the subprocess tests cover real exits)."""
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(sys, "argv", [SCRIPT, *args])
    capsys.readouterr()
    code = run_cli(finetune_clm.main)
    return code, capsys.readouterr().err


def assert_in_process_user_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{SCRIPT}: error:"), err
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def log_history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


# ---------------------------------------------------------------- successful runs


def test_lora_run_writes_adapter_tokenizer_metrics_and_curves(tiny_model_dir, tmp_path):
    out = tmp_path / "sft"
    result = run("--model_name_or_path", tiny_model_dir, "--train_file", TRAIN, "--output_dir", str(out),
                 "--peft", "lora", "--max_steps", "20", "--do_train", "--device", "cpu", "--logging_steps", "5",
                 "--report_to", "none")
    assert_ok(result)
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "all_results.json", "trainer_state.json", "training_curves.png"):
        assert (out / name).is_file(), f"{name} missing; have {sorted(p.name for p in out.iterdir())}"
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM" and adapter["r"] == 8 and adapter["lora_alpha"] == 16
    assert adapter["base_model_name_or_path"] == tiny_model_dir
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_samples"] == 2400 and results["train_loss"] > 0  # every row of data/demo/train.jsonl
    assert not (out / "model.safetensors").exists()  # LoRA: the adapter only
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 20


def test_training_loss_falls(tiny_model_dir, tmp_path):
    out = tmp_path / "full"
    result = run("--model_name_or_path", tiny_model_dir, "--train_file", TRAIN, "--output_dir", str(out),
                 "--peft", "none", "--learning_rate", "5e-3", "--max_steps", "25", "--logging_steps", "1",
                 "--per_device_train_batch_size", "4", "--do_train", "--report_to", "none", "--save_strategy", "no",
                 "--disable_tqdm", "true")
    assert_ok(result)
    losses = [row["loss"] for row in log_history(out) if "loss" in row]
    assert len(losses) == 25
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.5, losses  # about 6.2 -> 5.0 on the demo data (ln 512 = 6.24 at random init)
    assert (out / "model.safetensors").is_file()  # full fine-tune saves the whole model


def test_reference_sft_command_runs(tiny_model_dir, tmp_path):
    """The reference command's flags unchanged (bf16 included), pointed at the tiny model and the local
    demo file, plus legacy flags (the token's value must never be echoed) and a validation split, so
    the same run checks that packing + held-out data report perplexity."""
    out = tmp_path / "llama2_7b_se"
    command = (
        "--model_name_or_path", tiny_model_dir, "--bf16", "True", "--train_file", TRAIN,
        "--dataset_concatenation", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4",
        "--learning_rate", "1e-4", "--num_train_epochs", "3", "--save_strategy", "steps", "--save_steps", "2000",
        "--save_total_limit", "1", "--logging_steps", "1", "--do_train", "--overwrite_output_dir",
        "--log_level", "info", "--output_dir", str(out), "--peft", "lora", "--use_fast_tokenizer", "false",
        "--max_steps", "2", "--report_to", "none", "--hf_access_token", SECRET, "--evaluation_strategy", "no",
        "--validation_split_percentage", "10", "--max_seq_length", "128", "--max_source_length", "96",
        "--per_device_eval_batch_size", "8",
    )
    result = run(*command)
    if not bf16_supported(choose_device("auto")):  # no bf16 units: --bf16 stops with one line, then fp32 runs
        assert_user_error(result, "--bf16 was requested but ", "no bfloat16", "drop --bf16")
        result = run(*command, "--bf16", "False")
    assert_ok(result)
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_curves.png").is_file()
    assert len([row for row in log_history(out) if "loss" in row]) == 2
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert evaluation["eval_samples"] > 0 and evaluation["perplexity"] > 1
    assert evaluation["perplexity"] == pytest.approx(math.exp(evaluation["eval_loss"]), rel=1e-6)
    assert "blocks" in result.stdout + result.stderr  # the training data was packed into blocks
    assert SECRET not in result.stdout and SECRET not in result.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


# ---------------------------------------------------------------- user errors: exit 2, one line
# Two as real processes (an early and a late failure), the rest in-process through run_cli.


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_data")
    good = json.dumps({"system": "", "question": "q", "chosen": "a", "rejected": "b"})
    (root / "missing_column.jsonl").write_text(json.dumps({"question": "q", "rejected": "b"}) + "\n")
    (root / "malformed.jsonl").write_text(good + "\n" + good + "\n{broken\n")
    return root


def test_missing_model_dir(tmp_path):
    result = run("--model_name_or_path", str(tmp_path / "no_model"), "--train_file", TRAIN,
                 "--output_dir", str(tmp_path / "o"), "--do_train")
    assert_user_error(result, "--model_name_or_path", "no_model")


def test_missing_train_file(tiny_model_dir, tmp_path, monkeypatch, capsys):
    code, err = run_in_process(monkeypatch, capsys, "--model_name_or_path", tiny_model_dir, "--train_file",
                               str(tmp_path / "nope.jsonl"), "--output_dir", str(tmp_path / "o"), "--do_train")
    assert_in_process_user_error(code, err, "--train_file", "nope.jsonl")


def test_train_file_with_missing_column(tiny_model_dir, tmp_path, bad_files, monkeypatch, capsys):
    code, err = run_in_process(monkeypatch, capsys, "--model_name_or_path", tiny_model_dir, "--train_file",
                               str(bad_files / "missing_column.jsonl"), "--output_dir", str(tmp_path / "o"),
                               "--do_train")
    assert_in_process_user_error(code, err, "missing_column.jsonl", "columns")


def test_malformed_json_line(tiny_model_dir, tmp_path, bad_files):
    result = run("--model_name_or_path", tiny_model_dir, "--train_file", str(bad_files / "malformed.jsonl"),
                 "--output_dir", str(tmp_path / "o"), "--do_train")
    assert_user_error(result, "malformed.jsonl", "line 3")


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--max_source_length", "600", "--max_seq_length", "512"], "--max_source_length 600"),
        (["--lora_dropout", "2"], "--lora_dropout"),
        (["--validation_split_percentage", "150"], "--validation_split_percentage 150"),
        (["--use_habana"], "Gaudi"),
        (["--no_such_flag", "1"], "--no_such_flag"),
    ],
    ids=["source_longer_than_seq", "lora_dropout", "split_percentage", "use_habana", "unknown_flag"],
)
def test_bad_flags(flags, fragment, tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    code, err = run_in_process(monkeypatch, capsys, "--model_name_or_path", tiny_model_dir, "--train_file", TRAIN,
                               "--output_dir", str(out), "--do_train", *flags)
    assert_in_process_user_error(code, err, fragment)
    assert not out.exists()


def test_nothing_to_do(tiny_model_dir, tmp_path, monkeypatch, capsys):
    code, err = run_in_process(monkeypatch, capsys, "--model_name_or_path", tiny_model_dir, "--train_file", TRAIN,
                               "--output_dir", str(tmp_path / "o"))
    assert_in_process_user_error(code, err, "--do_train")


def test_non_empty_output_dir_is_left_alone(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    keep = out / "previous_run.txt"
    keep.write_text("do not touch")
    before = keep.stat().st_mtime_ns
    code, err = run_in_process(monkeypatch, capsys, "--model_name_or_path", tiny_model_dir, "--train_file", TRAIN,
                               "--output_dir", str(out), "--do_train", "--max_steps", "1")
    assert_in_process_user_error(code, err, "--overwrite_output_dir")
    assert sorted(p.name for p in out.iterdir()) == ["previous_run.txt"]
    assert keep.read_text() == "do not touch" and keep.stat().st_mtime_ns == before


# ---------------------------------------------------------------- the bad-input examples, as a user runs them


def test_train_file_not_utf8_exits_2_with_one_line(tiny_model_dir, tmp_path):
    """Was a UnicodeDecodeError traceback, exit 1. (The full format x breakage sweep is in test_data.py.)"""
    data = tmp_path / "latin1.jsonl"
    row = {"prompt": "Café?", "chosen": "Oui.", "rejected": "Non."}
    data.write_bytes((json.dumps(row, ensure_ascii=False) + "\n").encode("latin-1"))
    result = run("--model_name_or_path", tiny_model_dir, "--train_file", str(data), "--output_dir",
                 str(tmp_path / "out"), "--do_train", "--max_steps", "1", "--report_to", "none")
    assert_user_error(result, "latin1.jsonl: not UTF-8 text (byte 0xe9 on line 1); save the file as UTF-8")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- resuming a finished run


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folder``: (mtime in ns, content)."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_resuming_a_finished_run_changes_nothing(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The issue's case: run to the end, then the same command plus --resume_from_checkpoint true
    used to train step max_steps + 1, write checkpoint-<max+1> and overwrite the finished model."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join((REPO / TRAIN).read_text().splitlines(keepends=True)[:16]))
    out = tmp_path / "sft"
    command = ["--model_name_or_path", tiny_model_dir, "--train_file", str(data), "--output_dir", str(out),
               "--do_train", "--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "2",
               "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1"]
    code, err = run_in_process(monkeypatch, capsys, *command)
    assert code == 0, err
    before = snapshot(out)
    assert {"checkpoint-4/COMPLETE", "adapter_model.safetensors", "train_results.json"} <= set(before)

    code, err = run_in_process(monkeypatch, capsys, *command, "--resume_from_checkpoint", "true")
    assert code == 0, err
    assert snapshot(out) == before  # same files, same contents, same modification times
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    # Not finished under a longer --max_steps: the same checkpoint resumes and trains on to the new end.
    code, err = run_in_process(monkeypatch, capsys, *command, "--max_steps", "6", "--resume_from_checkpoint", "true")
    assert code == 0, err
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    assert (out / "checkpoint-6").is_dir() and not (out / "checkpoint-7").exists()


def test_resuming_a_finished_run_says_so(tiny_model_dir, tmp_path):
    """As a user sees it: exit 0 and one clear line (a subprocess, so the log goes where users look)."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join((REPO / TRAIN).read_text().splitlines(keepends=True)[:8]))
    out = tmp_path / "sft"
    command = ["--model_name_or_path", tiny_model_dir, "--train_file", str(data), "--output_dir", str(out),
               "--do_train", "--max_steps", "2", "--save_steps", "2", "--per_device_train_batch_size", "2",
               "--report_to", "none", "--disable_tqdm", "true"]
    assert_ok(run(*command))
    before = snapshot(out)
    result = run(*command, "--resume_from_checkpoint", "true")
    assert_ok(result)
    assert "Run already finished at step 2 (of 2 planned); nothing to do" in result.stdout
    assert "Running training" not in result.stdout + result.stderr
    assert snapshot(out) == before


# ---------------------------------------------------------------- precision: --bf16 / --fp16


def fake_bf16_hardware(monkeypatch, supported: bool) -> None:
    """Fake THE capability check (rlhf.backend.bf16_supported); torch still runs bf16 on any CPU."""
    import rlhf.backend

    monkeypatch.setattr(rlhf.backend, "bf16_supported", lambda device: supported)


def test_bf16_full_fine_tune_trains_under_autocast_and_saves_fp32(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """--bf16 = the Trainer's bf16 autocast: matmuls in bf16, fp32 weights (master copy, optimizer states),
    the loss still falls, and the saved model loads as an fp32 model."""
    import torch
    from transformers import AutoModelForCausalLM

    fake_bf16_hardware(monkeypatch, True)
    seen: dict[str, set] = {"activation": set(), "weight": set()}
    load = finetune_clm.load_causal_lm

    def load_and_watch(*args, **kwargs):
        model = load(*args, **kwargs)
        layer = model.model.layers[0].mlp.down_proj

        def hook(module, inputs, output):
            if module.training:
                seen["activation"].add(output.dtype)
                seen["weight"].add(module.weight.dtype)

        layer.register_forward_hook(hook)
        return model

    monkeypatch.setattr(finetune_clm, "load_causal_lm", load_and_watch)
    out = tmp_path / "sft_bf16"
    code, err = run_in_process(
        monkeypatch, capsys, "--model_name_or_path", tiny_model_dir, "--train_file", TRAIN, "--output_dir", str(out),
        "--peft", "none", "--bf16", "--do_train", "--max_steps", "12", "--learning_rate", "1e-3",
        "--per_device_train_batch_size", "4", "--max_seq_length", "64", "--logging_steps", "1", "--report_to", "none",
        "--disable_tqdm", "true", "--save_strategy", "no",
    )
    assert code == 0, err
    assert seen == {"activation": {torch.bfloat16}, "weight": {torch.float32}}
    losses = [row["loss"] for row in log_history(out) if "loss" in row]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.15, losses  # about 6.22 -> 5.94
    saved = AutoModelForCausalLM.from_pretrained(out)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert {p.dtype for p in saved.parameters()} == {torch.float32}
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(saved.state_dict()[name], initial.state_dict()[name])  # it trained
    batch = torch.tensor([[1, 5, 9, 13]])
    assert torch.isfinite(saved(batch).logits).all()


def test_bf16_lora_run(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """LoRA under --bf16: the adapter (fp32) is saved and loads onto the base model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fake_bf16_hardware(monkeypatch, True)
    out = tmp_path / "sft_bf16_lora"
    code, err = run_in_process(
        monkeypatch, capsys, "--model_name_or_path", tiny_model_dir, "--train_file", TRAIN, "--output_dir", str(out),
        "--peft", "lora", "--bf16", "True", "--do_train", "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--max_seq_length", "64", "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no",
    )
    assert code == 0, err
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    lora = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert lora == {torch.float32}
    assert torch.isfinite(model(torch.tensor([[1, 5, 9, 13]])).logits).all()


def test_bf16_without_bf16_hardware_is_refused(tiny_model_dir, tmp_path, monkeypatch, capsys):
    fake_bf16_hardware(monkeypatch, False)
    out = tmp_path / "o"
    code, err = run_in_process(monkeypatch, capsys, "--model_name_or_path", tiny_model_dir, "--train_file", TRAIN,
                               "--output_dir", str(out), "--do_train", "--bf16", "True")
    assert_in_process_user_error(code, err, "--bf16", "no bfloat16", "drop --bf16")
    assert not out.exists()


def test_fp16_on_cpu_is_refused(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    code, err = run_in_process(monkeypatch, capsys, "--model_name_or_path", tiny_model_dir, "--train_file", TRAIN,
                               "--output_dir", str(out), "--do_train", "--fp16", "--device", "cpu")
    assert_in_process_user_error(code, err, "--fp16 is not supported on CPU")
    assert not out.exists()
