"""The pipeline's end report: what a user wants to see after SFT -> RM -> PPO (or SFT -> DPO).

Reads the stages' own outputs (nothing is re-measured or invented here): the reward model's
held-out evaluation (`eval_results.json`), PPO's `summary.json` (held-out reward-model score and KL
to the reference, before and after PPO) and `eval_samples.jsonl` (the held-out responses, to which
the demo preference rule of `rlhf.demo_rule` is applied), the best-of-n baseline when the RL run
measured one (`--best_of_n`), and the plots' paths. `dpo_training.py
--heldout_samples N` writes the same two files (its `summary.json` names its `algorithm`, and has no
reward-model score: that row reads n/a), and a DPO pipeline has no reward model (`--rm_dir ""`).

Usage::

    python -m rlhf.report --rm_dir outputs/demo/rm --ppo_dir outputs/demo/ppo --output outputs/demo/report.md
    python -m rlhf.report --rm_dir "" --policy_dir outputs/demo/dpo --output outputs/demo/report.md
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev

from rlhf.demo_rule import check_response, extract_question, rule_reward
from rlhf.errors import UserError, run_cli


def before_after(before: dict, after: dict, key: str) -> dict:
    first, last = before.get(key), after.get(key)
    change = None if first is None or last is None else last - first
    return {"before": first, "after": last, "change": change}


def verdict(change: float | None) -> str:
    if change is None:
        return "not evaluated"
    return "improved" if change > 0 else ("WORSE" if change < 0 else "unchanged")


def heldout_result(before: dict, after: dict, reward_source: str, extra: dict[str, str] | None = None) -> dict:
    """The ``result`` block of a run's ``summary.json`` (rl_training and dpo_training write it, this module
    reads it): the held-out raw reward score first, KL and length beside it, ``extra`` (name -> metric key)
    after them, and the verdict on the raw score. ``before``/``after`` are held-out metric dicts."""
    keys = {"reward_score": "eval/raw_scores", "kl_to_reference": "eval/kl",
            "response_length": "eval/response_length", **(extra or {})}
    result = {name: before_after(before, after, key) for name, key in keys.items()}
    result = {"reward_score": result.pop("reward_score"), "reward_source": reward_source, **result}
    result["verdict"] = verdict(result["reward_score"]["change"])
    return result


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} is missing; run that stage first")
    return json.loads(path.read_text())


def rule_summary(prompts: list[str], responses: list[str]) -> dict[str, float]:
    """Mean of each demo-rule check and of the overall rule score over the responses."""
    checks = [check_response(extract_question(p), r) for p, r in zip(prompts, responses)]
    if not checks:
        return {}
    summary = {name: mean(float(c[name]) for c in checks) for name in checks[0]}
    summary["rule_score"] = mean(mean(float(v) for v in c.values()) for c in checks)
    return summary


def paired_change(before: list[float | None], after: list[float | None]) -> tuple[float, float] | None:
    """Mean of ``after - before`` over the same prompts and its standard error (None below 2 prompts, or when
    a score is missing).

    Before and after are sampled from the same prompts with the same seed, so the paired error is the
    honest yardstick: a change inside two of them is what resampling alone can produce (``within_noise``)."""
    if len(before) < 2 or any(v is None for v in (*before, *after)):
        return None
    diffs = [a - b for a, b in zip(after, before)]
    return mean(diffs), stdev(diffs) / math.sqrt(len(diffs))


def within_noise(change: float, standard_error: float) -> bool:
    return abs(change) <= 2 * standard_error


def baseline_verdict(baseline: dict, winner: str = "") -> str:
    """'NOT beaten', 'beaten', or, where the run recorded its paired margin (after - best-of-n per prompt),
    'beaten by +m +- se' and ', within noise' inside two standard errors. ``winner``: ' by RL' in a run's line."""
    if not baseline["beaten"]:
        return f"NOT beaten{winner}"
    if baseline.get("standard_error") is None:
        return f"beaten{winner}"
    margin, error = baseline["margin"], baseline["standard_error"]
    return (f"beaten{winner} by {margin:+.3f} +- {error:.3f}"
            + (", within noise" if within_noise(margin, error) else ""))


def one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def build_report(rm_dir: Path | None, ppo_dir: Path, num_examples: int = 3) -> tuple[str, dict]:
    rm_eval = read_json(rm_dir / "eval_results.json") if rm_dir is not None else {}
    summary = read_json(ppo_dir / "summary.json")
    algorithm = str(summary.get("algorithm", "ppo")).upper()
    samples_path = ppo_dir / "eval_samples.jsonl"
    samples = [json.loads(line) for line in samples_path.read_text().splitlines() if line.strip()]
    prompts = [s["prompt"] for s in samples]
    rule_before = rule_summary(prompts, [s["response_before"] for s in samples])
    rule_after = rule_summary(prompts, [s["response_after"] for s in samples])
    rule_change = paired_change(rule_reward(prompts, [s["response_before"] for s in samples]),
                                rule_reward(prompts, [s["response_after"] for s in samples]))
    reward_change = paired_change([s.get("rm_score_before") for s in samples], [s.get("rm_score_after") for s in samples])
    before, after = summary["eval_before"], summary["eval_after"]
    numbers = {
        "rm_accuracy": rm_eval.get("eval_accuracy"),
        "rm_mean_margin": rm_eval.get("eval_mean_margin"),
        "rm_eval_samples": rm_eval.get("eval_samples"),
        "algorithm": algorithm.lower(),
        "ppo_steps": summary.get("steps"),
        "heldout_prompts": len(samples),
        "reward_source": summary.get("result", {}).get("reward_source", "reward-model"),
        "reward_before": before.get("eval/raw_scores"),
        "reward_after": after.get("eval/raw_scores"),
        "kl_before": before.get("eval/kl"),
        "kl_after": after.get("eval/kl"),
        "best_of_n": summary.get("result", {}).get("best_of_n"),
        "rule_before": rule_before,
        "rule_after": rule_after,
        "reward_change": reward_change and {"mean": reward_change[0], "standard_error": reward_change[1]},
        "rule_change": rule_change and {"mean": rule_change[0], "standard_error": rule_change[1]},
    }

    def fmt(value) -> str:
        return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"

    def fmt_change(change: tuple[float, float] | None) -> str:
        if change is None:
            return "n/a"
        delta, error = change
        return f"{delta:+.3f} +- {error:.3f}" + (" (within noise)" if within_noise(delta, error) else "")

    rm_line = (f"Reward model held-out accuracy: {fmt(numbers['rm_accuracy'])} "
               f"(mean margin {fmt(numbers['rm_mean_margin'])}, {numbers['rm_eval_samples']} pairs)"
               if rm_dir is not None else "No reward model (DPO learns from the preference pairs directly)")
    lines = [
        "# RLHF pipeline report",
        "",
        rm_line,
        f"{algorithm}: {numbers['ppo_steps']} steps; evaluated on {len(samples)} held-out prompts",
        "",
        f"| held-out metric | before {algorithm} | after {algorithm} | change +- paired standard error |",
        "|---|---|---|---|",
        f"| mean {numbers['reward_source']} score | {fmt(numbers['reward_before'])} | {fmt(numbers['reward_after'])} "
        f"| {fmt_change(reward_change)} |",
        f"| demo rule score (0-1) | {fmt(rule_before.get('rule_score'))} | {fmt(rule_after.get('rule_score'))} "
        f"| {fmt_change(rule_change)} |",
    ]
    baseline = numbers["best_of_n"]
    if baseline:
        margin = (baseline["margin"], baseline["standard_error"]) if "standard_error" in baseline else None
        lines.append(f"| best-of-{baseline['n']} from the starting policy (the baseline to beat) | "
                     f"{fmt(baseline['score'])} | {'beaten' if baseline['beaten'] else 'NOT beaten'} | "
                     f"{'' if margin is None else 'after - best-of-n: ' + fmt_change(margin)} |")
    for check in ("on_topic", "polite", "finished"):
        lines.append(f"| - {check} | {fmt(rule_before.get(check))} | {fmt(rule_after.get(check))} | |")
    lines += [
        f"| KL to reference (nats/response) | {fmt(numbers['kl_before'])} | {fmt(numbers['kl_after'])} | |",
        f"| response length (tokens) | {fmt(before.get('eval/response_length'))} | "
        f"{fmt(after.get('eval/response_length'))} | |",
        "",
        f"Changes are means over the {len(samples)} prompts of after minus before (each prompt sampled with the same "
        "seed before and after), with their standard error; one within two standard errors is what resampling "
        "alone produces, not a result.",
        "",
        "## Examples (held-out prompts)",
    ]
    for sample in samples[:num_examples]:
        lines += [
            "",
            f"- question: {one_line(extract_question(sample['prompt']))}",
            f"  - before: {one_line(sample['response_before'])}",
            f"  - after:  {one_line(sample['response_after'])}",
        ]
    plot_paths = ([rm_dir / "training_curves.png"] if rm_dir is not None else []) + [Path(summary["paths"].get("plot") or "")]
    plots = [p for p in plot_paths if p.is_file()]
    lines += ["", "## Plots", *[f"- {p}" for p in plots]]
    return "\n".join(lines) + "\n", numbers


@dataclass
class ReportArguments:
    rm_dir: str = field(default="outputs/demo/rm", metadata={"help": "reward_modeling.py output_dir (\"\": none)."})
    ppo_dir: str = field(default="outputs/demo/ppo", metadata={"help": "rl_training.py output_dir."})
    policy_dir: str | None = field(
        default=None, metadata={"help": "The RL or DPO stage's output_dir (its summary.json); overrides --ppo_dir."}
    )
    output: str = field(default="outputs/demo/report.md", metadata={"help": "Markdown report to write."})


def main() -> None:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(ReportArguments).parse_args_into_dataclasses()
    text, numbers = build_report(Path(args.rm_dir) if args.rm_dir else None, Path(args.policy_dir or args.ppo_dir))
    Path(args.output).write_text(text)
    Path(args.output).with_suffix(".json").write_text(json.dumps(numbers, indent=2))
    print(text)
    print(f"report written to {args.output}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
