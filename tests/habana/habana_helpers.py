"""Helpers for the Gaudi-stack tests: run a stage script with Habana's software EMULATED (test-only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EMULATION = Path(__file__).resolve().parent / "emulation"
TEST_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
LAUNCHER_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def emulated_env(record_dir: Path, extra: dict | None = None) -> dict:
    env = {**os.environ, **TEST_ENV}
    for name in LAUNCHER_VARS:
        env.pop(name, None)
    env.pop("PT_HPU_LAZY_MODE", None)
    env["PYTHONPATH"] = os.pathsep.join([str(EMULATION), str(REPO)])  # EMULATION's sitecustomize
    env["HABANA_EMULATION_RECORD_DIR"] = str(record_dir)
    env.update(extra or {})
    return env


def run_emulated(args: list[str], record_dir: Path, timeout: int = 300, extra_env: dict | None = None):
    """Run ``python <args>`` in the repo root with Habana's software emulated (test-only)."""
    record_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=emulated_env(record_dir, extra_env),
        capture_output=True, text=True, timeout=timeout,
    )


def read_records(record_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(record_dir.glob("record-*.json"))]


def instance_classes(record: dict) -> list[str]:
    return [i["class"] for i in record["instances"]]


def instances(record: dict, cls: str) -> list[dict]:
    # Our scripts put mixins in front (e.g. ReliableGaudiTrainer): match the class by its name suffix.
    return [i for i in record["instances"] if i["class"].endswith(cls)]


def only_record(record_dir: Path) -> dict:
    records = read_records(record_dir)
    assert len(records) == 1, f"expected one emulated process, got {len(records)}"
    return records[0]


def training_shapes(record: dict) -> set[tuple]:
    """Distinct input shapes of the forwards run in training mode (outside HPU graphs)."""
    return {
        tuple(sorted((k, tuple(v)) for k, v in row["shapes"].items()))
        for row in record["input_shapes"] if row["training"] and not row["in_graph"]
    }


def check_ok(result) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}"
