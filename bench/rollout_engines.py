#!/usr/bin/env python
"""Rollout engines compared: transformers ``generate`` (``hf``) vs vLLM colocated (``vllm``), CPU or GPU.

    .venv/bin/python bench/rollout_engines.py                        # tiny model (built here), 1 and 2 threads
    .venv/bin/python bench/rollout_engines.py --model_dir models/SmolLM2-135M-Instruct --batch 8 --new_tokens 32
    .venv/bin/python bench/rollout_engines.py --engines vllm --threads 2 --calls 5

Each (engine, threads) runs in its own fresh subprocess, so start-up and peak memory are its own: the
``hf`` engine in the main venv (``--hf_python``, what training uses without vLLM), ``vllm`` in
``.venv-vllm`` (``--vllm_python``; ``make setup-vllm``). Per run: the policy (fp32, a LoRA adapter on
the attention projections with a non-zero update, as in training) is loaded, the engine built (start-up:
the whole constructor, vLLM's import included), one unmeasured call, then ``--calls`` measured calls of
``--batch`` prompts (the demo questions, at most ``--prompt_tokens`` tokens, the last ones kept), then
three weight pushes (LoRA merged into a copy and sent; the ``hf`` engine samples from the policy and has
nothing to push). Responses are exactly ``--new_tokens`` tokens (EOS ignored, as ``make bench``) unless
``--stop_at_eos``. Threads: ``torch.set_num_threads`` and, for vLLM on CPU, ``VLLM_CPU_OMP_THREADS_BIND``
(cores 0..n-1). Peak RSS is the process's whole life (model, engine, KV cache).

Prints one table and writes bench/results/rollout_engines.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", default=None,
                        help="causal LM directory (default: a tiny Llama with 32-wide heads, built here)")
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--prompt_tokens", type=int, default=64)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--stop_at_eos", action="store_true")
    parser.add_argument("--hf_python", default=str(REPO / ".venv" / "bin" / "python"))
    parser.add_argument("--vllm_python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--output", default=str(RESULTS / "rollout_engines.json"))
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "THREADS"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------- one run (subprocess)


def worker(args) -> None:
    engine_name, threads = args.worker[0], int(args.worker[1])
    if engine_name == "vllm":
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0" if threads == 1 else f"0-{threads - 1}")
    import torch

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(BENCH))
    from common import PeakMemory, prompt_texts
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rlhf.vllm_engine  # noqa: F401  registers "vllm"
    from rlhf.rollout import SamplingParams, make_engine

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    memory = PeakMemory()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    base = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype))
    policy = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])).eval()
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 1e-3)
    # exactly --new_tokens tokens: hf gets an id past the vocabulary (never sampled); vLLM refuses such a
    # stop id, so it gets -1 (never sampled either) with its EOS and stop ids off (extra_sampling below)
    eos = tokenizer.eos_token_id if args.stop_at_eos else (base.config.vocab_size if engine_name == "hf" else -1)
    prompts = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"][-args.prompt_tokens:])
               for t in prompt_texts(args.batch)]
    started = time.perf_counter()
    kwargs = dict(model=policy, eos_token_id=eos, device="cpu",
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    if engine_name == "vllm":
        kwargs.update(model_path=args.model_dir, dtype=args.dtype, seed=0,
                      max_model_len=args.prompt_tokens + args.new_tokens + 8)
    engine = make_engine(engine_name, **kwargs)
    startup = time.perf_counter() - started
    if engine_name == "vllm" and not args.stop_at_eos:
        engine.extra_sampling = {"ignore_eos": True, "stop_token_ids": []}
    sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature)
    engine.generate(prompts, sampling)  # warm-up, unmeasured
    calls, tokens = [], []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        rollout = engine.generate(prompts, sampling)
        calls.append(time.perf_counter() - t0)
        tokens.append(sum(len(r) for r in rollout.responses))
    pushes = []
    for _ in range(3):
        t0 = time.perf_counter()
        engine.push_weights(policy)
        pushes.append(time.perf_counter() - t0)
    result = {
        "engine": engine_name, "threads": threads, "startup_s": round(startup, 2),
        "vllm_startup_s": round(getattr(engine, "startup_s", 0.0), 2),
        "generate_s": [round(c, 3) for c in calls], "generate_median_s": round(statistics.median(calls), 3),
        "tokens_per_call": statistics.mean(tokens),
        "tokens_per_s": round(sum(tokens) / sum(calls), 1),
        "push_median_s": round(statistics.median(pushes), 3),
        "push_method": getattr(engine, "push_method", None) or "none (samples from the policy)",
        "torch_threads": torch.get_num_threads(),
        **memory.report(),
    }
    engine.close()
    with open(args.result, "w", encoding="utf-8") as handle:
        json.dump(result, handle)


# ---------------------------------------------------------------- driver


def tiny_model_dir(python: str) -> str:
    path = RESULTS / "models" / "tiny-head32"
    if not (path / "config.json").is_file():
        code = ("import sys; from rlhf.tiny_model import build_tiny_model; "
                "build_tiny_model(sys.argv[1], seed=0, hidden_size=128)")
        subprocess.run([python, "-c", code, str(path)], cwd=REPO, env={**os.environ, **ENV}, check=True)
    return str(path)


def main() -> int:
    args = parse()
    if args.worker:
        worker(args)
        return 0
    pythons = {"hf": args.hf_python, "vllm": args.vllm_python}
    engines = [e for e in args.engines.split(",") if e]
    for engine in engines:
        if not Path(pythons[engine]).is_file():
            raise SystemExit(f"{pythons[engine]} is missing" + (" (make setup-vllm)" if engine == "vllm" else " (make setup)"))
    args.model_dir = str(Path(args.model_dir).resolve()) if args.model_dir else tiny_model_dir(args.hf_python)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for threads in [int(t) for t in args.threads.split(",") if t]:
        for engine in engines:
            result_path = RESULTS / f"rollout_{engine}_{threads}.json"
            result_path.unlink(missing_ok=True)
            command = [pythons[engine], __file__, "--worker", engine, str(threads), "--result", str(result_path),
                       "--model_dir", args.model_dir, "--batch", str(args.batch), "--new_tokens", str(args.new_tokens),
                       "--prompt_tokens", str(args.prompt_tokens), "--calls", str(args.calls),
                       "--temperature", str(args.temperature), "--dtype", args.dtype]
            if args.stop_at_eos:
                command.append("--stop_at_eos")
            print(f"[bench] {engine}, {threads} thread(s) ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            proc = subprocess.run(command, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True,
                                  timeout=args.timeout)
            if proc.returncode != 0 or not result_path.is_file():
                sys.stderr.write(proc.stderr[-4000:])
                rows.append({"engine": engine, "threads": threads, "error": f"exit {proc.returncode}"})
                continue
            row = json.loads(result_path.read_text())
            row["wall_s"] = round(time.perf_counter() - started, 1)
            rows.append(row)
    summary = {"model_dir": args.model_dir, "batch": args.batch, "new_tokens": args.new_tokens,
               "prompt_tokens": args.prompt_tokens, "calls": args.calls, "temperature": args.temperature,
               "dtype": args.dtype, "stop_at_eos": args.stop_at_eos, "command": " ".join(sys.argv), "rows": rows}
    Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")
    print(render(summary))
    return 0 if all("error" not in r for r in rows) else 1


def render(summary: dict) -> str:
    lines = [f"model {summary['model_dir']}, {summary['batch']} prompts x {summary['new_tokens']} new tokens, "
             f"{summary['dtype']}, T={summary['temperature']}, median of {summary['calls']} calls",
             "| engine | threads | start-up s | generate s/call | tokens/s | vs hf | push s | peak RSS MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    hf = {r["threads"]: r for r in summary["rows"] if r["engine"] == "hf" and "error" not in r}
    for r in summary["rows"]:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['threads']} | {r['error']} | | | | | |")
            continue
        base = hf.get(r["threads"])
        ratio = f"{r['generate_median_s'] / base['generate_median_s']:.2f}x" if base else "-"
        lines.append(f"| {r['engine']} | {r['threads']} | {r['startup_s']:.1f} | {r['generate_median_s']:.3f} | "
                     f"{r['tokens_per_s']:.0f} | {ratio} | {r['push_median_s']:.3f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
