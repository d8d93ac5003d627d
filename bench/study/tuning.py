"""The learning rate per arm: which validation problems score a tuning run (neither test problems nor training
prompts), each grid value's validation score, and the rate the test runs use."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trl_guided.evaluate import load_problems
from trl_guided.train import eval_settings

from .ledger import load_json
from .scores import per_problem

TIE = 1e-9  # validation scores closer than this are a tie (equal numbers of solved problems)


def select_rate(scores: dict[float, float]) -> float:
    """The learning rate with the best validation score; a tie (within TIE) goes to the smaller rate."""
    best = max(scores.values())
    return min(rate for rate, score in scores.items() if score >= best - TIE)


def _problem_ids(task_args, training_args, split: str, limit: int | None) -> list[str]:
    settings = eval_settings(task_args, training_args)
    settings.split, settings.limit = split, limit
    try:
        return load_problems(settings)[1]
    except Exception as error:
        raise SystemExit(
            f"[learning] tuning the learning rate needs a validation split of task {task_args.task!r}: {error}"
        ) from None


def _prompt_hash(problem_id: str) -> str:
    return problem_id.split("-", 1)[1]


def validation_plan(task_args, training_args, size: int) -> dict:
    """How many validation problems to evaluate so that `size` of them are not training prompts, and which ids are
    left out of the score. A validation problem is never a test problem (checked: an overlap is an error); it may be
    drawn again in the training set of a generated task (train and validation share the non-test partition), and
    such problems are excluded, so that the rate is chosen on problems the model has not trained on, like the test."""
    train = {_prompt_hash(i) for i in _problem_ids(task_args, training_args, "train", None)}
    test = {_prompt_hash(i) for i in _problem_ids(task_args, training_args, "test", None)}
    limit = size
    while True:
        validation = _problem_ids(task_args, training_args, "validation", limit)
        if set(map(_prompt_hash, validation)) & test:
            shared = len(set(map(_prompt_hash, validation)) & test)
            raise SystemExit(f"[learning] {shared} validation problems of task {task_args.task!r} are test problems")
        kept = [i for i in validation if _prompt_hash(i) not in train]
        if len(kept) >= size or len(validation) < limit:
            break
        limit *= 2
    kept = kept[:size]
    if not kept:
        raise SystemExit(f"[learning] every validation problem of task {task_args.task!r} is a training prompt")
    last = validation.index(kept[-1]) + 1
    excluded = [i for i in validation[:last] if _prompt_hash(i) in train]
    return {"limit": last, "problems": len(kept), "excluded_training_prompts": excluded}


def validation_score(run_dir: Path, metric: str, excluded: set[str]) -> float:
    """Mean validation score over the problems that are not training prompts."""
    values = per_problem(run_dir, metric, "validation.jsonl")
    kept = [value for problem, value in values.items() if problem not in excluded]
    return float(np.mean(kept))


def lr_grid(runs_dir: Path, metric: str) -> dict:
    """Per tuned arm: every grid value's validation score (mean over tuning seeds) and the chosen rate. Only rates
    whose tuning runs all finished enter the choice; `complete` says whether every rate finished for every seed."""
    validation = load_json(runs_dir / "validation.json") if (runs_dir / "validation.json").exists() else {}
    excluded = set(validation.get("excluded_training_prompts", []))
    grid = {}
    for path in sorted((runs_dir / "tune").glob("*/run.json")):
        record = load_json(path)
        arm = grid.setdefault(record["arm"], {"runs": []})
        arm["runs"].append(
            {
                "learning_rate": record["learning_rate"],
                "seed": record["seed"],
                "score": validation_score(path.parent, metric, excluded),
                "steps": record["steps"],
                "train_seconds": record["train_seconds"],
            }
        )
    for entry in grid.values():
        entry["runs"].sort(key=lambda run: (run["learning_rate"], run["seed"]))
        seeds = sorted({run["seed"] for run in entry["runs"]})
        rates = sorted({run["learning_rate"] for run in entry["runs"]})
        scores = {}
        for rate in rates:
            values = [run["score"] for run in entry["runs"] if run["learning_rate"] == rate]
            if len(values) == len(seeds):
                scores[rate] = float(np.mean(values))
        entry["rates"] = rates
        entry["scores"] = [scores.get(rate) for rate in rates]
        entry["seeds"] = seeds
        entry["complete"] = len(scores) == len(rates)
        entry["chosen"] = select_rate(scores) if scores else None
    return grid
