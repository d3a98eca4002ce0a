"""One table comparing finished runs: what a recipe's readers look at first.

Reads each run's own ``summary.json`` (rl_training.py, or dpo_training.py with
``--heldout_reward_model``) and, when given, the reward model's ``eval_results.json``; nothing is
re-measured here. One row per run: the reward model's held-out score before -> after in its own
units (a run trained on the normalised score is mapped back with the RM's stored mean/std; never the
shaped training objective), its change, the best-of-n baseline from the starting
policy and whether the run beat it (by how much, paired per prompt, and whether that is inside twice its
standard error), KL to the reference, response length before -> after, the fraction
of answers that ended with EOS before -> after (the rest were cut at the length limit, so the reward
model scored unfinished text), how many of the held-out answers after training are distinct (a policy
that found one answer the reward model overrates, reward hacking, reads 5/64), steps and wall time. The
reward model's line adds its accuracy on validation answers cut at the policy's length, when
``rlhf.reward_accuracy`` wrote it into the RM's directory (run.sh does). The change carries its standard error from the run's
``eval_samples.jsonl`` (per prompt, score after - score before, paired: the same prompts before and
after): with 32 held-out prompts it is about
0.1 on hh-rlhf, larger than most changes a short run makes. Below the rows, per algorithm, the mean
change over its runs (seeds) with its standard error, their spread (max - min: the run-to-run noise),
and whether the mean change exceeds both the spread and twice the standard error.
Also writes ``curves.png`` beside the table: the raw training score, KL, answer length and the fraction of
answers ending with EOS per step of every RL run.

Usage::

    python -m rlhf.run_table --rm_dir outputs/hh/rm --runs outputs/hh/grpo-seed0 outputs/hh/grpo-seed1 \\
        --output outputs/hh/table.md
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from math import sqrt
from statistics import mean, stdev

from rlhf.errors import UserError, run_cli
from rlhf.plotting import plot_runs
from rlhf.report import baseline_verdict
from rlhf.reward import CONFIG_MEAN_KEY, CONFIG_STD_KEY

ACCURACY_FILE = "accuracy_by_answer_length.json"  # rlhf.reward_accuracy --output, in the RM's directory (run.sh)

HEADER = ("| run | algorithm | RM score before -> after (held-out, RM's own units) | change (+- s.e.) "
          "| best-of-n (start policy) "
          "| KL | length before -> after | finished (EOS) before -> after | distinct answers after | steps | wall time "
          "| precision |")


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
        return {**summary, "score_scale": 1.0}
    if stats is None:
        raise UserError(f"{run_dir} scored with the normalised reward model; pass --rm_dir (its stored mean/std) "
                        "to put it on the reward model's own scale")
    mean, std = stats
    score = {k: (None if v is None else v * std + (0 if k == "change" else mean))
             for k, v in result["reward_score"].items()}
    converted = {**result, "reward_score": score, "reward_source": "reward-model"}
    if result.get("best_of_n"):
        baseline = result["best_of_n"]
        converted["best_of_n"] = {**baseline, "score": baseline["score"] * std + mean,
                                  **{k: baseline[k] * std for k in ("margin", "standard_error") if k in baseline}}
    return {**summary, "result": converted, "score_scale": std}


def change_standard_error(run_dir: Path, scale: float) -> float | None:
    """Standard error of the held-out change, from the per-prompt scores in ``eval_samples.jsonl`` (paired:
    after - before on each prompt), times ``scale`` (the RM's std for a normalised run); None without them."""
    path = run_dir / "eval_samples.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    changes = [r["rm_score_after"] - r["rm_score_before"] for r in rows
               if r.get("rm_score_after") is not None and r.get("rm_score_before") is not None]
    if len(changes) < 2:
        return None
    return stdev(changes) / sqrt(len(changes)) * scale


def reward_model_stats(rm_dir: Path) -> tuple[float, float] | None:
    config = json.loads((rm_dir / "config.json").read_text()) if (rm_dir / "config.json").is_file() else {}
    if CONFIG_MEAN_KEY not in config or CONFIG_STD_KEY not in config:
        return None
    return float(config[CONFIG_MEAN_KEY]), float(config[CONFIG_STD_KEY])


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def distinct_answers(run_dir: Path) -> str:
    """'distinct / all' held-out answers after training, from eval_samples.jsonl: a policy that collapsed onto
    a few answers the reward model likes (reward hacking) shows here before anyone reads the samples."""
    path = run_dir / "eval_samples.jsonl"
    if not path.is_file():
        return "n/a"
    answers = [json.loads(line).get("response_after") for line in path.read_text().splitlines() if line.strip()]
    answers = [" ".join(a.split()) for a in answers if a is not None]
    return f"{len(set(answers))}/{len(answers)}" if answers else "n/a"


def run_row(name: str, summary: dict) -> str:
    result = summary["result"]
    score, kl, length = result["reward_score"], result["kl_to_reference"], result["response_length"]
    baseline = result.get("best_of_n")
    best = "n/a" if not baseline else f"{baseline['score']:.3f} (n={baseline['n']}, {baseline_verdict(baseline)})"
    wall = summary.get("wall_time_s")
    finished = result.get("finished", {})  # absent in runs written before the column existed
    change = "n/a" if score["change"] is None else f"{score['change']:+.3f}"
    if score["change"] is not None and summary.get("change_se") is not None:
        change += f" +- {summary['change_se']:.3f}"
    cells = (name, summary.get("algorithm", "?"), f"{fmt(score['before'])} -> {fmt(score['after'])}",
             change, best, fmt(kl["after"], 2),
             f"{fmt(length['before'], 1)} -> {fmt(length['after'], 1)}",
             f"{percent(finished.get('before'))} -> {percent(finished.get('after'))}", summary["distinct_after"],
             str(summary.get("steps", "?")),
             "n/a" if wall is None else f"{wall / 60:.1f} min", summary.get("precision", "n/a"))
    return "| " + " | ".join(cells) + " |"


def algorithm_lines(summaries: dict[str, dict]) -> list[str]:
    """Per algorithm: mean raw-score change over its runs with its standard error (when every run has one),
    and the runs' spread (max - min of the changes)."""
    by_algorithm: dict[str, list[dict]] = {}
    for summary in summaries.values():
        if summary["result"]["reward_score"]["change"] is not None:
            by_algorithm.setdefault(summary.get("algorithm", "?"), []).append(summary)
    lines = []
    for algorithm, runs in by_algorithm.items():
        changes = [run["result"]["reward_score"]["change"] for run in runs]
        errors = [run.get("change_se") for run in runs]
        standard_error = None if None in errors else sqrt(sum(e * e for e in errors)) / len(errors)
        spread = max(changes) - min(changes)
        error_text = "" if standard_error is None else f" +- {standard_error:.3f}"
        lines.append(f"- {algorithm}: mean change {mean(changes):+.3f}{error_text} over {len(changes)} run(s), "
                     f"spread {spread:.3f}; {noise_verdict(changes, spread, standard_error)}")
    return lines


def noise_verdict(changes: list[float], spread: float, standard_error: float | None = None) -> str:
    """Whether the runs moved the raw score by more than they differ from each other (run-to-run noise) and,
    when known, by more than twice the standard error of the held-out evaluation (evaluation noise)."""
    if min(changes) <= 0 <= max(changes) and len(set(changes)) > 1:
        return "mixed: not distinguishable from noise"
    if min(changes) > 0:
        verdict = "raised in every run"
    elif max(changes) < 0:
        verdict = "LOWERED in every run"
    else:
        return "unchanged"
    if len(changes) == 1:
        verdict += " (one run: no estimate of run-to-run noise)"
    else:
        verdict += (", by more than the runs' spread" if abs(mean(changes)) > spread
                    else ", but by less than the runs' spread")
    if standard_error is not None:
        beyond = abs(mean(changes)) > 2 * standard_error
        verdict += (f"; {'beyond' if beyond else 'within'} twice the evaluation's standard error "
                    f"({2 * standard_error:.3f})" + ("" if beyond else ": not distinguishable from evaluation noise"))
    return verdict


def accuracy_by_length(rm_dir: Path) -> str:
    """'; on answers cut at N tokens: a (c% of pairs cut), ...' from rlhf.reward_accuracy's output, when written:
    the policy is judged on answers of its own length, not on the whole answers of the RM's evaluation."""
    path = rm_dir / ACCURACY_FILE
    if not path.is_file():
        return ""
    figures = json.loads(path.read_text())
    cuts = sorted((int(key.rsplit("_", 1)[1]), row) for key, row in figures.items() if key.startswith("answers_cut_at_"))
    return "".join(f"; on answers cut at {tokens} tokens {row['accuracy']:.3f} ({percent(row['cut'])} of pairs cut)"
                   for tokens, row in cuts)


def build_table(run_dirs: list[Path], rm_dir: Path | None) -> str:
    stats = reward_model_stats(rm_dir) if rm_dir is not None else None
    summaries = {run_dir.name: in_reward_model_units(read_summary(run_dir), stats, run_dir) for run_dir in run_dirs}
    for run_dir in run_dirs:
        summary = summaries[run_dir.name]
        summary["change_se"] = change_standard_error(run_dir, summary["score_scale"])
        summary["distinct_after"] = distinct_answers(run_dir)
    lines = []
    if rm_dir is not None:
        path = rm_dir / "eval_results.json"
        if not path.is_file():
            raise UserError(f"{path} does not exist; pass the reward model's output directory as --rm_dir")
        accuracy = json.loads(path.read_text()).get("eval_accuracy")
        lines += [f"Reward model: held-out accuracy {fmt(accuracy)} ({rm_dir}){accuracy_by_length(rm_dir)}", ""]
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
