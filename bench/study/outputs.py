"""The study's report: `<name>.json` (the settings, the machine, the analysis) and `<name>.png` (training reward and
held-out score over training wall-clock)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
import trl

from .analysis import analyse
from .ledger import save_json
from .plan import run_name, shown, study_paths

PALETTE = (
    "#444444",
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
)


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def report_settings(args: argparse.Namespace, arms: dict) -> dict:
    return {
        "name": args.name,
        "recipe": shown(Path(args.recipe)),
        "task": args.task,
        "arms": {arm: entry["overrides"] for arm, entry in arms.items()},  # every arm with runs
        "seeds": args.seeds,
        "budget_minutes": args.budget_minutes,
        "eval_every_minutes": args.eval_every_minutes,
        "curve_problems": args.curve_problems,
        "test_problems": args.test_problems,
        "lr_grid": args.lr_grid,
        "tune_minutes": args.tune_minutes,
        "tune_seeds": args.tune_seeds,
        "validation_problems": args.validation_problems,
        "parallel": args.parallel,
        "threads": args.threads,
        "cores": args.cores,
        "tiny": args.tiny,
        "set": dict(args.set),
    }


def write_report(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    report_path, plot_path, _ = study_paths(out, args.name)
    report = analyse(out, args.name, list(args.arm_overlays))
    report = {
        "command": " ".join(["python bench/learning.py", *sys.argv[1:]]),
        "settings": report_settings(args, report["arms"]),
        "machine": machine(),
        **report,
    }
    save_json(report_path, report)
    plot(report, plot_path)
    return report


def _plot_rewards(ax, report: dict, arm: str, names: list[str], colour: str) -> None:
    """Each seed's training reward (moving mean of 5 steps) over minutes, thin; their mean, thick."""
    grid = np.linspace(0, max(report["runs"][n]["train_seconds"] for n in names) / 60, 60)
    smoothed = []
    for name in names:
        curve = report["curves"][name]
        if not curve:
            continue
        minutes = np.array([row["seconds"] for row in curve]) / 60
        reward = np.convolve([row["reward"] for row in curve], np.ones(5) / 5, mode="full")[: len(curve)]
        reward /= np.minimum(np.arange(1, len(curve) + 1), 5) / 5  # the first steps average fewer values
        ax.plot(minutes, reward, color=colour, alpha=0.3, linewidth=0.8)
        smoothed.append(np.interp(grid, minutes, reward))
    if smoothed:
        ax.plot(grid, np.mean(smoothed, axis=0), color=colour, linewidth=2.5, label=arm)


def _plot_scores(ax, report: dict, arm: str, names: list[str], colour: str) -> bool:
    """Each seed's learning curve, thin; their mean, thick. True when a curve has snapshots (a test subset)."""
    subset, points = False, []
    for name in names:
        curve = report["learning_curves"][name]
        subset = subset or len(curve) > 2
        xs = [point["seconds"] / 60 for point in curve]
        ys = [point["score"] for point in curve]
        ax.plot(xs, ys, color=colour, alpha=0.3, linewidth=0.8, marker="o", markersize=3)
        points.append((xs, ys))
    if len({len(p[0]) for p in points}) == 1:  # seeds with as many snapshots: their mean
        xs = np.mean([p[0] for p in points], axis=0)
        ys = np.mean([p[1] for p in points], axis=0)
        ax.plot(xs, ys, color=colour, linewidth=2.5, marker="o", label=arm)
    return subset


def plot(report: dict, path: Path) -> None:
    import matplotlib  # heavy, and only the report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend

    colours = dict(zip(report["arms"], PALETTE * 3, strict=False))
    fig, (reward_ax, accuracy_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    subset = False
    for arm in report["arms"]:
        names = [run_name(arm, s) for s in report["arms"][arm]["seeds"]]
        if not names:
            continue
        _plot_rewards(reward_ax, report, arm, names, colours[arm])
        subset = _plot_scores(accuracy_ax, report, arm, names, colours[arm]) or subset
    reward_ax.set(title="Training reward (moving mean of 5 steps)", xlabel="training wall-clock (min)")
    reward_ax.set(ylabel="reward")
    problems = "the first test problems" if subset else f"{report['problems']} test problems"
    accuracy_ax.set(
        title=f"Held-out score ({problems}, greedy)",
        xlabel="training wall-clock (min)",
        ylabel=report["metric"].split()[0],
    )
    for ax in (reward_ax, accuracy_ax):
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=9)
    fig.suptitle("Thin: one seed; thick: mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
