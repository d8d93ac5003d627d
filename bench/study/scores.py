"""A run's scores, read from its per-problem evaluation records (`trl_guided.evaluate` writes them,
`trl_guided.stats` reduces them): a metric per problem (the study compares `trl_guided.stats.headline_metric`),
fluency and answer lengths."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trl_guided.evaluate import read_records
from trl_guided.stats import per_problem_values


def per_problem(run_dir: Path, metric: str, records: str = "eval.jsonl") -> dict[str, float]:
    rewards = [metric.rsplit("/", 1)[0]] if "/" in metric else []  # a reward's metric, or nll_per_token etc.
    values = per_problem_values(read_records(run_dir / records), rewards, 1)
    if rewards and metric not in values:
        raise SystemExit(f"{run_dir / records}: no {metric} in its records (was the run evaluated with that reward?)")
    return values.get(metric, {})  # fluency: absent when the quality model did not score this evaluation


def nll_per_token(run_dir: Path, problems: set[str] | None = None) -> float | None:
    """A test evaluation's fluency (mean over problems of the quality model's NLL per token), on `problems` only
    when given; None without fluency scores."""
    values = per_problem(run_dir, "nll_per_token")
    kept = [value for problem, value in values.items() if problems is None or problem in problems]
    return float(np.mean(kept)) if kept else None


def completion_tokens(run_dir: Path, records: str = "eval.jsonl") -> list[int]:
    return [r["tokens"] for r in read_records(run_dir / records)]
