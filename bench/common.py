"""What every benchmark worker shares: the workload, prompts, timers, peak-memory sampling and MFU.

This module runs in all three environments (main ``.venv``, ``bench/.venv-trl112``,
``bench/.venv-trl0114``), so it imports only the standard library and torch at module level, and
never ``rlhf`` or ``trl``.

Workload (one JSON file written by ``run_bench.py`` and read by every worker with ``--workload``):

    size            "tiny" or "smol" (label only)
    model_dir       causal LM (policy and reference)
    rm_dir          one-output sequence classifier built from the same base (reward model;
                    TRL 1.12's value model is initialised from it, as its docs recommend)
    batch_size      rollouts per PPO step
    num_minibatches minibatches per PPO epoch (one optimizer step each, no accumulation)
    ppo_epochs      PPO epochs per step
    new_tokens      response length: min_new_tokens = max_new_tokens, EOS never ends a response
    prompt_tokens   prompts are the demo data's questions, cut to at most this many tokens (keep the end)
    warmup, steps   unmeasured and measured PPO steps
    lora            r / alpha / dropout / target modules of the policy's LoRA adapter
    learning_rate, seed, threads
    precision       "fp32" or "bf16" (bf16: frozen weights in bfloat16 for PPO/GRPO, autocast for the Trainer tasks)
    num_generations GRPO: responses per prompt (batch_size counts responses: batch_size / k prompts per step)
    grpo_beta       GRPO: weight of the k3 KL loss term (reference = the adapter-disabled policy)
    sft_*           SFT / RM / DPO: batch_size (pairs for RM and DPO), max_length, warmup, steps
    dpo_beta        DPO: beta (sigmoid loss)

Each worker prints progress to stderr and writes one JSON result (``write_result``).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DEMO_DATA = REPO / "data" / "demo" / "train.jsonl"
PLAIN_TEMPLATE = "{system}\n\nQuestion: {question}\n\nAnswer: "

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def start_ppo_worker(description: str, tasks: tuple[str, ...] = ("ppo",)):
    """The PPO and GRPO workers' shared start: parse ``--workload``/``--out`` (and ``--task`` when a worker
    runs several), begin sampling peak memory. Returns (args, memory sampler, workload)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--task", choices=tasks, default=tasks[0])
    parser.add_argument("--workload", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    memory = PeakMemory()
    return args, memory, load_workload(args.workload)


def load_workload(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        workload = json.load(handle)
    torch.set_num_threads(int(workload.get("threads") or torch.get_num_threads()))
    torch.manual_seed(int(workload.get("seed", 0)))
    return workload


def is_bf16(workload: dict) -> bool:
    return workload.get("precision", "fp32") == "bf16"


def demo_rows(limit: int | None = None) -> list[dict]:
    rows = []
    with open(DEMO_DATA, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                rows.append(json.loads(line))
    return rows[:limit] if limit else rows


def prompt_texts(n: int) -> list[str]:
    """The first ``n`` demo prompts in the plain template (the same texts for every framework)."""
    rows = demo_rows()
    return [PLAIN_TEMPLATE.format(**rows[i % len(rows)]) for i in range(n)]


def prompt_ids(tokenizer, workload: dict, step: int, generations: int = 1) -> list[list[int]]:
    """Token ids of step ``step``'s prompts (batch_size of them), at most ``prompt_tokens`` each; with
    ``generations`` k, batch_size / k distinct prompts, each k times in a row (GRPO's groups)."""
    distinct = workload["batch_size"] // generations
    texts = prompt_texts(distinct * (step + 1))[distinct * step :]
    limit = workload["prompt_tokens"]
    return [tokenizer(t, add_special_tokens=False)["input_ids"][-limit:] for t in texts for _ in range(generations)]


def rule_reward(prompts: list[str], completions: list[str], **_columns) -> list[float]:
    """The GRPO benchmark's reward for every framework: the demo rule (``rlhf.demo_rule``), no reward model.
    Main ``.venv`` only (imports ``rlhf``); the signature TRL's ``reward_funcs`` call."""
    import sys

    sys.path.insert(0, str(REPO))
    from rlhf.demo_rule import rule_reward as demo_rule_reward

    return demo_rule_reward(prompts, completions)


# ---------------------------------------------------------------- timing


class Timers:
    """Accumulating wall-clock timers: ``with timers("generate"): ...``; ``pop()`` returns and resets."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    def pop(self) -> dict[str, float]:
        totals, self.totals = self.totals, {}
        return totals


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def step_row(framework: str, index: int, wall: float, parts: dict[str, float | None]) -> dict:
    """One step's timing row (wall, each part, the rest as ``other_s``), logged as it is made."""
    known = sum(v for v in parts.values() if v is not None)
    timings = " ".join(f"{k}={v:.2f}" for k, v in parts.items() if v is not None)
    log(f"{framework} step {index}: {wall:.2f} s {timings}")
    return {"step_s": wall, **{f"{k}_s": v for k, v in parts.items()}, "other_s": wall - known}


def mean_tokens(sequences) -> float:
    """Mean number of tokens per sequence in a batch of 1-D tensors."""
    return sum(s.numel() for s in sequences) / len(sequences)


def summarize_steps(steps: list[dict], warmup: int) -> dict:
    """Median of each timing key over the measured steps (those after ``warmup``)."""
    measured = steps[warmup:]
    keys = sorted({k for s in measured for k in s})
    return {k: median([s.get(k) for s in measured]) for k in keys}


# ---------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Samples this process's RSS every ``interval`` s in a thread (CPU) and reads
    ``torch.cuda.max_memory_allocated`` (GPU). ``reset()`` starts a new window (e.g. after loading)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = self.window_peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = _rss_bytes()
            self.peak = max(self.peak, rss)
            self.window_peak = max(self.window_peak, rss)

    def reset(self) -> int:
        self.baseline = _rss_bytes()
        self.window_peak = self.baseline
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self.baseline

    def report(self) -> dict:
        self._stop.set()
        self._thread.join()
        mib = 1024 * 1024
        out = {
            "peak_rss_mib": round(self.peak / mib, 1),
            "maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "baseline_rss_mib": round(getattr(self, "baseline", 0) / mib, 1),
            "run_peak_rss_mib": round(self.window_peak / mib, 1),
        }
        if torch.cuda.is_available():
            out["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / mib, 1)
        return out


# ---------------------------------------------------------------- FLOPs


def _best_seconds(run, repeats: int, warmup: int) -> float:
    """Fastest of ``repeats`` timed calls of ``run`` after ``warmup`` untimed ones (GPU work synchronised)."""
    cuda = torch.cuda.is_available()
    best = float("inf")
    for i in range(warmup + repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            best = min(best, time.perf_counter() - start)
    return best


def matmul_peak_flops(n: int = 2048, repeats: int = 8, dtype: str = "float32") -> float:
    """Best observed ``torch.matmul`` FLOP/s of an n x n product in ``dtype`` on this machine (or GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    b = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    return 2 * n**3 / _best_seconds(lambda: torch.matmul(a, b), repeats, warmup=2)


def read_bandwidth(mib: int = 512, repeats: int = 6) -> float:
    """Best observed bytes/s of reading a ``mib`` MiB tensor once (``sum``): what a decode step's weight and KV-cache
    reads are bound by (far larger than the caches, so it measures memory, not cache)."""
    x = torch.ones(mib * 2**20 // 4, device="cuda" if torch.cuda.is_available() else "cpu")
    return x.numel() * 4 / _best_seconds(x.sum, repeats, warmup=1)


def model_shape(model) -> dict:
    """What a decode step reads besides the weights: the KV cache's size per token (layers x kv heads x head dim)."""
    config = model.config
    heads = config.num_attention_heads
    return {"layers": config.num_hidden_layers, "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads}


def generation_roofline(n_params: int, shape: dict, batch: int, prompt_len: float, new_tokens: float,
                        bytes_per_value: int, peak_flops: float, bandwidth: float) -> dict:
    """The fastest ``generate`` could be, phase by phase: prefill is compute (2N FLOPs per prompt token); each
    decode step does 2N FLOPs per sequence and reads every weight once plus the KV cache so far, so it takes
    the longer of FLOPs / peak and bytes / read bandwidth. Returns seconds and the bytes of the middle step."""
    kv_per_token = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * bytes_per_value
    prefill_s = 2 * n_params * batch * prompt_len / peak_flops
    decode_s, steps = 0.0, max(int(round(new_tokens)), 1)
    for t in range(steps):
        step_bytes = n_params * bytes_per_value + kv_per_token * batch * (prompt_len + t)
        decode_s += max(2 * n_params * batch / peak_flops, step_bytes / bandwidth)
    middle = n_params * bytes_per_value + kv_per_token * batch * (prompt_len + steps / 2)
    return {"prefill_s": prefill_s, "decode_s": decode_s, "bound_s": prefill_s + decode_s,
            "decode_step_bytes": middle}


def count_params(model) -> int:
    """Distinct parameters (tied weights once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def ppo_step_flops(n_params: int, n_rm_params: int, batch: int, prompt_len: float, new_tokens: int,
                   ppo_epochs: int) -> dict:
    """Nominal FLOPs of one PPO step, the same formula for every framework (the useful work).

    generation 2*N per token (prompt prefill + new tokens); rollout: policy and reference forward
    (2*N each per token); scoring 2*N_rm per token; update 6*N per token per PPO epoch.
    """
    tokens = batch * (prompt_len + new_tokens)
    return {
        "generate": 2 * n_params * tokens,
        "forward": 2 * 2 * n_params * tokens,
        "score": 2 * n_rm_params * tokens,
        "update": 6 * n_params * tokens * ppo_epochs,
    }


# ---------------------------------------------------------------- output


def write_result(path: str, result: dict) -> None:
    result.setdefault("torch", torch.__version__)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2, sort_keys=True)
        handle.write("\n")


def log(*args) -> None:
    import sys

    print("[bench]", *args, file=sys.stderr, flush=True)
