"""One table comparing finished runs: what a recipe's readers look at first.

Reads each run's own ``summary.json`` (rl_training.py, or dpo_training.py with
``--heldout_reward_model``) and, when given, the reward model's ``eval_results.json``; nothing is
re-measured here. One row per run: the reward model's held-out score before -> after in its own
units (a run trained on the normalised score is mapped back with the RM's stored mean/std; never the
shaped training objective), its change, the best-of-n baseline from the starting
policy and whether the run beat it, KL to the reference, response length before -> after, steps and
wall time. Below the rows, per algorithm, the mean change over its runs (seeds), their spread (max - min: the
run-to-run noise) and whether the mean change exceeds it.
Also writes ``curves.png`` beside the table: the raw training score and KL per step of every RL run.

Usage::

    python -m rlhf.run_table --rm_dir outputs/hh/rm --runs outputs/hh/grpo-seed0 outputs/hh/grpo-seed1 \\
        --output outputs/hh/table.md
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

from rlhf.errors import UserError, run_cli
from rlhf.plotting import plot_runs
from rlhf.reward import CONFIG_MEAN_KEY, CONFIG_STD_KEY

HEADER = ("| run | algorithm | RM score before -> after (held-out, RM's own units) | change | best-of-n (start policy) "
          "| KL | length before -> after | steps | wall time |")


@dataclass
class TableArguments:
    runs: list[str] = field(metadata={"help": "Run output directories (each with summary.json)."})
    rm_dir: str | None = field(default=None, metadata={"help": "Reward-model directory (its eval_results.json)."})
    output: str | None = field(default=None, metadata={"help": "Markdown file to write (default: print only)."})


def read_summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise UserError(f"{path} does not exist; is {run_dir} a finished rl_training.py/dpo_training.py run?")
    summary = json.loads(path.read_text())
    if "reward_score" not in summary.get("result", {}):
        raise UserError(f"{path} has no reward-model score; run DPO with --heldout_reward_model RM_DIR")
    return summary


def in_reward_model_units(summary: dict, stats: tuple[float, float] | None, run_dir: Path) -> dict:
    """The summary with a run's normalised scores (``--normalize_reward``) mapped back to the reward model's
    own units, so that every row (DPO's are raw) is on one scale: score * std + mean, change * std."""
    result = summary["result"]
    if "normalised" not in result.get("reward_source", ""):
        return summary
    if stats is None:
        raise UserError(f"{run_dir} scored with the normalised reward model; pass --rm_dir (its stored mean/std) "
                        "to put it on the reward model's own scale")
    mean, std = stats
    score = {k: (None if v is None else v * std + (0 if k == "change" else mean))
             for k, v in result["reward_score"].items()}
    converted = {**result, "reward_score": score, "reward_source": "reward-model"}
    if result.get("best_of_n"):
        converted["best_of_n"] = {**result["best_of_n"], "score": result["best_of_n"]["score"] * std + mean}
    return {**summary, "result": converted}


def reward_model_stats(rm_dir: Path) -> tuple[float, float] | None:
    config = json.loads((rm_dir / "config.json").read_text()) if (rm_dir / "config.json").is_file() else {}
    if CONFIG_MEAN_KEY not in config or CONFIG_STD_KEY not in config:
        return None
    return float(config[CONFIG_MEAN_KEY]), float(config[CONFIG_STD_KEY])


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def run_row(name: str, summary: dict) -> str:
    result = summary["result"]
    score, kl, length = result["reward_score"], result["kl_to_reference"], result["response_length"]
    baseline = result.get("best_of_n")
    best = ("n/a" if not baseline else
            f"{baseline['score']:.3f} (n={baseline['n']}, {'beaten' if baseline['beaten'] else 'NOT beaten'})")
    wall = summary.get("wall_time_s")
    cells = (name, summary.get("algorithm", "?"), f"{fmt(score['before'])} -> {fmt(score['after'])}",
             f"{score['change']:+.3f}" if score["change"] is not None else "n/a", best, fmt(kl["after"], 2),
             f"{fmt(length['before'], 1)} -> {fmt(length['after'], 1)}", str(summary.get("steps", "?")),
             "n/a" if wall is None else f"{wall / 60:.1f} min")
    return "| " + " | ".join(cells) + " |"


def algorithm_lines(summaries: dict[str, dict]) -> list[str]:
    """Per algorithm: mean raw-score change over its runs, and the runs' spread (max - min of the changes)."""
    by_algorithm: dict[str, list[float]] = {}
    for summary in summaries.values():
        change = summary["result"]["reward_score"]["change"]
        if change is not None:
            by_algorithm.setdefault(summary.get("algorithm", "?"), []).append(change)
    lines = []
    for algorithm, changes in by_algorithm.items():
        spread = max(changes) - min(changes)
        lines.append(f"- {algorithm}: mean change {mean(changes):+.3f} over {len(changes)} run(s), "
                     f"spread {spread:.3f}; {noise_verdict(changes, spread)}")
    return lines


def noise_verdict(changes: list[float], spread: float) -> str:
    """Whether the runs moved the raw score by more than they differ from each other (run-to-run noise)."""
    if min(changes) > 0:
        if len(changes) == 1:
            return "raised (one run: no estimate of run-to-run noise)"
        return ("raised in every run, by more than the runs' spread" if mean(changes) > spread
                else "raised in every run, but by less than the runs' spread")
    if max(changes) < 0:
        return "LOWERED in every run"
    return "mixed: not distinguishable from noise"


def build_table(run_dirs: list[Path], rm_dir: Path | None) -> str:
    stats = reward_model_stats(rm_dir) if rm_dir is not None else None
    summaries = {run_dir.name: in_reward_model_units(read_summary(run_dir), stats, run_dir) for run_dir in run_dirs}
    lines = []
    if rm_dir is not None:
        path = rm_dir / "eval_results.json"
        if not path.is_file():
            raise UserError(f"{path} does not exist; pass the reward model's output directory as --rm_dir")
        accuracy = json.loads(path.read_text()).get("eval_accuracy")
        lines += [f"Reward model: held-out accuracy {fmt(accuracy)} ({rm_dir})", ""]
    lines += [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    lines += [run_row(name, summary) for name, summary in summaries.items()]
    lines += ["", *algorithm_lines(summaries)]
    return "\n".join(lines) + "\n"


def main() -> None:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(TableArguments).parse_args_into_dataclasses()
    run_dirs = [Path(r) for r in args.runs]
    table = build_table(run_dirs, Path(args.rm_dir) if args.rm_dir else None)
    print(table, end="")
    if args.output:
        output = Path(args.output)
        output.write_text(table)
        plot = plot_runs({d.name: d / "metrics.jsonl" for d in run_dirs}, output.with_name("curves.png"))
        print(f"Table: {output}" + (f"; curves: {plot}" if plot else ""))


if __name__ == "__main__":
    sys.exit(run_cli(main))
