"""The study's statistics, from its run folders alone (run.json, eval.jsonl): per arm the gain from the starting
model with a 95 % bootstrap CI over seeds and problems, the differences between arms paired by seed and problem,
training reward at equal steps and tokens, learning curves, the pairing check and how the machine time was spent."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trl_guided.stats import headline_metric

from .ledger import load_json, read_ledger
from .plan import ARMS, run_name, study_paths
from .scores import completion_tokens, nll_per_token, per_problem
from .tuning import lr_grid, validation_score

RESAMPLES = 2000
MACHINE_TIME_NOTE = (
    "wall minutes come from the ledger of batches (two runs side by side count once); core minutes sum each run's own "
    "clock: training (the budget), evaluation (test, validation and snapshot evaluations), other (start-up, model "
    "loading, saving)."
)


def hierarchical_ci(matrix: np.ndarray, seed: int = 0, resamples: int = RESAMPLES) -> list[float]:
    """95 % CI of the mean of a seeds x problems matrix, resampling seeds and problems (both with replacement)."""
    rng = np.random.default_rng(seed)
    seeds, problems = matrix.shape
    means = np.empty(resamples)
    for b in range(resamples):
        rows = rng.integers(0, seeds, seeds)
        columns = rng.integers(0, problems, problems)
        means[b] = matrix[np.ix_(rows, columns)].mean()
    low, high = np.percentile(means, [2.5, 97.5])
    return [float(low), float(high)]


def reward_at(curve: list[dict], key: str, limit: float, window: int = 5) -> float | None:
    """Mean training reward of the last `window` logged steps with `key` <= `limit`."""
    rows = [row["reward"] for row in curve if row[key] <= limit][-window:]
    return float(np.mean(rows)) if rows else None


def step_seconds(curve: list[dict]) -> list[float]:
    """Seconds of each training step after the first (the first one also warms up)."""
    seconds = [row["seconds"] for row in curve]
    return [round(b - a, 4) for a, b in zip(seconds, seconds[1:], strict=False)]


def median_step_seconds(curve: list[dict]) -> float | None:
    steps = step_seconds(curve)
    return float(np.median(steps)) if steps else None


def _core_minutes(records: list[dict]) -> dict:
    """Core-minutes of some runs by kind of work: training clock, evaluation, the rest of each child process."""
    train = sum(r.get("train_seconds", 0.0) for r in records)
    evaluation = sum(r.get("eval_seconds", 0.0) for r in records)
    total = sum(r.get("process_seconds", r.get("wall_seconds", 0.0)) for r in records)
    return {
        "training": round(train / 60, 2),
        "evaluation": round(evaluation / 60, 2),
        "other": round(max(total - train - evaluation, 0.0) / 60, 2),
    }


def study_machine_time(runs_dir: Path, before: dict, runs: dict, tune_runs: list[dict]) -> dict:
    """How the study's wall-clock splits: per phase (from the ledger of batches), and per kind of work in
    core-minutes (training clock, evaluation, loading/saving/start-up: the rest of each child process)."""
    ledger = read_ledger(runs_dir)
    if not ledger:  # a study from before the ledger ran one child at a time: their wall-clocks add up
        ledger = [
            {"phase": r.get("phase", "final"), "wall_seconds": r.get("wall_seconds", 0.0)} for r in runs.values()
        ]
        ledger += [{"phase": "before", "wall_seconds": before.get("wall_seconds", 0.0)}]
    by_phase = {}
    for entry in ledger:
        by_phase[entry["phase"]] = by_phase.get(entry["phase"], 0.0) + entry["wall_seconds"] / 60
    return {
        "wall_minutes": round(sum(by_phase.values()), 2),
        "wall_minutes_by_phase": {phase: round(minutes, 2) for phase, minutes in by_phase.items()},
        "core_minutes": {
            "before": _core_minutes([before]),
            "tune": _core_minutes(tune_runs),
            "final": _core_minutes(list(runs.values())),
        },
        "note": MACHINE_TIME_NOTE,
    }


class Scores:
    """The headline metric per problem of the starting model and of the seeds every arm completed."""

    def __init__(self, runs_dir: Path, metric: str, runs: dict, arms: list[str]):
        self.runs_dir, self.arms = runs_dir, arms
        self.before = per_problem(runs_dir / "before", metric)
        self.problems = sorted(self.before)
        seeds = sorted({r["seed"] for r in runs.values()})
        self.complete = [s for s in seeds if all(run_name(arm, s) in runs for arm in arms)]
        self.after = {
            run_name(arm, s): per_problem(runs_dir / run_name(arm, s), metric) for arm in arms for s in self.complete
        }
        self.base = np.array([self.before[p] for p in self.problems])

    def matrix(self, arm: str) -> np.ndarray:
        return np.array([[self.after[run_name(arm, s)][p] for p in self.problems] for s in self.complete])

    def fluency_problems(self) -> set[str] | None:
        """The problems every run's fluency was measured on (--quality-problems), the starting model's too."""
        scored = [set(per_problem(self.runs_dir / name, "nll_per_token")) for name in [*self.after, "before"]]
        return set.intersection(*scored) if self.after else None

    def pairs(self) -> dict:
        pairs = {}
        for i, first in enumerate(self.arms):
            for second in self.arms[i + 1 :]:
                difference = self.matrix(first) - self.matrix(second)
                pairs[f"{first} - {second}"] = {
                    "difference": float(difference.mean()),
                    "ci95": hierarchical_ci(difference),
                }
        return pairs


def arm_entry(arm: str, scores: Scores, runs: dict, before_run: dict, equal: dict, fluency: set | None) -> dict:
    """One arm's row of the report: its runs' steps and timings, the gain and its CI, fluency, training reward."""
    runs_dir, complete = scores.runs_dir, scores.complete
    arm_runs = [runs[run_name(arm, s)] for s in complete]
    gains = scores.matrix(arm) - scores.base
    first = arm_runs[0] if arm_runs else {}
    entry = {
        # The arm's own overlay (the study-wide settings and the tuned rate apart): what names its configuration.
        "overrides": first.get("arm_overlay") or ARMS.get(arm) or first.get("overrides"),
        "learning_rate": arm_runs[0].get("learning_rate") if arm_runs else None,
        "seeds": complete,
        "steps": [r["steps"] for r in arm_runs],
        "tokens": [r["tokens"] for r in arm_runs],
        "train_seconds": [r["train_seconds"] for r in arm_runs],
        "median_step_seconds": [median_step_seconds(r["curve"]) for r in arm_runs],
        "accuracy_before": float(scores.base.mean()),
        "accuracy_after": [float(row.mean()) for row in scores.matrix(arm)],
        "gain": float(gains.mean()),
        "gain_ci95": hierarchical_ci(gains),
        "nll_per_token_before": nll_per_token(runs_dir / "before", fluency),
        "nll_per_token_after": [nll_per_token(runs_dir / run_name(arm, s), fluency) for s in complete],
        "repetition_before": before_run["evals"][0].get("repetition"),
        "repetition_after": [r["evals"][-1].get("repetition") for r in arm_runs],
        "median_completion_tokens_after": [
            float(np.median(completion_tokens(runs_dir / run_name(arm, s)))) for s in complete
        ],
        "truncated_after": [r["evals"][-1].get("truncated") for r in arm_runs],
        "train_reward_at_end": [reward_at(r["curve"], "seconds", float("inf")) for r in arm_runs],
        "train_reward_at_equal_steps": [reward_at(r["curve"], "step", equal["steps"]) for r in arm_runs],
        "train_reward_at_equal_tokens": [reward_at(r["curve"], "tokens", equal["tokens"]) for r in arm_runs],
    }
    if "plain" in scores.arms and arm != "plain" and complete:
        difference = scores.matrix(arm) - scores.matrix("plain")
        entry["difference_to_plain"] = float(difference.mean())
        entry["difference_to_plain_ci95"] = hierarchical_ci(difference)
    return entry


def analyse(out: Path, name: str = "learning", arm_order: list[str] | None = None) -> dict:
    """The report's content, from run.json and eval.jsonl files alone."""
    runs_dir = study_paths(out, name)[2]
    before_run = load_json(runs_dir / "before" / "run.json")
    metric = headline_metric(before_run["settings"]["reward_funcs"])
    runs = {p.parent.name: load_json(p) for p in sorted(runs_dir.glob("*/run.json")) if p.parent.name != "before"}
    present = {r["arm"] for r in runs.values()}
    arms = [arm for arm in (arm_order or list(ARMS)) if arm in present] + sorted(present - set(arm_order or ARMS))
    scores = Scores(runs_dir, metric, runs, arms)
    equal = {
        "steps": min((r["steps"] for r in runs.values()), default=0),
        "tokens": min((r["tokens"] for r in runs.values()), default=0),
    }
    fluency = scores.fluency_problems()
    report_arms = {arm: arm_entry(arm, scores, runs, before_run, equal, fluency) for arm in arms}
    tune_runs = [load_json(p) for p in sorted((runs_dir / "tune").glob("*/run.json"))]
    machine_time = study_machine_time(runs_dir, before_run, runs, tune_runs)
    report = {
        "study_seconds": round(machine_time["wall_minutes"] * 60, 1),  # the batches' wall-clock, summed
        "question": "Does guided GRPO reach a better model than plain GRPO for the same wall-clock?",
        "metric": f"{metric} on the test split, greedy, plain sampling",
        "problems": len(scores.problems),
        "base_median_completion_tokens": float(np.median(completion_tokens(runs_dir / "before"))),
        "seeds_complete": scores.complete,
        "equal_steps": equal["steps"],
        "equal_tokens": equal["tokens"],
        "before": before_run,
        "arms": report_arms,
        "pairs": scores.pairs(),
        "runs": {name: {k: v for k, v in run.items() if k != "curve"} for name, run in runs.items()},
        "curves": {name: run["curve"] for name, run in runs.items()},
        "learning_curves": {
            name: learning_curve(runs_dir / name, run, metric, scores.before) for name, run in runs.items()
        },
        "machine_time": machine_time,
    }
    if tune_runs:
        report.update(tuning_report(runs_dir, metric))
    pairing = pairing_check(runs_dir)
    if pairing:
        report["pairing_check"] = pairing
    return report


def tuning_report(runs_dir: Path, metric: str) -> dict:
    """The validation problems the tuning runs were scored on, the starting model's score, the grid."""
    validation = load_json(runs_dir / "validation.json")
    excluded = set(validation["excluded_training_prompts"])
    return {
        "validation": {
            "problems": validation["problems"],
            "evaluated": validation["limit"],
            "excluded_training_prompts": len(excluded),
            "score_before": validation_score(runs_dir / "before", metric, excluded),
        },
        "lr_grid": lr_grid(runs_dir, metric),
    }


def learning_curve(run_dir: Path, run: dict, metric: str, before: dict[str, float]) -> list[dict]:
    """Held-out score over training wall-clock: the starting model (`before`, per problem), each snapshot on its test
    subset, then the final model; the first and the last on the snapshots' subset too (their full evaluations
    restricted to those problems). Without snapshots, the starting and the final score."""
    snapshots = [e for e in run["evals"] if e.get("subset")]
    final = run["evals"][-1]
    full = per_problem(run_dir, metric, final["records"])
    problems = list(per_problem(run_dir, metric, snapshots[0]["records"])) if snapshots else list(full)
    points = [{"seconds": e["seconds"], "step": e["step"], "score": e[metric]} for e in snapshots]
    return [
        {"seconds": 0.0, "step": 0, "score": float(np.mean([before[p] for p in problems]))},
        *points,
        {"seconds": final["seconds"], "step": final["step"], "score": float(np.mean([full[p] for p in problems]))},
    ]


def pairing_check(runs_dir: Path) -> dict | None:
    """Median seconds per training step of one run alone and of two runs side by side (one core each)."""
    folder = runs_dir / "pairing"
    names = ("alone", "paired-a", "paired-b")
    if not all((folder / n / "run.json").exists() for n in names):
        return None
    curves = {n: load_json(folder / n / "run.json")["curve"] for n in names}
    medians = {n: median_step_seconds(curve) for n, curve in curves.items()}
    measure = "median seconds per step after the first"
    if any(median is None for median in medians.values()):
        if not all(curves.values()):
            return None  # a run that made no step: nothing to compare
        # The check's budget allowed one step: its time, warm-up included, for all three alike.
        medians = {n: curve[0]["seconds"] for n, curve in curves.items()}
        measure = "seconds of the first step, warm-up included (a run made one step only)"
    paired = float(np.mean([medians["paired-a"], medians["paired-b"]]))
    return {
        "median_step_seconds_alone": medians["alone"],
        "median_step_seconds_paired": paired,
        "paired_over_alone": paired / medians["alone"] if medians["alone"] else None,
        "measure": measure,
    }
