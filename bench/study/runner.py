"""The study's execution: phase after phase, its pending runs in batches of child processes pinned to one core each
(taskset), a ballast process on a batch's idle core, the vLLM evaluation round after a phase's training, the ledger
of every batch's wall-clock; finished runs are skipped and stale ones moved aside, so a killed study resumes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from trl_guided.stats import headline_metric
from trl_guided.train import parse_args

from .estimate import describe
from .ledger import (
    append_ledger,
    discard_models,
    final_score,
    finished,
    load_json,
    log_tail,
    move_stale,
    save_json,
    waiting_for_evaluation,
)
from .plan import ENTRY, ROOT, StudyPlan, argv_for, batches, deferred
from .tuning import lr_grid, validation_plan


def say(text: str) -> None:
    print(f"[learning] {text}", file=sys.stderr)


class Study:
    """One invocation of the study: its plan, executed in batches of child processes (this script's `run-one`,
    `evaluate-start`, `evaluate-runs` and `ballast` commands)."""

    def __init__(self, plan: StudyPlan):
        self.plan, self.args, self.runs, self.scratch = plan, plan.args, plan.runs, plan.scratch
        self.started = time.perf_counter()

    def describe(self) -> str:
        return describe(self.plan)

    # --- checks before anything runs
    def preflight(self) -> dict:
        """Every run's settings parse (one line naming the arm otherwise); returns the base run's parsed config."""
        parsed = None
        for spec in self.plan.check_specs():
            arm = spec["arm"]
            try:
                task_args, training_args, model_args = parse_args(argv_for(spec))
            except SystemExit as error:
                overlay = self.plan.arms[arm]
                raise SystemExit(f"[learning] arm {arm!r} (overlay {overlay}) cannot run: {error}") from None
            if arm == "plain" and training_args.guidance:
                raise SystemExit("[learning] the 'plain' arm must be plain GRPO: set guidance: false in its overlay")
            parsed = parsed or (task_args, training_args, model_args)
        return {"task_args": parsed[0], "training_args": parsed[1]}

    # --- child processes
    def child(self, python: str, argv: list[str], log: Path, cores: str | None, threads: int) -> subprocess.Popen:
        """This script in a child process (`python`: this one, or the vLLM venv's), pinned to `cores`."""
        command = [python, str(ENTRY), *argv]
        if cores and shutil.which("taskset"):
            command = ["taskset", "-c", cores, *command]
        env = {"HF_HUB_OFFLINE": "1", **os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB per engine on CPU: a 135M model's answers fit
        with open(log, "w") as handle:
            return subprocess.Popen(command, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)

    def launch(self, spec: dict, cores: str | None) -> tuple[subprocess.Popen, Path]:
        """A run's child: its spec written to the run folder, the starting model's evaluation or one training run."""
        spec_path = Path(spec["run_dir"]) / "spec.json"
        save_json(spec_path, spec)
        log = self.scratch / f"{spec['phase']}-{spec['name']}.log"
        kind = "evaluate-start" if spec["phase"] == "before" else "run-one"
        python = self.args.eval_python if kind == "evaluate-start" and deferred(spec) else sys.executable
        return self.child(python, [kind, str(spec_path)], log, cores, spec["threads"]), log

    def ballast(self, core: str) -> subprocess.Popen:
        command = [sys.executable, str(ENTRY), "ballast"]
        if shutil.which("taskset"):
            command = ["taskset", "-c", core, *command]
        return subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)

    def slot_cores(self) -> list[str | None]:
        cores = self.args.cores or ""
        if self.args.parallel == 1:
            return [cores or None]
        parts = [part for part in cores.split(",") if part]
        return parts if parts else [None] * self.args.parallel

    # --- a batch
    def execute(self, batch: list[dict], done: int, total: int, allow_ballast: bool = True) -> None:
        """Run a batch side by side (one core each), then record its wall-clock in the ledger."""
        for spec in batch:
            run_dir = Path(spec["run_dir"])
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
        cores = self.slot_cores()
        names = ", ".join(f"{s['phase']}/{s['name']}" for s in batch)
        say(f"{done + 1}-{done + len(batch)}/{total} {names} (this call so far {self.minutes():.1f} min)")
        started = time.perf_counter()
        running = [(spec, *self.launch(spec, cores[slot % len(cores)])) for slot, spec in enumerate(batch)]
        extra = None
        free = [c for c in cores[len(batch) :] if c]
        if allow_ballast and self.args.parallel > 1 and free and batch[0]["phase"] != "before":
            extra = self.ballast(free[0])
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
        self.record_batch(batch, wall, extra is not None)

    def record_batch(self, batch: list[dict], wall: float, ballast: bool) -> None:
        """Each run's record gets the batch's wall-clock and partners; the ledger gets the batch."""
        partners = [s["name"] for s in batch]
        for spec in batch:
            run_dir = Path(spec["run_dir"])
            (run_dir / "spec.json").unlink()
            path = run_dir / ("trained.json" if (run_dir / "trained.json").exists() else "run.json")
            record = load_json(path)
            record["wall_seconds"] = round(wall, 1)  # the batch's: loading, training, saving (and evaluation)
            record["concurrent_with"] = [n for n in partners if n != spec["name"]] + (["ballast"] if ballast else [])
            save_json(path, record)
            score = final_score(record)
            say(f"{spec['name']}: {record.get('steps', 0)} steps{', ' + score if score else ''}")
        append_ledger(
            self.runs,
            {"phase": batch[0]["phase"], "runs": partners, "wall_seconds": round(wall, 1), "ballast": ballast},
        )

    def minutes(self) -> float:
        return (time.perf_counter() - self.started) / 60

    def evaluation_round(self, specs: list[dict]) -> None:
        """The trained runs waiting for their evaluations: split over the cores, one vLLM engine per core."""
        waiting = [s for s in specs if waiting_for_evaluation(Path(s["run_dir"]), s)]
        if not waiting:
            return
        cores = self.slot_cores()[: self.args.parallel]
        groups = [group for group in (waiting[slot :: len(cores)] for slot in range(len(cores))) if group]
        phase = waiting[0]["phase"]
        say(f"evaluating {len(waiting)} {phase} runs ({len(groups)} vLLM engines)")
        started = time.perf_counter()
        running = []
        for slot, group in enumerate(groups):
            paths = [Path(spec["run_dir"]) / "spec.json" for spec in group]
            for spec, path in zip(group, paths, strict=True):
                save_json(path, spec)
            log = self.scratch / f"{phase}-evaluation-{slot}.log"
            argv = ["evaluate-runs", *map(str, paths)]
            process = self.child(self.args.eval_python, argv, log, cores[slot], group[0]["threads"])
            running.append((process, log, paths))
        failures = []
        for process, log, paths in running:
            if process.wait() != 0:
                failures.append(
                    f"{log_tail(log)}\n[learning] an evaluation round failed (exit {process.returncode}): {log}"
                )
            for path in paths:
                path.unlink(missing_ok=True)
        if failures:
            raise SystemExit("\n".join(failures))
        wall = time.perf_counter() - started
        entry = {"phase": f"{phase} evaluation", "runs": [s["name"] for s in waiting], "wall_seconds": round(wall, 1)}
        append_ledger(self.runs, entry)
        for spec in waiting:
            score = final_score(load_json(Path(spec["run_dir"]) / "run.json"))
            if score:
                say(f"{spec['name']}: {score}")

    # --- phases
    def pending(self, specs: list[dict]) -> list[dict]:
        """The runs of a phase still to train: not finished with these settings, not trained and waiting for their
        evaluation; a run finished with other settings is moved to stale/ first."""
        todo = []
        for spec in specs:
            run_dir, run = Path(spec["run_dir"]), f"{spec['phase']}/{spec['name']}"
            state = finished(run_dir, spec)
            if state and not self.args.fresh:
                say(f"{run}: finished earlier, skipped")
                # A round killed between writing run.json and deleting the models leaves them: ~0.5 GB per model.
                discard_models(run_dir)
                continue
            if not self.args.fresh and waiting_for_evaluation(run_dir, spec):
                say(f"{run}: trained earlier, waits for its evaluation")
                continue
            if state is False and not self.args.fresh:
                say(f"{run}: settings changed, old run moved to {move_stale(run_dir, self.runs)}")
            todo.append(spec)
        return todo

    def run_phase(self, specs: list[dict], group=lambda spec: spec["seed"], allow_ballast: bool = True) -> None:
        pending = self.pending(specs)
        done = 0
        for batch in batches(pending, self.args.parallel, group):
            self.execute(batch, done, len(pending), allow_ballast)
            done += len(batch)
        self.evaluation_round(specs)

    def run(self) -> None:
        plan = self.plan
        parsed = self.preflight()
        self.runs.mkdir(parents=True, exist_ok=True)
        self.scratch.mkdir(parents=True, exist_ok=True)  # kept when a run fails: its log is there
        validation = None
        if plan.tuned_arms():
            validation = validation_plan(parsed["task_args"], parsed["training_args"], self.args.validation_problems)
            save_json(self.runs / "validation.json", validation)
            validation = {"limit": validation["limit"]}
        if self.args.parallel > 1 and self.args.pairing_check_minutes:
            for batch in plan.pairing_specs():
                self.run_phase(batch, group=lambda spec: 0, allow_ballast=False)
        self.run_phase([plan.before_spec(validation)])
        if self.args.stop_after == "before":
            return
        rates = {}
        if plan.tuned_arms():
            self.run_phase(plan.tune_specs(validation))
            grid = lr_grid(self.runs, headline_metric(parsed["task_args"].reward_funcs))
            rates = {arm: grid[arm]["chosen"] for arm in plan.tuned_arms()}
            say(f"tuned learning rates: {rates}")
            if self.args.stop_after == "tune":
                return
        self.run_phase(plan.final_specs(rates))
        shutil.rmtree(self.scratch, ignore_errors=True)
