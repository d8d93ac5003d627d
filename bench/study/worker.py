"""One run of the study, in its own process: train an arm for one seed within the wall-clock budget
(`trl_guided.train.build_trainer`, as `trl-guided train` does), then evaluate the final model and the snapshots (or
leave them for the evaluation round) and write the run's record."""

from __future__ import annotations

import gc
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from trl_guided.train import build_trainer, parse_args

from .evaluation import evaluate_planned, finish_record, planned_evaluations
from .ledger import save_json
from .plan import argv_for, deferred, identity


class Clock(TrainerCallback):
    """Stops training once the budget is spent; saves snapshots (off the clock) for accuracy-vs-time curves."""

    def __init__(self, budget: float, every: float, models: Path):
        self.budget, self.every, self.models = budget, every, models
        self.start, self.paused, self.curve, self.snapshots = None, 0.0, [], []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        due = self.every * (len(self.snapshots) + 1)
        if self.every and self.elapsed() >= due and self.elapsed() < self.budget:
            paused = time.perf_counter()
            folder = self.models / f"snapshot-{len(self.snapshots) + 1}"
            model.save_pretrained(folder)
            kwargs["processing_class"].save_pretrained(folder)
            self.snapshots.append({"seconds": self.elapsed(), "step": state.global_step, "folder": str(folder)})
            self.paused += time.perf_counter() - paused
        if self.elapsed() >= self.budget:
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


def count_tokens(curve: list[dict], rows_per_step: int, num_generations: int) -> float:
    """Generated tokens so far at each logged step (written into the curve's rows), and in all: every row's tokens
    after its prefix, plus each group's shared prefix once."""
    tokens = 0.0
    for row in curve:
        prefix = row["prefix_length"]
        tokens += rows_per_step * (row["mean_length"] - prefix) + rows_per_step / num_generations * prefix
        row["tokens"] = round(tokens)
    return tokens


def run_one(spec: dict) -> None:
    """Train one arm for one seed within the budget, evaluate the final model (and the snapshots), write run.json."""
    process_start = time.perf_counter()
    torch.set_num_threads(spec["threads"])
    run_dir, work_dir = Path(spec["run_dir"]), Path(spec["work_dir"])
    load_before = os.getloadavg()
    parsed = parse_args(argv_for(spec))
    task_args, training_args, model_args = parsed
    clock = Clock(spec["budget"], spec["eval_every_seconds"], run_dir / "models" if deferred(spec) else work_dir)
    trainer = build_trainer(task_args, training_args, model_args, callbacks=[clock])
    setup_seconds = time.perf_counter() - process_start
    trainer.train()
    train_seconds = clock.elapsed()
    final = clock.models / "final"
    if spec["eval"] is not None:
        trainer.save_model(str(final))
    del trainer
    gc.collect()

    todo = planned_evaluations(spec, clock.snapshots, final, train_seconds)
    evals, eval_seconds = [], 0.0
    if not deferred(spec) or not todo:
        evals, eval_seconds = evaluate_planned(spec, parsed, todo)
    shutil.rmtree(work_dir, ignore_errors=True)
    rows_per_step = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    tokens = count_tokens(clock.curve, rows_per_step, training_args.num_generations)
    record = {
        "arm": spec["arm"],
        "arm_overlay": spec["arm_overlay"],
        "seed": spec["seed"],
        "phase": spec["phase"],
        "name": spec["name"],
        "identity": identity(spec),
        "overrides": spec["overrides"],
        "learning_rate": training_args.learning_rate,  # as the recipe parser read it: what the run trained with
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
        save_json(run_dir / "trained.json", record)
        return
    finish_record(record, evals)
    save_json(run_dir / "run.json", record)  # written last: the run is complete
