"""Tests for merge_peft_adapter.py: merged logits equal the adapter model's, for causal-LM and SEQ_CLS."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import merge_peft_adapter
from rlhf.errors import run_cli

REPO = Path(__file__).resolve().parent.parent
SCRIPT = "merge_peft_adapter.py"
TEXTS = ["What is Mars?", "The quick brown fox jumps over the lazy dog.", "Hi"]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def run_in_process(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [SCRIPT, *args])
    capsys.readouterr()
    code = run_cli(merge_peft_adapter.main)
    return code, capsys.readouterr().err


def assert_one_error_line(stderr: str, *fragments: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{SCRIPT}: error:"), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def batch(tokenizer) -> dict:
    return tokenizer(TEXTS, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def causal_adapter(tiny_model_dir, tmp_path_factory, tokenizer):
    """A non-trivial LoRA adapter (random A and B) saved with its tokenizer; returns (dir, logits)."""
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        task_type="CAUSAL_LM", init_lora_weights=False)
    model = get_peft_model(model, config).eval()
    inputs = batch(tokenizer)
    with torch.no_grad():
        logits = model(**inputs).logits
        base = model.get_base_model()
        with model.disable_adapter():
            base_logits = model(**inputs).logits
    assert not torch.allclose(logits, base_logits, atol=1e-3)  # the adapter changes the model
    path = tmp_path_factory.mktemp("causal_adapter") / "adapter"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del base
    return path, logits


@pytest.fixture(scope="module")
def seq_cls_adapter(tiny_model_dir, tmp_path_factory, tokenizer):
    """A SEQ_CLS adapter with a trained (perturbed) score head in modules_to_save; no tokenizer saved."""
    torch.manual_seed(2)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS",
                        modules_to_save=["score"], init_lora_weights=False)
    model = get_peft_model(model, config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modules_to_save" in name and "score" in name:
                parameter.add_(torch.randn_like(parameter))
        scores = model(**batch(tokenizer)).logits
    assert scores.shape == (len(TEXTS), 1)
    path = tmp_path_factory.mktemp("seq_cls_adapter") / "adapter"
    model.save_pretrained(path)
    return path, scores


def test_causal_lm_merge_matches_adapter_logits(causal_adapter, tokenizer, tmp_path):
    adapter, expected = causal_adapter
    out = tmp_path / "merged"
    result = run("--adapter_model_name", str(adapter), "--output_name", str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        logits = merged(**batch(AutoTokenizer.from_pretrained(out))).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_seq_cls_merge_keeps_score_head(seq_cls_adapter, tiny_model_dir, tokenizer, tmp_path):
    adapter, expected = seq_cls_adapter
    out = tmp_path / "merged_rm"
    result = run("--adapter_model_name", str(adapter), "--output_name", str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "tokenizer.json").is_file()  # taken from the base model
    merged = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.config.num_labels == 1
    assert merged.config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        scores = merged(**batch(tokenizer)).logits
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)


def test_base_model_name_override(causal_adapter, tiny_model_dir, tmp_path, monkeypatch, capsys):
    adapter, expected = causal_adapter
    moved = tmp_path / "adapter_elsewhere"
    moved.mkdir()
    for file in adapter.iterdir():
        (moved / file.name).write_bytes(file.read_bytes())
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone" / "base")
    (moved / "adapter_config.json").write_text(json.dumps(config))

    code, err = run_in_process(monkeypatch, capsys, "--adapter_model_name", str(moved), "--output_name",
                               str(tmp_path / "a"))
    assert code == 2
    assert_one_error_line(err, "gone")  # the recorded base no longer exists

    out = tmp_path / "b"
    code, err = run_in_process(monkeypatch, capsys, "--adapter_model_name", str(moved), "--output_name", str(out),
                               "--base_model_name", tiny_model_dir)
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = merged(**batch(AutoTokenizer.from_pretrained(out))).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- bad inputs


def test_missing_adapter_dir_exits_2_one_line(tmp_path):
    result = run("--adapter_model_name", str(tmp_path / "no_adapter"), "--output_name", str(tmp_path / "o"))
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "no_adapter")
    assert not (tmp_path / "o").exists()


def test_dir_without_adapter_config(tiny_model_dir, tmp_path, monkeypatch, capsys):
    code, err = run_in_process(monkeypatch, capsys, "--adapter_model_name", tiny_model_dir, "--output_name",
                               str(tmp_path / "o"))
    assert code == 2
    assert_one_error_line(err, "adapter_config.json")


def test_missing_required_flags(tmp_path, monkeypatch, capsys):
    code, err = run_in_process(monkeypatch, capsys, "--output_name", str(tmp_path / "o"))
    assert code == 2
    assert_one_error_line(err, "--adapter_model_name")


def test_unsupported_task_type(causal_adapter, tmp_path, monkeypatch, capsys):
    adapter, _ = causal_adapter
    other = tmp_path / "seq2seq"
    other.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["task_type"] = "SEQ_2_SEQ_LM"
    (other / "adapter_config.json").write_text(json.dumps(config))
    code, err = run_in_process(monkeypatch, capsys, "--adapter_model_name", str(other), "--output_name",
                               str(tmp_path / "o"))
    assert code == 2
    assert_one_error_line(err, "SEQ_2_SEQ_LM")


def test_non_empty_output_needs_overwrite(causal_adapter, tmp_path, monkeypatch, capsys):
    adapter, _ = causal_adapter
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_in_process(monkeypatch, capsys, "--adapter_model_name", str(adapter), "--output_name", str(out))
    assert code == 2
    assert_one_error_line(err, "--overwrite_output_dir")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    code, err = run_in_process(monkeypatch, capsys, "--adapter_model_name", str(adapter), "--output_name", str(out),
                               "--overwrite_output_dir")
    assert code == 0, err
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_name_that_is_a_file_is_refused_and_left_alone(overwrite, causal_adapter, tmp_path, monkeypatch, capsys):
    """It used to exit 0 and print 'written to' while save_pretrained wrote nothing (issue 26)."""
    adapter, _ = causal_adapter
    out = tmp_path / "merged.bin"
    out.write_bytes(b"my file")
    code, err = run_in_process(monkeypatch, capsys, "--adapter_model_name", str(adapter), "--output_name", str(out),
                               *(["--overwrite_output_dir"] if overwrite else []))
    assert code == 2
    assert_one_error_line(err, f"--output_name {out} is an existing file")
    assert "written to" not in err and out.read_bytes() == b"my file"


# ---------------------------------------------------------------- broken adapters and base models
# Every piece missing or of the wrong kind: exit 2 and one line naming it, nothing written.


def break_adapter(folder: Path, case: str, tiny_model_dir: str, tmp_path: Path) -> list[str]:
    """Break a copy of the adapter in one way; returns extra command-line flags."""
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    weights = folder / "adapter_model.safetensors"
    if case == "adapter_config_not_json":
        config_path.write_text("{task_type: CAUSAL_LM")
    elif case == "adapter_config_not_object":
        config_path.write_text('"CAUSAL_LM"')
    elif case == "no_adapter_weights":
        weights.unlink()
    elif case == "adapter_weights_corrupt":
        weights.write_bytes(b"\x00" * 64)
    elif case == "adapter_weights_truncated":
        weights.write_bytes(weights.read_bytes()[:2000])
    elif case == "recorded_base_path_missing":
        config_path.write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "moved_away")}))
    elif case == "recorded_base_name_unknown":  # not a local directory, so a hub id: offline, not found
        config_path.write_text(json.dumps({**config, "base_model_name_or_path": "no-such-org/no-such-base"}))
    elif case == "base_without_weights":
        base = tmp_path / "base_without_weights"
        shutil.copytree(tiny_model_dir, base)
        (base / "model.safetensors").unlink()
        return ["--base_model_name", str(base)]
    elif case == "base_weights_corrupt":
        base = tmp_path / "base_weights_corrupt"
        shutil.copytree(tiny_model_dir, base)
        (base / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes()[:4096])
        return ["--base_model_name", str(base)]
    elif case == "base_of_another_size":
        from rlhf.tiny_model import build_tiny_model

        return ["--base_model_name", build_tiny_model(str(tmp_path / "wider"), hidden_size=32, num_layers=2)]
    elif case == "adapter_tokenizer_incomplete":
        (folder / "tokenizer.json").unlink()
    else:
        raise AssertionError(case)
    return []


ADAPTER_CASES = {
    "adapter_config_not_json": "adapter_config.json is not valid JSON (line 1",
    "adapter_config_not_object": "adapter_config.json is not a JSON object",
    "no_adapter_weights": "no adapter weights (adapter_model.safetensors or adapter_model.bin)",
    "adapter_weights_corrupt": "the adapter cannot be loaded (Error while deserializing header",
    "adapter_weights_truncated": "the adapter cannot be loaded (Error while deserializing header",
    "recorded_base_path_missing": "the base model in adapter_config.json (override with --base_model_name)",
    "recorded_base_name_unknown": "no-such-org/no-such-base: the model cannot be loaded",
    "base_without_weights": "--base_model_name",
    "base_weights_corrupt": "--base_model_name",
    "base_of_another_size": "the adapter does not fit base model",
    "adapter_tokenizer_incomplete": "has tokenizer_config.json but no vocabulary file",
}
ADAPTER_FIX = {  # and the way out each names
    "recorded_base_path_missing": "no such directory; check the path",
    "base_without_weights": "no weight files",
    "base_weights_corrupt": "restore its weight files",
    "base_of_another_size": "pass the base model it was trained on with --base_model_name",
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_broken_adapter_or_base_exits_2_with_one_line(case, causal_adapter, tiny_model_dir, tmp_path, monkeypatch,
                                                       capsys):
    adapter, _ = causal_adapter
    broken = tmp_path / "adapter"
    shutil.copytree(adapter, broken)
    extra = break_adapter(broken, case, tiny_model_dir, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "merged"
    code, err = run_in_process(monkeypatch, capsys, "--adapter_model_name", str(broken), "--output_name", str(out),
                               *extra)
    assert code == 2, err
    # a failure after the base model loaded follows transformers' "Loading weights" progress bar
    err = "\n".join(line for line in err.splitlines() if not line.startswith("Loading weights"))
    assert_one_error_line(err, ADAPTER_CASES[case], ADAPTER_FIX.get(case, ""))
    assert not out.exists()


def test_bf16_merge_writes_bf16_weights_that_score_like_the_adapter(seq_cls_adapter, tokenizer, tmp_path, monkeypatch,
                                                                    capsys):
    """--bf16: merged in the base's fp32, written in bf16 (half the size); the reloaded model (dtype auto)
    is bf16 and scores like the adapter to bf16 precision."""
    from safetensors import safe_open

    adapter, expected = seq_cls_adapter
    out = tmp_path / "merged_bf16"
    code, err = run_in_process(monkeypatch, capsys, "--adapter_model_name", str(adapter), "--output_name", str(out),
                               "--bf16")
    assert code == 0, err
    with safe_open(out / "model.safetensors", framework="pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.dtype == torch.bfloat16
    with torch.no_grad():
        scores = merged(**batch(tokenizer)).logits.float()
    torch.testing.assert_close(scores, expected, atol=0.05, rtol=0.02)
