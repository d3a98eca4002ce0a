#!/usr/bin/env python
"""A bf16 CPU slowdown the bench found (2026-12-02, torch 2.13.0+cpu, transformers 5.23), and its fix.

The same bf16 SmolLM2 forward with ``logits_to_keep`` (as every PPO/GRPO forward runs) was ~3.4x slower (Xeon with
AMX; 1.6x on an AMD EPYC with AVX512-BF16) once its weights are frozen (``requires_grad_(False)``), as a LoRA
policy's base and a reference model are. The cause, found with torch's profiler: the LM head gets the slice
``hidden[:, -k:]``, not contiguous, and for such a 3-D input times a weight that does not require grad torch's
matmul does not fold the batch into one mm; it runs a bmm on the weight expanded per batch row, which in bf16 on
CPU first copies the 49152 x 576 weight once per row (``aten::copy_``, 38% of the forward). A trainable weight
folds, which is why only frozen models were slow. ``rlhf.modeling.fold_lm_head_input`` (applied by
``PolicyWithValueHead`` to the policy and the reference) makes the head's input contiguous; the third column
shows a frozen model with it.

    .venv/bin/python bench/bf16_frozen_weights.py [--threads 1] [--model models/SmolLM2-135M-Instruct]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rlhf.modeling import fold_lm_head_input


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
        fold_lm_head_input(model)
        folded = best_forward_s(model, ids)
        print(f"{str(dtype):15s} forward 4 x 96 tokens: weights requiring grad {trainable:.3f} s, frozen {frozen:.3f} s "
              f"({frozen / trainable:.2f}x), frozen with fold_lm_head_input {folded:.3f} s")


if __name__ == "__main__":
    main()
