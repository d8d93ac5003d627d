"""Does guidance help? Guided vs plain GRPO at equal wall-clock, evaluated on held-out problems.

    python bench/learning.py                        # the arithmetic study -> bench/learning.json, bench/learning.png
    python bench/learning.py --study bench/learning_regime_study.yaml   # the regime study -> bench/learning_regime.*
    python bench/learning.py --tiny --out DIR       # a tiny local model, seconds: checks the pipeline, not the result
    python bench/learning.py --fresh                # redo the runs that already finished
    python bench/learning.py --report-only          # statistics and plot again from the per-run records
    python bench/learning.py --plan                 # the runs, batches and training minutes, without running

Every arm (a recipe overlay: ARMS below, or an `--arms-file`) trains once per seed for the same wall-clock budget
(`--budget-minutes`, counted from the first training step; the guided arms fit more steps in it). After training,
the final model answers every test problem greedily with plain sampling (`trl_guided.evaluate`, the same code as
`trl-guided eval`); the starting model is evaluated once. Each finished run leaves `<name>_runs/<arm>-seed<k>/run.json`
(settings, per-step curve, load average, eval metrics, timings) and `eval.jsonl` (one record per test problem) next
to the report; a rerun skips finished runs (a run whose settings changed is moved to `<name>_runs/stale/` and redone),
so a killed study loses at most the runs in progress. `<name>.json` and `<name>.png` are recomputed from those files.

Learning rate per arm (`--lr-grid`, at least two values): before the test runs, each arm trains a short run
(`--tune-minutes`) per grid value and tuning seed (`--tune-seeds`, distinct from the test seeds) and is scored on the
task's `validation` split: problems of neither the test split (the generated tasks' hash partition keeps them apart,
checked here) nor the training set (validation problems whose prompt is also a training prompt are left out of the
score; see `validation_plan`). The value with the best mean validation score (ties to the smaller rate) is the arm's
rate for the test runs. An arm that sets `learning_rate` in its overlay is not tuned.

Two runs at a time (`--parallel 2 --cores 0,1`): each run is pinned to its own core, and the two runs of a batch
belong to the same seed (tuning: the same tuning seed), so machine load hits the arms alike; a batch with one run left
loads the idle core with a ballast process. `--pairing-check-minutes` measures what pairing does to the per-step time
(one run alone, then two side by side, no evaluation).

Learning curve (`--eval-every-minutes`): a test run saves its weights that often (off the training clock) and each
snapshot is evaluated after training on the first `--curve-problems` test problems; the final model's point on the
curve is its full evaluation restricted to the same problems. Evaluation never counts as training time; the JSON's
`machine_time` says how the study's wall-clock splits into tuning, training and evaluation.

Evaluation backend (`--eval-backend vllm`, the regime study's): a run saves its snapshots and final model in its
folder (`models/`, `trained.json`) instead of evaluating them; once a phase's runs have trained, one child per core
(the vLLM venv's python, `--eval-python`) evaluates its share in one vLLM engine, loading each model's weights into
the running engine (`trl_guided.evaluate.kept_vllm_engine`), writes run.json and deletes the models. The starting
model is evaluated with vLLM too, so every number of the study comes from the same engine. A killed round leaves its
runs trained and waiting: the rerun evaluates them without training them again.

Statistics: an arm's gain is its after - before accuracy, averaged over seeds and problems, with a 95 % bootstrap CI
that resamples seeds and problems; a pair of arms is compared the same way on the per-problem differences, paired by
seed and problem. The training curves also give each arm's training reward at equal steps and at equal generated
tokens (the shared prefix of a guided group counted once).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
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
    "eval_max_new_tokens": 12,
    "eval_limit": 8,
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
    "eval_temperature": 0.0,
    "eval_before_after": False,
    "log_completions": False,
}
RESAMPLES = 2000
TIE = 1e-9  # validation scores closer than this are a tie (equal numbers of solved problems)


# ----------------------------------------------------------------------------------------------------- one run


def run_one(spec: dict) -> None:
    """Train one arm for one seed within the budget, evaluate the final model (and the snapshots), write run.json."""
    process_start = time.perf_counter()
    import torch
    from transformers import TrainerCallback

    from trl_guided.data import load_task
    from trl_guided.models import resolve_model_path
    from trl_guided.train import make_parser, model_init_kwargs, reward_functions, task_options
    from trl_guided.trainer import GuidedGRPOTrainer

    torch.set_num_threads(spec["threads"])
    run_dir, work_dir = Path(spec["run_dir"]), Path(spec["work_dir"])
    models = run_dir / "models" if deferred(spec) else work_dir
    load_before = os.getloadavg()
    task_args, training_args, model_args = parse(make_parser(), spec)

    class Clock(TrainerCallback):
        """Stops training once the budget is spent; saves snapshots (off the clock) for accuracy-vs-time curves."""

        def __init__(self):
            self.start, self.paused, self.curve, self.snapshots = None, 0.0, [], []

        def elapsed(self) -> float:
            return time.perf_counter() - self.start - self.paused

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            every = spec["eval_every_seconds"]
            if every and self.elapsed() >= every * (len(self.snapshots) + 1) and self.elapsed() < spec["budget"]:
                paused = time.perf_counter()
                folder = models / f"snapshot-{len(self.snapshots) + 1}"
                model.save_pretrained(folder)
                kwargs["processing_class"].save_pretrained(folder)
                self.snapshots.append({"seconds": self.elapsed(), "step": state.global_step, "folder": str(folder)})
                self.paused += time.perf_counter() - paused
            if self.elapsed() >= spec["budget"]:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs and "loss" in logs:
                self.curve.append(
                    {
                        "step": state.global_step,
                        "seconds": round(self.elapsed(), 3),
                        "reward": logs["reward"],
                        "mean_length": logs.get("completions/mean_length", 0.0),
                        "prefix_length": logs.get("guidance/prefix_length", 0.0),
                    }
                )

    clock = Clock()
    training_args.model_init_kwargs = {**model_init_kwargs(model_args), **(training_args.model_init_kwargs or {})}
    trainer = GuidedGRPOTrainer(
        model=resolve_model_path(model_args.model_name_or_path),
        reward_funcs=reward_functions(task_args),
        args=training_args,
        train_dataset=load_task(task_args.task, "train", **task_options(task_args)),
        callbacks=[clock],
    )
    setup_seconds = time.perf_counter() - process_start
    trainer.train()
    train_seconds = clock.elapsed()
    final = models / "final"
    if spec["eval"] is not None:
        trainer.save_model(str(final))
    rows_per_step = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    del trainer
    gc.collect()

    todo = planned_evaluations(spec, clock.snapshots, final, train_seconds)
    evals, eval_seconds = [], 0.0
    if not deferred(spec) or not todo:
        evals, eval_seconds = evaluate_planned(spec, todo)
    shutil.rmtree(work_dir, ignore_errors=True)

    G = training_args.num_generations
    tokens = 0.0
    for row in clock.curve:
        # Generated tokens of a step: every row's tokens after its prefix, plus each group's shared prefix once.
        prefix = row["prefix_length"]
        tokens += rows_per_step * (row["mean_length"] - prefix) + rows_per_step / G * prefix
        row["tokens"] = round(tokens)
    record = {
        "arm": spec["arm"],
        "arm_overlay": spec["arm_overlay"],
        "seed": spec["seed"],
        "phase": spec["phase"],
        "name": spec["name"],
        "identity": identity(spec),
        "overrides": spec["overrides"],
        "learning_rate": training_args.learning_rate,
        "budget_seconds": spec["budget"],
        "setup_seconds": round(setup_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "steps": clock.curve[-1]["step"] if clock.curve else 0,
        "tokens": round(tokens),
        "load_average": {"start": load_before, "end": os.getloadavg()},
        "curve": clock.curve,
        "evals": evals,
    }
    record["process_seconds"] = round(time.perf_counter() - process_start, 2)
    if deferred(spec) and todo:  # the models wait in the run folder for the study's vLLM evaluation round
        record["pending"] = todo
        (run_dir / "trained.json").write_text(json.dumps(record, indent=1) + "\n")
        return
    finish_record(record, evals)
    (run_dir / "run.json").write_text(json.dumps(record, indent=1) + "\n")  # written last: the run is complete


def deferred(spec: dict) -> bool:
    """Whether a run's evaluations wait for an evaluation round (the vLLM backend: one engine for many models)."""
    return spec.get("eval_backend", "transformers") == "vllm"


def planned_evaluations(spec: dict, snapshots: list[dict], final: Path, train_seconds: float) -> list[dict]:
    """A run's evaluations: each snapshot on the first `curve_problems` test problems, then the final model."""
    todo = [
        {
            "folder": point["folder"],
            "seconds": point["seconds"],
            "step": point["step"],
            "records": f"eval-{point['step']}.jsonl",
            "split": "test",
            "limit": spec["curve_problems"],
            "subset": True,
        }
        for point in snapshots
    ]
    if spec["eval"] is not None:
        split, limit, records = spec["eval"]["split"], spec["eval"]["limit"], spec["eval"]["records"]
        todo.append(
            {"folder": str(final), "seconds": train_seconds, "step": None, "records": records, "split": split,
             "limit": limit}
        )  # fmt: skip
    return todo


def evaluate_planned(spec: dict, todo: list[dict]) -> tuple[list[dict], float]:
    """Run a run's planned evaluations; returns their entries for run.json and the seconds they took."""
    from trl_guided.train import make_parser

    started = time.perf_counter()
    task_args, training_args, _ = parse(make_parser(), spec)
    evals = []
    for item in todo:
        # Fluency (the starting model's NLL of the answers) only for the test evaluations the table reports.
        quality = item["split"] == "test" and not item.get("subset")
        settings = study_eval_settings(task_args, training_args, spec, item["split"], item["limit"], quality)
        entry = {"seconds": item["seconds"], "step": item["step"], "records": item["records"]}
        entry.update({"subset": True} if item.get("subset") else {"split": item["split"]})
        entry.update(evaluate_into(item["folder"], settings, Path(spec["run_dir"]) / item["records"]))
        evals.append(entry)
    return evals, time.perf_counter() - started


def finish_record(record: dict, evals: list[dict]) -> None:
    record["evals"] = evals
    if evals and evals[-1]["step"] is None:
        evals[-1]["step"] = record["steps"]


def evaluate_runs(spec_paths: list[str]) -> None:
    """An evaluation round (vLLM): every listed run's pending evaluations in one engine, which loads each model's
    weights in place; then each run's run.json, and its models are deleted."""
    from trl_guided.evaluate import kept_vllm_engine

    with kept_vllm_engine():
        for spec_path in spec_paths:
            spec = json.loads(Path(spec_path).read_text())
            run_dir = Path(spec["run_dir"])
            record = json.loads((run_dir / "trained.json").read_text())
            evals, seconds = evaluate_planned(spec, record.pop("pending"))
            finish_record(record, evals)
            record["eval_seconds"] = round(seconds, 2)
            record["process_seconds"] = round(record["process_seconds"] + seconds, 2)
            (run_dir / "run.json").write_text(json.dumps(record, indent=1) + "\n")  # the run is complete
            discard_models(run_dir)
            print(f"[learning] evaluated {spec['phase']}/{spec['name']} in {seconds:.0f} s", flush=True)


def evaluate_start(spec: dict) -> None:
    """The starting model, evaluated once on the test split (the shared `before` of every arm) and, when the study
    tunes learning rates, on the validation split (one vLLM engine for both, with that backend)."""
    process_start = time.perf_counter()
    import torch

    from trl_guided.evaluate import kept_vllm_engine
    from trl_guided.train import make_parser

    torch.set_num_threads(spec["threads"])
    task_args, training_args, model_args = parse(make_parser(), spec)
    model, run_dir = model_args.model_name_or_path, Path(spec["run_dir"])
    settings = study_eval_settings(task_args, training_args, spec, "test", spec["eval"]["limit"], quality=True)
    result = {}
    with kept_vllm_engine():
        evals = [
            {"seconds": 0.0, "step": 0, "records": "eval.jsonl",
             **evaluate_into(model, settings, run_dir / "eval.jsonl", result)}
        ]  # fmt: skip
        record = {"model": result["model"], "settings": result["settings"], "versions": result["versions"]}
        record["identity"] = identity(spec)
        record["evals"] = evals
        if spec.get("validation") is not None:
            limit = spec["validation"]["limit"]
            settings = study_eval_settings(task_args, training_args, spec, "validation", limit, quality=False)
            path = run_dir / "validation.jsonl"
            record["validation"] = {"records": path.name, **evaluate_into(model, settings, path)}
    record["eval_seconds"] = record["process_seconds"] = round(time.perf_counter() - process_start, 2)
    (run_dir / "run.json").write_text(json.dumps(record, indent=1) + "\n")


def ballast() -> None:
    """Keeps one core busy (one thread of matrix products) until terminated: the load of a run for a lone run."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((256, 256)), rng.standard_normal((256, 256))
    while True:
        a = np.tanh(a @ b)


def parse(parser, spec: dict):
    return parser.parse_args_and_config(args=argv_for(spec))


def argv_for(spec: dict) -> list[str]:
    """The training command line of a run: the base recipe, then the run's overrides, seed and output folder."""
    argv = ["--config", spec["recipe"]]
    for key, value in {**spec["overrides"], "seed": spec["seed"], "output_dir": spec["work_dir"]}.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def study_eval_settings(task_args, training_args, spec: dict, split: str, limit: int | None, quality: bool):
    from trl_guided.train import eval_settings

    settings = eval_settings(task_args, training_args)
    settings.split = split
    settings.backend = spec.get("eval_backend", "transformers")
    if limit is not None:
        settings.limit = limit
    # Fluency (the starting model's NLL of the answers) only for the test evaluations the table reports.
    settings.quality_model = spec["quality_model"] if quality else None
    settings.quality_limit = spec.get("quality_problems") if settings.quality_model else None
    settings.seed = 0  # the bootstrap seed of the eval result, not the training seed: same for every run
    return settings


def evaluate_into(model: str, settings, records_path: Path, result_out: dict | None = None) -> dict:
    """Evaluate `model`, keep compact per-problem records at `records_path`, return the summary metrics."""
    from trl_guided.evaluate import evaluate, read_records, write_records

    result = evaluate(model, settings, records_path, progress=False)
    write_records([compact(r) for r in read_records(records_path)], records_path)
    if result_out is not None:
        result_out.update(result)
    return {"problems": result["settings"]["problems"], **summary(result)}


def compact(record: dict) -> dict:
    """An eval record without the prompt (the problem id names it): what the statistics need, a tenth of the size."""
    return {key: value for key, value in record.items() if key != "prompt"}


def headline(reward_funcs: list[str]) -> str:
    """The metric the study compares: `trl_guided.stats.headline_metric` (greedy: 0/1 accuracy per problem)."""
    from trl_guided.stats import headline_metric

    return headline_metric(reward_funcs)


def summary(result: dict) -> dict:
    keys = (headline(result["settings"]["reward_funcs"]), "nll_per_token", "truncated", "completion_tokens")
    keys += ("repetition",)
    return {key: result["metrics"][key]["value"] for key in keys if key in result["metrics"]}


def identity(spec: dict) -> dict:
    """What decides a run's result: a finished run whose identity differs from the planned one is redone."""
    keys = ("overrides", "seed", "budget", "eval", "validation", "eval_every_seconds", "curve_problems")
    # The recipe by its path in the repository, so that a study resumes from another checkout.
    found = {"recipe": _shown(Path(spec["recipe"])), **{key: spec.get(key) for key in keys}}
    if deferred(spec):  # studies evaluated with transformers keep the identity they were recorded with
        found["eval_backend"] = spec["eval_backend"]
    return found


# ------------------------------------------------------------------------------------------------- the study


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-seed{seed}"


def tune_name(arm: str, rate: float, seed: int) -> str:
    return f"{arm}-lr{rate:g}-seed{seed}"


def study_paths(out: Path, name: str) -> tuple[Path, Path, Path]:
    """(report JSON, plot PNG, per-run folder) of the study called `name` in `out`."""
    return out / f"{name}.json", out / f"{name}.png", out / f"{name}_runs"


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


def select_rate(scores: dict[float, float]) -> float:
    """The learning rate with the best validation score; a tie (within TIE) goes to the smaller rate."""
    best = max(scores.values())
    return min(rate for rate, score in scores.items() if score >= best - TIE)


def finished(run_dir: Path, spec: dict) -> bool | None:
    """True: done with these settings; None: not done; False: done with other settings (stale)."""
    path = run_dir / "run.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if "identity" not in record:  # a run of the first study (before identities): its overrides decide
        return (
            spec["phase"] == "before"
            and spec.get("validation") is None
            or record.get("overrides") == spec["overrides"]
        )
    return record["identity"] == identity(spec)


def waiting_for_evaluation(run_dir: Path, spec: dict) -> bool:
    """Trained with these settings and its models are there; evaluations pending (an evaluation round was not reached
    or did not finish). Without its models (another checkout: they are not committed) the run trains again."""
    path = run_dir / "trained.json"
    if not path.exists() or (run_dir / "run.json").exists():
        return False
    record = json.loads(path.read_text())
    return record["identity"] == identity(spec) and all(Path(item["folder"]).is_dir() for item in record["pending"])


def discard_models(run_dir: Path) -> None:
    """Once a run's record is complete: its saved models (~0.5 GB each) and the record of their pending evaluations."""
    (run_dir / "trained.json").unlink(missing_ok=True)
    shutil.rmtree(run_dir / "models", ignore_errors=True)


def log_tail(log: Path, lines: int = 30) -> str:
    return "".join(log.read_text(errors="replace").splitlines(keepends=True)[-lines:])


def final_score(record: dict) -> str:
    """'<metric> <value>' of a run's last evaluation (its headline reward's mean), or '' without one."""
    last = record["evals"][-1] if record.get("evals") else {}
    metric = next((key for key in last if key.endswith("/mean")), None)
    return f"{metric} {last[metric]:.3f}" if metric else ""


def move_stale(run_dir: Path, runs: Path) -> Path:
    stale = runs / "stale" / f"{run_dir.parent.name}-{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    stale.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run_dir), stale)
    return stale


class Study:
    """One invocation of the study: the plan (phases of runs) and its execution in batches of child processes."""

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
        self.started = time.perf_counter()

    # --- specs
    def overlay(self, arm: str, rate: float | None = None) -> dict:
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
        return [
            arm
            for arm in self.arms
            if "learning_rate" not in self.arms[arm] and "learning_rate" not in dict(self.args.set)
        ]

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

    # --- checks before anything runs
    def preflight(self) -> dict:
        """Every run's settings parse (one line naming the arm otherwise); returns the base run's parsed config."""
        from trl_guided.train import parse_args

        parsed = None
        for arm in self.arms:
            for rate in self.args.lr_grid if arm in self.tuned_arms() else [None]:
                spec = self.spec("check", arm, arm, 0, self.overlay(arm, rate), self.scratch)
                try:
                    task_args, training_args, model_args = parse_args(argv_for(spec))
                except SystemExit as error:
                    raise SystemExit(
                        f"[learning] arm {arm!r} (overlay {self.arms[arm]}) cannot run: {error}"
                    ) from None
                if arm == "plain" and training_args.guidance:
                    raise SystemExit(
                        "[learning] the 'plain' arm must be plain GRPO: set guidance: false in its overlay"
                    )
                parsed = parsed or (task_args, training_args, model_args)
        return {"task_args": parsed[0], "training_args": parsed[1]}

    # --- execution
    def launch(self, kind: str, spec: dict, cores: str | None) -> tuple[subprocess.Popen, Path]:
        run_dir = Path(spec["run_dir"])
        spec_path = run_dir / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=1) + "\n")
        log = self.scratch / f"{spec['phase']}-{spec['name']}.log"
        python = self.args.eval_python if kind == "evaluate-start" and deferred(spec) else sys.executable
        return self.child(python, [kind, str(spec_path)], log, cores, spec["threads"]), log

    def child(self, python: str, argv: list[str], log: Path, cores: str | None, threads: int) -> subprocess.Popen:
        """This script in a child process (`python`: this one, or the vLLM venv's), pinned to `cores`."""
        command = [python, str(Path(__file__).resolve()), *argv]
        if cores and shutil.which("taskset"):
            command = ["taskset", "-c", cores, *command]
        env = {"HF_HUB_OFFLINE": "1", **os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB per engine on CPU: a 135M model's answers fit
        with open(log, "w") as handle:
            return subprocess.Popen(command, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)

    def slot_cores(self) -> list[str | None]:
        cores = self.args.cores or ""
        if self.args.parallel == 1:
            return [cores or None]
        parts = [part for part in cores.split(",") if part]
        return parts if parts else [None] * self.args.parallel

    def execute(self, batch: list[dict], done: int, total: int, allow_ballast: bool = True) -> None:
        """Run a batch side by side (one core each), then record its wall-clock in the ledger."""
        for spec in batch:
            run_dir = Path(spec["run_dir"])
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
        cores = self.slot_cores()
        names = ", ".join(f"{s['phase']}/{s['name']}" for s in batch)
        so_far = (time.perf_counter() - self.started) / 60
        print(
            f"[learning] {done + 1}-{done + len(batch)}/{total} {names} (this call so far {so_far:.1f} min)",
            file=sys.stderr,
        )
        started = time.perf_counter()
        running = []
        for slot, spec in enumerate(batch):
            kind = "evaluate-start" if spec["phase"] == "before" else "run-one"
            running.append((spec, *self.launch(kind, spec, cores[slot % len(cores)])))
        extra = None
        free = [c for c in cores[len(batch) :] if c]
        if allow_ballast and self.args.parallel > 1 and free and batch[0]["phase"] != "before":
            command = [sys.executable, str(Path(__file__).resolve()), "ballast"]
            if shutil.which("taskset"):
                command = ["taskset", "-c", free[0], *command]
            extra = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
        failures = []
        for spec, process, log in running:
            code = process.wait()
            if code != 0:
                run = f"{spec['phase']}/{spec['name']}"
                failures.append(f"{log_tail(log)}\n[learning] {run} failed (exit {code}); its output: {log}")
        if extra is not None:
            extra.terminate()
            extra.wait()
        wall = time.perf_counter() - started
        if failures:
            raise SystemExit("\n".join(failures))
        partners = [s["name"] for s in batch]
        for spec in batch:
            run_dir = Path(spec["run_dir"])
            (run_dir / "spec.json").unlink()
            path = run_dir / ("trained.json" if (run_dir / "trained.json").exists() else "run.json")
            record = json.loads(path.read_text())
            record["wall_seconds"] = round(wall, 1)  # the batch's: loading, training, saving (and evaluation)
            record["concurrent_with"] = [n for n in partners if n != spec["name"]] + (["ballast"] if extra else [])
            path.write_text(json.dumps(record, indent=1) + "\n")
            score = final_score(record)
            print(
                f"[learning] {spec['name']}: {record.get('steps', 0)} steps{', ' + score if score else ''}",
                file=sys.stderr,
            )
        entry = {"phase": batch[0]["phase"], "runs": partners, "wall_seconds": round(wall, 1), "ballast": bool(extra)}
        self.ledger(entry)

    def ledger(self, entry: dict) -> None:
        with open(self.runs / "ledger.jsonl", "a") as handle:
            handle.write(json.dumps(entry) + "\n")

    def evaluation_round(self, specs: list[dict]) -> None:
        """The trained runs waiting for their evaluations: split over the cores, one vLLM engine per core."""
        waiting = [s for s in specs if waiting_for_evaluation(Path(s["run_dir"]), s)]
        if not waiting:
            return
        cores = self.slot_cores()[: self.args.parallel]
        groups = [group for group in (waiting[slot :: len(cores)] for slot in range(len(cores))) if group]
        phase = waiting[0]["phase"]
        print(f"[learning] evaluating {len(waiting)} {phase} runs ({len(groups)} vLLM engines)", file=sys.stderr)
        started = time.perf_counter()
        running = []
        for slot, group in enumerate(groups):
            paths = []
            for spec in group:
                paths.append(str(Path(spec["run_dir"]) / "spec.json"))
                Path(paths[-1]).write_text(json.dumps(spec, indent=1) + "\n")
            log = self.scratch / f"{phase}-evaluation-{slot}.log"
            process = self.child(
                self.args.eval_python, ["evaluate-runs", *paths], log, cores[slot], group[0]["threads"]
            )
            running.append((process, log, paths))
        failures = []
        for process, log, paths in running:
            if process.wait() != 0:
                failures.append(
                    f"{log_tail(log)}\n[learning] an evaluation round failed (exit {process.returncode}): {log}"
                )
            for path in paths:
                Path(path).unlink(missing_ok=True)
        if failures:
            raise SystemExit("\n".join(failures))
        wall = time.perf_counter() - started
        self.ledger(
            {"phase": f"{phase} evaluation", "runs": [s["name"] for s in waiting], "wall_seconds": round(wall, 1)}
        )
        for spec in waiting:
            score = final_score(json.loads((Path(spec["run_dir"]) / "run.json").read_text()))
            if score:
                print(f"[learning] {spec['name']}: {score}", file=sys.stderr)

    def run_phase(self, specs: list[dict], group=lambda spec: spec["seed"], allow_ballast: bool = True) -> None:
        pending = []
        for spec in specs:
            state = finished(Path(spec["run_dir"]), spec)
            if state and not self.args.fresh:
                print(f"[learning] {spec['phase']}/{spec['name']}: finished earlier, skipped", file=sys.stderr)
                # A round killed between writing run.json and deleting the models leaves them: ~0.5 GB per model.
                discard_models(Path(spec["run_dir"]))
                continue
            if not self.args.fresh and waiting_for_evaluation(Path(spec["run_dir"]), spec):
                print(
                    f"[learning] {spec['phase']}/{spec['name']}: trained earlier, waits for its evaluation",
                    file=sys.stderr,
                )
                continue
            if state is False and not self.args.fresh:
                moved = move_stale(Path(spec["run_dir"]), self.runs)
                print(
                    f"[learning] {spec['phase']}/{spec['name']}: settings changed, old run moved to {moved}",
                    file=sys.stderr,
                )
            pending.append(spec)
        done = 0
        for batch in batches(pending, self.args.parallel, group):
            self.execute(batch, done, len(pending), allow_ballast)
            done += len(batch)
        self.evaluation_round(specs)

    def run(self) -> None:
        parsed = self.preflight()
        self.runs.mkdir(parents=True, exist_ok=True)
        self.scratch.mkdir(parents=True, exist_ok=True)  # kept when a run fails: its log is there
        validation = None
        if self.tuned_arms():
            validation = validation_plan(parsed["task_args"], parsed["training_args"], self.args.validation_problems)
            (self.runs / "validation.json").write_text(json.dumps(validation, indent=1) + "\n")
            validation = {"limit": validation["limit"]}
        if self.args.parallel > 1 and self.args.pairing_check_minutes:
            for batch in self.pairing_specs():
                self.run_phase(batch, group=lambda spec: 0, allow_ballast=False)
        self.run_phase([self.before_spec(validation)])
        if self.args.stop_after == "before":
            return
        rates = {}
        if self.tuned_arms():
            self.run_phase(self.tune_specs(validation))
            metric = headline(parsed["task_args"].reward_funcs)
            grid = lr_grid(self.runs, metric)
            rates = {arm: grid[arm]["chosen"] for arm in self.tuned_arms()}
            print(f"[learning] tuned learning rates: {rates}", file=sys.stderr)
            if self.args.stop_after == "tune":
                return
        self.run_phase(self.final_specs(rates))
        shutil.rmtree(self.scratch, ignore_errors=True)

    def describe(self) -> str:
        """The plan: runs and batches per phase, their training minutes, and (once the starting model has been
        evaluated: its seconds per problem, and the measured start-up of finished runs) an estimate of the total."""
        tuned, parallel, args = self.tuned_arms(), self.args.parallel, self.args
        tune_runs = len(tuned) * len(args.lr_grid or []) * len(args.tune_seeds) if tuned else 0
        tune_batches = len(args.tune_seeds) * -(-len(tuned) * len(args.lr_grid or []) // parallel) if tuned else 0
        final_batches = len(args.seeds) * -(-len(self.arms) // parallel)
        pairing = 2 if parallel > 1 and args.pairing_check_minutes else 0
        lines = [
            f"arms ({len(self.arms)}): {', '.join(self.arms)}; tuned: {', '.join(tuned) or 'none'}",
            f"tuning: {tune_runs} runs in {tune_batches} batches x {args.tune_minutes} min of training",
            f"test runs: {len(self.arms) * len(args.seeds)} runs in {final_batches} batches x {args.budget_minutes} "
            "min of training",
        ]
        training = tune_batches * args.tune_minutes + final_batches * args.budget_minutes
        training += pairing * args.pairing_check_minutes
        lines.append(f"training wall-clock: {training:.0f} min")
        before = self.runs / "before" / "run.json"
        record = json.loads(before.read_text()) if before.exists() else {}
        if "eval_seconds" not in record or "problems" not in record["evals"][0]:
            lines.append("estimate of the total: after the starting model's evaluation (--stop-after before)")
            return "\n".join(lines)
        per_problem = record["eval_seconds"] / record["evals"][0]["problems"]
        records = [json.loads(p.read_text()) for p in self.runs.glob("*/**/run.json") if p.parent.name != "before"]
        setups = [r["setup_seconds"] for r in records if r.get("setup_seconds") is not None]
        setup = float(np.median(setups)) if setups else 60.0
        snapshots = int(args.budget_minutes // args.eval_every_minutes) if args.eval_every_minutes else 0
        test = args.test_problems or record["evals"][0]["problems"]
        tune_problems = args.validation_problems * 1.3
        final_problems = test + snapshots * args.curve_problems
        training = tune_batches * (args.tune_minutes * 60 + setup) + final_batches * (args.budget_minutes * 60 + setup)
        training += pairing * (args.pairing_check_minutes * 60 + setup)
        if args.eval_backend == "vllm":
            # Evaluation rounds after each phase's training, one engine per core: their rate is that of the rounds
            # so far (engine start-up included), else the starting model's (one engine for one model: pessimistic).
            evaluated = [r for r in records if r.get("eval_seconds") and r.get("evals")]
            problems = sum(e.get("problems", 0) for r in evaluated for e in r["evals"])
            rate = sum(r["eval_seconds"] for r in evaluated) / problems if problems else per_problem
            rounds = (tune_runs * tune_problems + len(self.arms) * len(args.seeds) * final_problems) * rate / parallel
            evaluation = f"evaluation rounds {rounds / 60:.0f} min at {rate:.2f} s per problem and core"
            evaluation += "" if problems else " (the starting model's rate)"
        else:
            rounds = tune_batches * tune_problems * per_problem + final_batches * final_problems * per_problem
            evaluation = f"{per_problem:.2f} s per problem, as the starting model's {record['evals'][0]['problems']}"
        lines.append(
            f"estimate: {(training + rounds) / 60:.0f} min ({evaluation}; start-up {setup:.0f} s per run"
            f"{'' if setups else ' (assumed)'}; a trained model's answers may be longer)"
        )
        spent = sum(entry["wall_seconds"] for entry in read_ledger(self.runs)) / 60
        lines.append(f"spent so far: {spent:.0f} min (ledger.jsonl)")
        return "\n".join(lines)


def validation_plan(task_args, training_args, size: int) -> dict:
    """How many validation problems to evaluate so that `size` of them are not training prompts, and which ids are
    left out of the score. A validation problem is never a test problem (checked: an overlap is an error); it may be
    drawn again in the training set of a generated task (train and validation share the non-test partition), and
    such problems are excluded, so that the rate is chosen on problems the model has not trained on, like the test."""
    from trl_guided.evaluate import load_problems
    from trl_guided.train import eval_settings

    def ids(split: str, limit: int | None) -> list[str]:
        settings = eval_settings(task_args, training_args)
        settings.split, settings.limit = split, limit
        try:
            return load_problems(settings)[1]
        except Exception as error:
            raise SystemExit(
                f"[learning] tuning the learning rate needs a validation split of task {task_args.task!r}: {error}"
            ) from None

    def prompt_hash(problem_id: str) -> str:
        return problem_id.split("-", 1)[1]

    train = {prompt_hash(i) for i in ids("train", None)}
    test = {prompt_hash(i) for i in ids("test", None)}
    limit = size
    while True:
        validation = ids("validation", limit)
        if set(map(prompt_hash, validation)) & test:
            shared = len(set(map(prompt_hash, validation)) & test)
            raise SystemExit(f"[learning] {shared} validation problems of task {task_args.task!r} are test problems")
        kept = [i for i in validation if prompt_hash(i) not in train]
        if len(kept) >= size or len(validation) < limit:
            break
        limit *= 2
    kept = kept[:size]
    if not kept:
        raise SystemExit(f"[learning] every validation problem of task {task_args.task!r} is a training prompt")
    last = validation.index(kept[-1]) + 1
    excluded = [i for i in validation[:last] if prompt_hash(i) in train]
    return {"limit": last, "problems": len(kept), "excluded_training_prompts": excluded}


# ------------------------------------------------------------------------------------------------ statistics


def per_problem(run_dir: Path, metric: str, records: str = "eval.jsonl") -> dict[str, float]:
    from trl_guided.evaluate import read_records
    from trl_guided.stats import per_problem_values

    rewards = [metric.rsplit("/", 1)[0]] if "/" in metric else []  # a reward's metric, or nll_per_token etc.
    values = per_problem_values(read_records(run_dir / records), rewards, 1)
    if rewards and metric not in values:
        raise SystemExit(f"{run_dir / records}: no {metric} in its records (was the run evaluated with that reward?)")
    return values.get(metric, {})  # fluency: absent when the quality model did not score this evaluation


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


def validation_score(run_dir: Path, metric: str, excluded: set[str]) -> float:
    """Mean validation score over the problems that are not training prompts."""
    values = per_problem(run_dir, metric, "validation.jsonl")
    kept = [value for problem, value in values.items() if problem not in excluded]
    return float(np.mean(kept))


def lr_grid(runs_dir: Path, metric: str) -> dict:
    """Per tuned arm: every grid value's validation score (mean over tuning seeds) and the chosen rate. Only rates
    whose tuning runs all finished enter the choice; `complete` says whether every rate finished for every seed."""
    validation = (
        json.loads((runs_dir / "validation.json").read_text()) if (runs_dir / "validation.json").exists() else {}
    )
    excluded = set(validation.get("excluded_training_prompts", []))
    grid = {}
    for path in sorted((runs_dir / "tune").glob("*/run.json")):
        record = json.loads(path.read_text())
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


def read_ledger(runs_dir: Path) -> list[dict]:
    """The study's batches and evaluation rounds so far, one entry each (empty before the first)."""
    path = runs_dir / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


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

    def kinds(records: list[dict]) -> dict:
        train = sum(r.get("train_seconds", 0.0) for r in records)
        evaluation = sum(r.get("eval_seconds", 0.0) for r in records)
        total = sum(r.get("process_seconds", r.get("wall_seconds", 0.0)) for r in records)
        return {
            "training": round(train / 60, 2),
            "evaluation": round(evaluation / 60, 2),
            "other": round(max(total - train - evaluation, 0.0) / 60, 2),
        }

    return {
        "wall_minutes": round(sum(by_phase.values()), 2),
        "wall_minutes_by_phase": {phase: round(minutes, 2) for phase, minutes in by_phase.items()},
        "core_minutes": {
            "before": kinds([before]),
            "tune": kinds(tune_runs),
            "final": kinds(list(runs.values())),
        },
        "note": "wall minutes come from the ledger of batches (two runs side by side count once); core minutes sum "
        "each run's own clock: training (the budget), evaluation (test, validation and snapshot evaluations), other "
        "(start-up, model loading, saving).",
    }


def nll_per_token(run_dir: Path, problems: set[str] | None = None) -> float | None:
    """A test evaluation's fluency (mean over problems of the quality model's NLL per token), on `problems` only
    when given; None without fluency scores."""
    values = per_problem(run_dir, "nll_per_token")
    kept = [value for problem, value in values.items() if problems is None or problem in problems]
    return float(np.mean(kept)) if kept else None


def completion_tokens(run_dir: Path, records: str = "eval.jsonl") -> list[int]:
    from trl_guided.evaluate import read_records

    return [r["tokens"] for r in read_records(run_dir / records)]


def analyse(out: Path, name: str = "learning", arm_order: list[str] | None = None) -> dict:
    """The report's content, from run.json and eval.jsonl files alone."""
    runs_dir = study_paths(out, name)[2]
    before_run = json.loads((runs_dir / "before" / "run.json").read_text())
    metric = headline(before_run["settings"]["reward_funcs"])
    before = per_problem(runs_dir / "before", metric)
    problems = sorted(before)
    runs = {}
    for path in sorted(runs_dir.glob("*/run.json")):
        if path.parent.name != "before":
            runs[path.parent.name] = json.loads(path.read_text())
    present = {r["arm"] for r in runs.values()}
    arms = [arm for arm in (arm_order or list(ARMS)) if arm in present] + sorted(present - set(arm_order or ARMS))
    seeds = sorted({r["seed"] for r in runs.values()})
    complete = [s for s in seeds if all(run_name(arm, s) in runs for arm in arms)]
    after = {run_name(arm, s): per_problem(runs_dir / run_name(arm, s), metric) for arm in arms for s in complete}

    def matrix(arm: str) -> np.ndarray:
        return np.array([[after[run_name(arm, s)][p] for p in problems] for s in complete])

    base = np.array([before[p] for p in problems])
    # Fluency on the problems every run's was measured on (--quality-problems), the starting model's too.
    scored = [set(per_problem(runs_dir / name, "nll_per_token")) for name in [*after, "before"]]
    fluency_problems = set.intersection(*scored) if after else None
    equal_steps = min((r["steps"] for r in runs.values()), default=0)
    equal_tokens = min((r["tokens"] for r in runs.values()), default=0)
    report_arms = {}
    for arm in arms:
        arm_runs = [runs[run_name(arm, s)] for s in complete]
        gains = matrix(arm) - base
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
            "accuracy_before": float(base.mean()),
            "accuracy_after": [float(row.mean()) for row in matrix(arm)],
            "gain": float(gains.mean()),
            "gain_ci95": hierarchical_ci(gains),
            "nll_per_token_before": nll_per_token(runs_dir / "before", fluency_problems),
            "nll_per_token_after": [nll_per_token(runs_dir / run_name(arm, s), fluency_problems) for s in complete],
            "repetition_before": before_run["evals"][0].get("repetition"),
            "repetition_after": [r["evals"][-1].get("repetition") for r in arm_runs],
            "median_completion_tokens_after": [
                float(np.median(completion_tokens(runs_dir / run_name(arm, s)))) for s in complete
            ],
            "truncated_after": [r["evals"][-1].get("truncated") for r in arm_runs],
            "train_reward_at_end": [reward_at(r["curve"], "seconds", float("inf")) for r in arm_runs],
            "train_reward_at_equal_steps": [reward_at(r["curve"], "step", equal_steps) for r in arm_runs],
            "train_reward_at_equal_tokens": [reward_at(r["curve"], "tokens", equal_tokens) for r in arm_runs],
        }
        if "plain" in arms and arm != "plain" and complete:
            difference = matrix(arm) - matrix("plain")
            entry["difference_to_plain"] = float(difference.mean())
            entry["difference_to_plain_ci95"] = hierarchical_ci(difference)
        report_arms[arm] = entry
    pairs = {}
    for i, first in enumerate(arms):
        for second in arms[i + 1 :]:
            difference = matrix(first) - matrix(second)
            pairs[f"{first} - {second}"] = {
                "difference": float(difference.mean()),
                "ci95": hierarchical_ci(difference),
            }
    tune_runs = [json.loads(p.read_text()) for p in sorted((runs_dir / "tune").glob("*/run.json"))]
    machine_time = study_machine_time(runs_dir, before_run, runs, tune_runs)
    report = {
        "study_seconds": round(machine_time["wall_minutes"] * 60, 1),  # the batches' wall-clock, summed
        "question": "Does guided GRPO reach a better model than plain GRPO for the same wall-clock?",
        "metric": f"{metric} on the test split, greedy, plain sampling",
        "problems": len(problems),
        "base_median_completion_tokens": float(np.median(completion_tokens(runs_dir / "before"))),
        "seeds_complete": complete,
        "equal_steps": equal_steps,
        "equal_tokens": equal_tokens,
        "before": before_run,
        "arms": report_arms,
        "pairs": pairs,
        "runs": {name: {k: v for k, v in run.items() if k != "curve"} for name, run in runs.items()},
        "curves": {name: run["curve"] for name, run in runs.items()},
        "learning_curves": {name: learning_curve(runs_dir / name, run, metric, before) for name, run in runs.items()},
        "machine_time": machine_time,
    }
    if tune_runs:
        validation = json.loads((runs_dir / "validation.json").read_text())
        excluded = set(validation["excluded_training_prompts"])
        report["validation"] = {
            "problems": validation["problems"],
            "evaluated": validation["limit"],
            "excluded_training_prompts": len(excluded),
            "score_before": validation_score(runs_dir / "before", metric, excluded),
        }
        report["lr_grid"] = lr_grid(runs_dir, metric)
    pairing = pairing_check(runs_dir)
    if pairing:
        report["pairing_check"] = pairing
    return report


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
    curves = {n: json.loads((folder / n / "run.json").read_text())["curve"] for n in names}
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


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(report["arms"], PALETTE * 3, strict=False))
    fig, (reward_ax, accuracy_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    subset = False
    for arm in report["arms"]:
        names = [run_name(arm, s) for s in report["arms"][arm]["seeds"]]
        if not names:
            continue
        grid = np.linspace(0, max(report["runs"][n]["train_seconds"] for n in names) / 60, 60)
        smoothed = []
        for name in names:
            curve = report["curves"][name]
            if not curve:
                continue
            minutes = np.array([row["seconds"] for row in curve]) / 60
            reward = np.convolve([row["reward"] for row in curve], np.ones(5) / 5, mode="full")[: len(curve)]
            reward /= np.minimum(np.arange(1, len(curve) + 1), 5) / 5  # the first steps average fewer values
            reward_ax.plot(minutes, reward, color=colours[arm], alpha=0.3, linewidth=0.8)
            smoothed.append(np.interp(grid, minutes, reward))
        if smoothed:
            reward_ax.plot(grid, np.mean(smoothed, axis=0), color=colours[arm], linewidth=2.5, label=arm)
        points = []
        for name in names:
            curve = report["learning_curves"][name]
            subset = subset or len(curve) > 2
            xs = [point["seconds"] / 60 for point in curve]
            ys = [point["score"] for point in curve]
            accuracy_ax.plot(xs, ys, color=colours[arm], alpha=0.3, linewidth=0.8, marker="o", markersize=3)
            points.append((xs, ys))
        if len({len(p[0]) for p in points}) == 1:  # seeds with as many snapshots: their mean
            xs = np.mean([p[0] for p in points], axis=0)
            ys = np.mean([p[1] for p in points], axis=0)
            accuracy_ax.plot(xs, ys, color=colours[arm], linewidth=2.5, marker="o", label=arm)
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


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def machine() -> dict:
    import torch
    import transformers
    import trl

    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def write_report(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    report_path, plot_path, _ = study_paths(out, args.name)
    report = analyse(out, args.name, list(args.arm_overlays))
    report = {
        "command": " ".join(["python bench/learning.py", *sys.argv[1:]]),
        "settings": {
            "name": args.name,
            "recipe": _shown(Path(args.recipe)),
            "task": args.task,
            "arms": {arm: entry["overrides"] for arm, entry in report["arms"].items()},  # every arm with runs
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
        },
        "machine": machine(),
        **report,
    }
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, plot_path)
    return report


def metric_name(report: dict) -> str:
    """The study's score, as its tables name it (e.g. constraints_followed, arithmetic_accuracy)."""
    return report["metric"].split()[0].removesuffix("/mean")


def print_table(report: dict) -> None:
    print(f"{'arm':<16}{'steps':>12}{'tokens':>16}{metric_name(report):>22}{'gain [95% CI]':>28}")
    for arm, entry in report["arms"].items():
        if not entry["seeds"]:
            continue
        after = np.mean(entry["accuracy_after"])
        low, high = entry["gain_ci95"]
        print(
            f"{arm:<16}{np.mean(entry['steps']):>12.1f}{np.mean(entry['tokens']):>16.0f}"
            f"{entry['accuracy_before']:>12.3f} -> {after:.3f}{entry['gain']:>+12.3f} [{low:+.3f}, {high:+.3f}]"
        )
    for pair, entry in report["pairs"].items():
        low, high = entry["ci95"]
        print(f"{pair}: {entry['difference']:+.3f} [{low:+.3f}, {high:+.3f}]")


def _interval(value: float, ci: list[float]) -> str:
    return f"{value:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def markdown_table(report: dict) -> str:
    """The README table: per arm, mean steps and generated tokens per run, the score before -> after, the gain and the
    difference to plain GRPO with their 95 % CIs, the quality model's NLL/token and the repetition of the test answers,
    and (when the study tuned it) the arm's learning rate; then the learning-rate grid with every validation score."""
    tuned = "lr_grid" in report
    metric = metric_name(report)
    lines = [
        f"| arm | steps | tokens | {metric} before -> after | gain [95% CI] | vs plain [95% CI] "
        "| NLL/token before -> after | repetition before -> after |" + (" learning rate |" if tuned else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if tuned else ""),
    ]
    for arm, entry in report["arms"].items():
        if not entry["seeds"]:
            continue
        versus = entry.get("difference_to_plain")
        versus = "-" if versus is None else _interval(versus, entry["difference_to_plain_ci95"])
        after = [v for v in entry["nll_per_token_after"] if v is not None]
        before = entry["nll_per_token_before"]
        nll = f"{before:.2f} -> {np.mean(after):.2f}" if before is not None and after else "-"
        repeated = [v for v in entry.get("repetition_after", []) if v is not None]
        start = entry.get("repetition_before")
        repetition = f"{start:.2f} -> {np.mean(repeated):.2f}" if start is not None and repeated else "-"
        line = (
            f"| {arm} | {np.mean(entry['steps']):.1f} | {np.mean(entry['tokens']):.0f} | "
            f"{entry['accuracy_before']:.3f} -> {np.mean(entry['accuracy_after']):.3f} | "
            f"{_interval(entry['gain'], entry['gain_ci95'])} | {versus} | {nll} | {repetition} |"
        )
        rate = entry["learning_rate"]
        lines.append(line + ((" - |" if rate is None else f" {rate:g} |") if tuned else ""))
    if tuned:
        lines += ["", lr_grid_table(report)]
    return "\n".join(lines)


def lr_grid_table(report: dict) -> str:
    """One row per tuned arm: the validation score at each grid value (mean over tuning seeds), the chosen one bold."""
    grid = report["lr_grid"]
    rates = sorted({rate for entry in grid.values() for rate in entry["rates"]})
    validation = report["validation"]
    minutes = report.get("settings", {}).get("tune_minutes", "?")
    lines = [
        f"Validation score ({validation['problems']} problems, none in the test split or the training set; the "
        f"starting model: {validation['score_before']:.3f}) after {minutes} min "
        "of training at each learning rate; bold: the rate the test runs used.",
        "",
        "| arm | " + " | ".join(f"{rate:g}" for rate in rates) + " |",
        "|---|" + "---|" * len(rates),
    ]
    order = [arm for arm in report["arms"] if arm in grid] + [arm for arm in grid if arm not in report["arms"]]
    for arm, entry in ((arm, grid[arm]) for arm in order):
        scores = dict(zip(entry["rates"], entry["scores"], strict=True))
        cells = []
        for rate in rates:
            score = scores.get(rate)
            text = "-" if score is None else f"{score:.3f}"
            cells.append(f"**{text}**" if rate == entry["chosen"] else text)
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default=None, help="A YAML file of this command's options (the command line wins).")
    parser.add_argument("--out", default=str(BENCH), help="Where <name>.json, <name>.png and <name>_runs/ go.")
    parser.add_argument("--name", default="learning", help="The study's name: <name>.json, <name>.png, <name>_runs/.")
    parser.add_argument("--recipe", default=str(RECIPE), help="The base recipe the arms overlay (bench/GPU.md).")
    parser.add_argument(
        "--task",
        default=None,
        help="Use the task's CPU recipe (recipes/smollm2-135m-instruct/<task>_cpu.yaml) as the base recipe, with the "
        "study's fixed settings (constant learning rate, one log row per step, no checkpoints) over it.",
    )
    parser.add_argument("--arms-file", default=None, help="YAML: arm name -> recipe overlay (default: ARMS).")
    parser.add_argument("--arms", nargs="+", default=None, help="Run these arms only (default: all).")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget-minutes", type=float, default=6.0, help="Training wall-clock per test run.")
    parser.add_argument("--eval-every-minutes", type=float, default=None, help="Also evaluate snapshots this often.")
    parser.add_argument("--curve-problems", type=int, default=64, help="Test problems each snapshot is scored on.")
    parser.add_argument("--test-problems", type=int, default=None, help="Test problems (default: the recipe's).")
    parser.add_argument(
        "--quality-problems",
        type=int,
        default=None,
        help="Score fluency (NLL/token) on the first N test problems of a test run (default: all); the starting "
        "model's fluency is compared on the same problems.",
    )
    parser.add_argument("--lr-grid", nargs="+", type=float, default=None, help="Learning rates to tune each arm over.")
    parser.add_argument(
        "--eval-backend",
        choices=["transformers", "vllm"],
        default="transformers",
        help="vllm: each phase's trained models are evaluated after its training, in one vLLM engine per core "
        "(--eval-python), which loads each model's weights in place: minutes of engine start-up once, then ~7x faster "
        "generation on CPU than transformers. Models wait in the run folder (~0.5 GB each for SmolLM2-135M).",
    )
    parser.add_argument(
        "--eval-python",
        default=None,
        help="The interpreter of the vLLM evaluations (default: .venv-vllm/bin/python from scripts/setup_vllm_env.sh "
        "when it exists, else this one).",
    )
    parser.add_argument("--tune-minutes", type=float, default=2.0, help="Training wall-clock per tuning run.")
    parser.add_argument("--tune-seeds", nargs="+", type=int, default=[100], help="Seeds of the tuning runs.")
    parser.add_argument("--validation-problems", type=int, default=64, help="Validation problems a tuning run scores.")
    parser.add_argument("--parallel", type=int, default=1, choices=[1, 2], help="Runs side by side (one core each).")
    parser.add_argument(
        "--pairing-check-minutes", type=float, default=0.0, help="With --parallel 2: step time alone vs paired."
    )
    parser.add_argument("--threads", type=int, default=1, help="Torch threads per run.")
    parser.add_argument(
        "--cores",
        default="0",
        help="taskset core list for the runs ('' for none); with --parallel 2 one core per run.",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        type=lambda text: tuple(yaml.safe_load(part) if i else part for i, part in enumerate(text.split("=", 1))),
        metavar="FIELD=VALUE",
        help="Override a recipe field in every arm (a diagnostic variant; give it its own --out).",
    )
    parser.add_argument("--stop-after", choices=["before", "tune"], default=None, help="Stop after this phase.")
    parser.add_argument("--fresh", action="store_true", help="Redo runs that finished earlier.")
    parser.add_argument("--report-only", action="store_true", help="Only recompute <name>.json and <name>.png.")
    parser.add_argument("--markdown", action="store_true", help="Print <name>.json as the README tables and exit.")
    parser.add_argument("--plan", action="store_true", help="Print the runs and batches the study holds and exit.")
    parser.add_argument("--tiny", action="store_true", help="A tiny local model and a few seconds per run (CI).")
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    return parser


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """The command line over the `--study` file's options over the defaults; every choice checked in one line."""
    parser = make_parser()
    first, _ = parser.parse_known_args(argv)
    if first.study:
        options = yaml.safe_load(Path(first.study).read_text()) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(options) - known)
        if unknown:
            parser.error(f"{first.study}: unknown options {unknown}; use the command's option names with _ for -")
        parser.set_defaults(**options)
    args = parser.parse_args(argv)
    if isinstance(args.set, dict):
        args.set = list(args.set.items())
    args.set = [tuple(item) for item in args.set]
    if args.task:
        recipe = ROOT / "recipes" / "smollm2-135m-instruct" / f"{args.task}_cpu.yaml"
        if not recipe.is_file():
            known = sorted(p.stem.removesuffix("_cpu") for p in recipe.parent.glob("*_cpu.yaml"))
            parser.error(f"--task {args.task}: no recipe {_shown(recipe)}; tasks with a CPU recipe: {known}")
        args.recipe = str(recipe)
    for option in ("arms_file", "recipe"):  # a study file's paths may be relative to the repository
        path = getattr(args, option)
        if path and not Path(path).exists() and (ROOT / path).exists():
            setattr(args, option, str(ROOT / path))
    args.arm_overlays = load_arms(args.arms_file)
    args.arms = args.arms or list(args.arm_overlays)
    unknown = sorted(set(args.arms) - set(args.arm_overlays))
    if unknown:
        parser.error(f"--arms {unknown}: not in the arms ({', '.join(args.arm_overlays)})")
    if args.lr_grid is not None and len(args.lr_grid) == 1:
        parser.error("--lr-grid needs at least two values to tune over (set one rate with --set learning_rate=X)")
    if args.lr_grid and set(args.tune_seeds) & set(args.seeds):
        parser.error("--tune-seeds must differ from --seeds (a tuning run would repeat the start of a test run)")
    evaluates = not (args.markdown or args.plan or args.report_only)
    if args.eval_backend == "vllm" and args.eval_python is None and evaluates:
        vllm_venv = ROOT / ".venv-vllm" / "bin" / "python"  # scripts/setup_vllm_env.sh (CPU)
        if vllm_venv.exists():
            args.eval_python = str(vllm_venv)
        elif importlib.util.find_spec("vllm") is not None:  # one venv with vLLM (a GPU machine)
            args.eval_python = sys.executable
        else:
            parser.error(
                "--eval-backend vllm needs vLLM: run bash scripts/setup_vllm_env.sh (CPU), install vllm in this venv, "
                "or give --eval-python"
            )
    if args.eval_python and not Path(args.eval_python).exists():
        parser.error(f"--eval-python {args.eval_python}: no such interpreter")
    if args.eval_python and args.eval_backend != "vllm":
        parser.error("--eval-python runs the vLLM evaluation rounds: give --eval-backend vllm too, or leave it out")
    if args.eval_python:  # the rounds start in the repository: a relative path must not change its meaning
        args.eval_python = os.path.abspath(args.eval_python)  # not resolve(): that leaves the venv for its python
    if args.quality_problems is not None and args.quality_problems < 1:
        parser.error(f"--quality-problems {args.quality_problems}: must be at least 1; leave it out to score all")
    if args.parallel > 1 and args.cores and len([c for c in args.cores.split(",") if c]) < args.parallel:
        parser.error(f"--parallel {args.parallel} pins each run to its own core: give as many, e.g. --cores 0,1")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("run-one", "evaluate-start"):
        spec = json.loads(Path(argv[1]).read_text())
        (run_one if argv[0] == "run-one" else evaluate_start)(spec)
        return
    if argv and argv[0] == "evaluate-runs":
        evaluate_runs(argv[1:])
        return
    if argv and argv[0] == "ballast":
        ballast()
        return
    args = parse_arguments(argv)
    report_path, plot_path, _ = study_paths(Path(args.out), args.name)
    if args.markdown:
        print(markdown_table(json.loads(report_path.read_text())))
        return
    if args.tiny and args.out == str(BENCH):
        sys.exit(f"--tiny writes a smoke result: give --out DIR so bench/{args.name}.json is not overwritten")
    if args.plan:
        print(Study(args).describe())
        return
    if args.tiny and args.model is None:
        sys.path.insert(0, str(ROOT))
        from trl_guided.tiny_models import build_tiny_model

        args.model = build_tiny_model(Path(args.out) / "tiny-model")
    if not args.report_only:
        Study(args).run()
    if args.stop_after:
        print(Study(args).describe())
        return
    report = write_report(args)
    print_table(report)
    print(f"wrote {report_path} and {plot_path}")


if __name__ == "__main__":
    main()
