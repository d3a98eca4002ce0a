"""Training curves as PNG files, beside the metrics they are drawn from.

matplotlib is imported when a plot is drawn, not with this module: every script imports it, and most of the
scripts' processes (tests, resumed runs, ``--help``) never plot."""

from __future__ import annotations

import math
from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rows: list[dict], keys: list[str], path: str | Path, x_key: str = "step", title: str = "") -> Path | None:
    """One subplot per key present in ``rows`` (a list of metric dicts); returns the PNG path."""
    present = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not present:
        return None
    columns = min(3, len(present))
    lines = math.ceil(len(present) / columns)
    plt = pyplot()
    figure, axes = plt.subplots(lines, columns, figsize=(4.5 * columns, 3.2 * lines), squeeze=False)
    for axis, key in zip(axes.flat, present):
        points = [(r[x_key], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and x_key in r]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
        axis.set_title(key)
        axis.set_xlabel(x_key)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(present) :]:
        axis.axis("off")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_trainer_history(log_history: list[dict], output_dir: str | Path, extra_keys: tuple[str, ...] = ()) -> Path | None:
    """Training curves of a transformers Trainer run (its `state.log_history`)."""
    keys = ["loss", "eval_loss", "learning_rate", "grad_norm", *extra_keys]
    return plot_curves(log_history, keys, Path(output_dir) / "training_curves.png")


RUN_CURVE_KEYS = ("objective/raw_scores", "objective/kl", "response/length", "response/ended_with_eos")


def plot_runs(metrics_files: dict[str, Path], path: str | Path, keys: tuple[str, ...] = RUN_CURVE_KEYS) -> Path | None:
    """Several runs on shared axes, one subplot per key: each run's ``metrics.jsonl`` (missing files skipped)."""
    import json

    runs = {name: [json.loads(line) for line in Path(f).read_text().splitlines() if line.strip()]
            for name, f in metrics_files.items() if Path(f).is_file()}
    present = [k for k in keys if any(isinstance(r.get(k), (int, float)) for rows in runs.values() for r in rows)]
    if not present:
        return None
    plt = pyplot()
    figure, axes = plt.subplots(1, len(present), figsize=(4.8 * len(present), 3.4), squeeze=False)
    for axis, key in zip(axes.flat, present):
        for name, rows in runs.items():
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], label=name, linewidth=1.2)
        axis.set_title(key)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
