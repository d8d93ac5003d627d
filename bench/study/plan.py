"""The study's plan: its arms, the names of its runs, the order and batches they run in, and each run's spec.

A run's spec (a dict, written to the run folder's `spec.json` by the runner and read by the child that trains or
evaluates it) holds everything that decides the run. Its `overrides` are recipe fields over the base recipe: the
study-wide settings, the arm's overlay, `--set`, and for a tuned arm the learning rate (`StudyPlan.overlay`). The
child turns the spec into a training command line once (`argv_for`), parses it once, and records the parsed
`learning_rate` in run.json, which the tuning and the report read back.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parents[1]
ROOT = BENCH.parent
ENTRY = BENCH / "learning.py"  # the command line, also of the child processes (run-one, evaluate-runs, ...)
RECIPE = BENCH / "learning.yaml"
ARMS = {
    "plain": {"guidance": False},
    "guided": {"guidance": True, "guidance_loss_scope": "guidance"},
    "guided_postfix": {"guidance": True, "guidance_loss_scope": "guidance_postfix"},
    # Branch where the policy is least sure (TreeRL): the first guidance token is the most uncertain one.
    "guided_entropy": {"guidance": True, "guidance_loss_scope": "guidance", "branch_point": "entropy"},
}
TINY = {
    "max_completion_length": 12,
    "prefix_min_tokens": 2,
    "prefix_max_tokens": 6,
    "max_guide_tokens": 3,
    "heldout_max_new_tokens": 12,
    "heldout_limit": 8,
    "dataset_size": 40,
}
# Over a training recipe (--task, or a --recipe outside bench/; bench's own study recipes hold these already): what
# the study needs from every run. A wall-clock budget, not max_steps, ends a run, so the schedule must not depend on
# max_steps; one log row per step; no checkpoints, trackers or evaluation inside the run (the study evaluates).
STUDY_SETTINGS = {
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_steps": 2,
    "max_steps": 100000,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "heldout_temperature": 0.0,
    "eval_before_after": False,
    "log_completions": False,
}


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-seed{seed}"


def tune_name(arm: str, rate: float, seed: int) -> str:
    return f"{arm}-lr{rate:g}-seed{seed}"


def study_paths(out: Path, name: str) -> tuple[Path, Path, Path]:
    """(report JSON, plot PNG, per-run folder) of the study called `name` in `out`."""
    return out / f"{name}.json", out / f"{name}.png", out / f"{name}_runs"


def shown(path: Path) -> str:
    """A path as the study's files name it: relative to the repository when inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def load_arms(path: str | None) -> dict[str, dict]:
    """The arms: ARMS, or a YAML file mapping each arm's name to its recipe overlay (fields of the recipe's config)."""
    if path is None:
        return dict(ARMS)
    arms = yaml.safe_load(Path(path).read_text())
    if not isinstance(arms, dict) or not arms or not all(isinstance(v, dict) for v in arms.values()):
        raise SystemExit(
            f"{path}: an arms file maps each arm's name to a mapping of recipe fields, e.g. plain: {{guidance: false}}"
        )
    if "plain" not in arms:
        raise SystemExit(f"{path}: the arms need a 'plain' arm (guidance: false): every arm is compared with it")
    return arms


def batches(items: list, parallel: int, group=lambda item: None) -> list[list]:
    """Consecutive items in batches of up to `parallel`, a batch never mixing two groups (two seeds)."""
    out = []
    for item in items:
        if out and len(out[-1]) < parallel and group(out[-1][0]) == group(item):
            out[-1].append(item)
        else:
            out.append([item])
    return out


def final_order(arms: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """Seed-major; the arm order rotates by one per seed, so a batch's partners (and a lone last run) change."""
    order = []
    for index, seed in enumerate(seeds):
        shift = index % len(arms)
        order += [(arm, seed) for arm in arms[shift:] + arms[:shift]]
    return order


def argv_for(spec: dict) -> list[str]:
    """The training command line of a run: the base recipe, then the run's overrides, seed and output folder."""
    argv = ["--config", spec["recipe"]]
    for key, value in {**spec["overrides"], "seed": spec["seed"], "output_dir": spec["work_dir"]}.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def deferred(spec: dict) -> bool:
    """Whether a run's evaluations wait for an evaluation round (the vLLM backend: one engine for many models)."""
    return spec.get("eval_backend", "transformers") == "vllm"


def identity(spec: dict) -> dict:
    """What decides a run's result: a finished run whose identity differs from the planned one is redone."""
    keys = ("overrides", "seed", "budget", "eval", "validation", "eval_every_seconds", "curve_problems")
    # The recipe by its path in the repository, so that a study resumes from another checkout.
    found = {"recipe": shown(Path(spec["recipe"])), **{key: spec.get(key) for key in keys}}
    if deferred(spec):  # studies evaluated with transformers keep the identity they were recorded with
        found["eval_backend"] = spec["eval_backend"]
    return found


class StudyPlan:
    """The runs of one invocation, phase by phase (pairing check, the starting model, tuning, test runs), as specs."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.report_path, self.plot_path, self.runs = study_paths(self.out, args.name)
        self.arms = {arm: args.arm_overlays[arm] for arm in args.arms}
        self.scratch = Path(tempfile.gettempdir()) / f"learning-{os.getpid()}"
        self.overrides = {"disable_tqdm": True}
        if Path(args.recipe).resolve().parent != BENCH:  # a training recipe, not one written for this study
            self.overrides.update(STUDY_SETTINGS)
        if args.tiny:
            self.overrides.update(TINY, model_name_or_path=args.model)
        self.base = {
            "recipe": str(Path(args.recipe).resolve()),
            "threads": args.threads,
            "quality_model": args.model if args.tiny else "embedded:smollm2-135m-instruct",
            "eval_every_seconds": 0,
            "curve_problems": None,
            "eval_backend": args.eval_backend,
        }
        self.test_eval = {"split": "test", "limit": args.test_problems, "records": "eval.jsonl"}

    def overlay(self, arm: str, rate: float | None = None) -> dict:
        """A run's recipe overrides: the study's, the arm's, --set, and a tuned learning rate (the study's choice)."""
        overrides = {**self.overrides, **self.arms[arm], **dict(self.args.set)}
        if rate is not None:
            overrides["learning_rate"] = rate
        return overrides

    def spec(self, phase: str, name: str, arm: str, seed: int, overrides: dict, run_dir: Path, **extra) -> dict:
        return {
            **self.base,
            "phase": phase,
            "name": name,
            "arm": arm,
            "arm_overlay": self.arms.get(arm),
            "seed": seed,
            "overrides": overrides,
            "run_dir": str(run_dir),
            "work_dir": str(self.scratch / phase / name),
            **extra,
        }

    def tuned_arms(self) -> list[str]:
        if len(self.args.lr_grid or []) < 2:
            return []
        fixed = dict(self.args.set)
        return [arm for arm in self.arms if "learning_rate" not in self.arms[arm] and "learning_rate" not in fixed]

    def before_spec(self, validation: dict | None) -> dict:
        spec = self.spec(
            "before", "before", "before", 0, dict(self.overrides), self.runs / "before", eval=self.test_eval
        )
        spec["validation"] = validation
        spec["budget"] = 0
        return spec

    def tune_specs(self, validation: dict) -> list[dict]:
        specs = []
        evaluation = {"split": "validation", "limit": validation["limit"], "records": "validation.jsonl"}
        for seed in self.args.tune_seeds:
            for arm in self.tuned_arms():
                for rate in self.args.lr_grid:
                    name = tune_name(arm, rate, seed)
                    overrides = self.overlay(arm, rate)
                    spec = self.spec("tune", name, arm, seed, overrides, self.runs / "tune" / name, eval=evaluation)
                    specs.append({**spec, "budget": self.args.tune_minutes * 60})
        return specs

    def final_specs(self, rates: dict[str, float]) -> list[dict]:
        specs = []
        for arm, seed in final_order(list(self.arms), self.args.seeds):
            name = run_name(arm, seed)
            spec = self.spec("final", name, arm, seed, self.overlay(arm, rates.get(arm)), self.runs / name)
            spec.update(
                budget=self.args.budget_minutes * 60,
                eval=self.test_eval,
                eval_every_seconds=(self.args.eval_every_minutes or 0) * 60,
                curve_problems=self.args.curve_problems if self.args.eval_every_minutes else None,
                # Not part of a run's identity: it applies to the evaluations that have not run yet.
                quality_problems=self.args.quality_problems,
            )
            specs.append(spec)
        return specs

    def pairing_specs(self) -> list[list[dict]]:
        arm, minutes = next(iter(self.arms)), self.args.pairing_check_minutes
        folder = self.runs / "pairing"

        def one(name: str, seed: int) -> dict:
            spec = self.spec("pairing", name, arm, seed, self.overlay(arm), folder / name, eval=None)
            return {**spec, "budget": minutes * 60}

        return [[one("alone", 0)], [one("paired-a", 0), one("paired-b", 1)]]

    def check_specs(self) -> list[dict]:
        """One spec per arm and grid rate, for checking that every run's settings parse before anything runs."""
        return [
            self.spec("check", arm, arm, 0, self.overlay(arm, rate), self.scratch)
            for arm in self.arms
            for rate in (self.args.lr_grid if arm in self.tuned_arms() else [None])
        ]
