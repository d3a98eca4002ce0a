#!/usr/bin/env python
"""A bf16 CPU slowdown the bench found (2026-12-02, Xeon with AMX, torch 2.13.0+cpu, transformers 5.23): the same
bf16 SmolLM2 forward is ~3.4x slower once its weights are frozen (``requires_grad_(False)``), as every LoRA policy's
base, reference and reward model are. A bare ``F.linear`` of a layer's shape shows no difference, so the slow path is
somewhere in the model's forward, not yet found. It is why the bench's bf16 PPO/GRPO rows are no faster than fp32.

    .venv/bin/python bench/bf16_frozen_weights.py [--threads 1] [--model models/SmolLM2-135M-Instruct]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM


def best_forward_s(model, ids: torch.Tensor, repeats: int = 3) -> float:
    with torch.no_grad():
        model(ids, logits_to_keep=33)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model(ids, logits_to_keep=33)
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 40000, (4, 96))
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
        trainable = best_forward_s(model, ids)
        frozen = best_forward_s(model.requires_grad_(False), ids)
        print(f"{str(dtype):15s} forward 4 x 96 tokens: weights requiring grad {trainable:.3f} s, frozen {frozen:.3f} s "
              f"({frozen / trainable:.2f}x)")


if __name__ == "__main__":
    main()
