"""Does guidance help? Guided vs plain GRPO at equal wall-clock, evaluated on held-out problems.

    python bench/learning.py                        # the full study -> bench/learning.json, bench/learning.png
    python bench/learning.py --tiny --out DIR       # a tiny local model, seconds: checks the pipeline, not the result
    python bench/learning.py --fresh                # redo the runs that already finished
    python bench/learning.py --report-only          # statistics and plot again from the per-run records

Every arm (ARMS: a recipe overlay on bench/learning.yaml) trains once per seed for the same wall-clock budget
(`--budget-minutes`, counted from the first training step; the guided arms fit more steps in it). Runs go seed-major
(seed 0 of every arm, then seed 1, ...) so machine load hits the arms alike; each is a child process pinned to the
same cores. After training, the final model answers every test problem greedily with plain sampling
(`trl_guided.evaluate`, the same code as `trl-guided eval`); the starting model is evaluated once. Each finished run
leaves `learning_runs/<arm>-seed<k>/run.json` (settings, per-step curve, load average, eval metrics) and `eval.jsonl`
(one record per test problem) next to the report; a rerun skips finished runs, so a killed study loses at most the
run in progress. `learning.json` and `learning.png` are recomputed from those files alone.

Statistics: an arm's gain is its after - before accuracy, averaged over seeds and problems, with a 95 % bootstrap CI
that resamples seeds and problems; a pair of arms is compared the same way on the per-problem differences, paired by
seed and problem. The training curves also give each arm's training reward at equal steps and at equal generated
tokens (the shared prefix of a guided group counted once).
"""

from __future__ import annotations

import argparse
import gc
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
RESAMPLES = 2000


# ----------------------------------------------------------------------------------------------------- one run


def run_one(spec: dict) -> None:
    """Train one arm for one seed within the budget, evaluate the final model, write run.json and eval.jsonl."""
    import torch
    from transformers import TrainerCallback

    from trl_guided.data import load_task
    from trl_guided.evaluate import evaluate, read_records, write_records
    from trl_guided.models import resolve_model_path
    from trl_guided.train import eval_settings, make_parser, model_init_kwargs, reward_functions, task_options
    from trl_guided.trainer import GuidedGRPOTrainer

    torch.set_num_threads(spec["threads"])
    run_dir, work_dir = Path(spec["run_dir"]), Path(spec["work_dir"])
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
                folder = work_dir / f"snapshot-{len(self.snapshots) + 1}"
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
    trainer.train()
    train_seconds = clock.elapsed()
    final = work_dir / "final"
    trainer.save_model(str(final))
    rows_per_step = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    del trainer
    gc.collect()

    settings = study_eval_settings(eval_settings(task_args, training_args), spec)
    evals = []
    for point in [*clock.snapshots, {"seconds": train_seconds, "step": None, "folder": str(final)}]:
        records_path = run_dir / ("eval.jsonl" if point["folder"] == str(final) else f"eval-{point['step']}.jsonl")
        result = evaluate(point["folder"], settings, records_path, progress=False)
        write_records([compact(r) for r in read_records(records_path)], records_path)
        point = {"seconds": point["seconds"], "step": point["step"], "records": records_path.name}
        evals.append({**point, **summary(result)})
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
        "seed": spec["seed"],
        "overrides": spec["overrides"],
        "budget_seconds": spec["budget"],
        "train_seconds": round(train_seconds, 2),
        "steps": clock.curve[-1]["step"] if clock.curve else 0,
        "tokens": round(tokens),
        "load_average": {"start": load_before, "end": os.getloadavg()},
        "curve": clock.curve,
        "evals": evals,
    }
    evals[-1]["step"] = record["steps"]
    (run_dir / "run.json").write_text(json.dumps(record, indent=1) + "\n")  # written last: the run is complete


def evaluate_start(spec: dict) -> None:
    """The starting model, evaluated once: the shared `before` of every arm."""
    import torch

    from trl_guided.evaluate import evaluate, read_records, write_records
    from trl_guided.train import eval_settings, make_parser

    torch.set_num_threads(spec["threads"])
    task_args, training_args, model_args = parse(make_parser(), spec)
    run_dir = Path(spec["run_dir"])
    records_path = run_dir / "eval.jsonl"
    settings = study_eval_settings(eval_settings(task_args, training_args), spec)
    result = evaluate(model_args.model_name_or_path, settings, records_path, progress=False)
    write_records([compact(r) for r in read_records(records_path)], records_path)
    record = {"model": result["model"], "settings": result["settings"], "versions": result["versions"]}
    record["evals"] = [{"seconds": 0.0, "step": 0, "records": records_path.name, **summary(result)}]
    (run_dir / "run.json").write_text(json.dumps(record, indent=1) + "\n")


def parse(parser, spec: dict):
    argv = ["--config", spec["recipe"]]
    for key, value in {**spec["overrides"], "seed": spec["seed"], "output_dir": spec["work_dir"]}.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return parser.parse_args_and_config(args=argv)


def study_eval_settings(settings, spec: dict):
    settings.quality_model = spec["quality_model"]
    settings.seed = 0  # the bootstrap seed of the eval result, not the training seed: same for every run
    return settings


def compact(record: dict) -> dict:
    """An eval record without the prompt (the problem id names it): what the statistics need, a tenth of the size."""
    return {key: value for key, value in record.items() if key != "prompt"}


def headline(reward_funcs: list[str]) -> str:
    """The metric the study compares: the mean of the recipe's first reward (greedy: 0/1 accuracy per problem)."""
    return f"{reward_funcs[0]}/mean"


def summary(result: dict) -> dict:
    keys = (headline(result["settings"]["reward_funcs"]), "nll_per_token", "truncated", "completion_tokens")
    keys += ("repetition",)
    return {key: result["metrics"][key]["value"] for key in keys if key in result["metrics"]}


# ------------------------------------------------------------------------------------------------- the study


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-seed{seed}"


def launch(kind: str, spec: dict, cores: str | None, log: Path) -> None:
    """One run in a child process (fresh memory and threads), pinned to `cores` when given; its output goes to
    `log`, whose end is shown if the run fails."""
    spec_path = Path(spec["run_dir"]) / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1) + "\n")
    command = [sys.executable, str(Path(__file__).resolve()), kind, str(spec_path)]
    if cores and shutil.which("taskset"):
        command = ["taskset", "-c", cores, *command]
    env = {"HF_HUB_OFFLINE": "1", **os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "WANDB_MODE": "disabled"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with open(log, "w") as handle:
        code = subprocess.run(command, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise SystemExit(f"{tail}\n[learning] the run failed (exit {code}); its whole output: {log}")


def run_study(args: argparse.Namespace) -> None:
    runs = Path(args.out) / "learning_runs"
    scratch = Path(tempfile.mkdtemp(prefix="learning-"))
    overrides = {"disable_tqdm": True, **(dict(TINY, model_name_or_path=args.model) if args.tiny else {})}
    base = {
        "recipe": str(Path(args.recipe).resolve()),
        "threads": args.threads,
        "quality_model": args.model if args.tiny else "embedded:smollm2-135m-instruct",
        "budget": args.budget_minutes * 60,
        "eval_every_seconds": (args.eval_every_minutes or 0) * 60,
    }
    metric = headline(yaml.safe_load(Path(args.recipe).read_text())["reward_funcs"])
    plan = [("before", None, None)] + [(arm, seed, ARMS[arm]) for seed in args.seeds for arm in args.arms]
    started = time.perf_counter()
    for index, (arm, seed, overlay) in enumerate(plan, 1):
        name = "before" if arm == "before" else run_name(arm, seed)
        run_dir = runs / name
        if (run_dir / "run.json").exists() and not args.fresh:
            print(f"[learning] {index}/{len(plan)} {name}: finished earlier, skipped", file=sys.stderr)
            continue
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        spec = {
            **base,
            "arm": arm,
            "seed": seed or 0,
            "overrides": {**overrides, **(overlay or {}), **(dict(args.set) if overlay else {})},
            "run_dir": str(run_dir),
            "work_dir": str(scratch / name),
        }
        so_far = (time.perf_counter() - started) / 60
        print(f"[learning] {index}/{len(plan)} {name} (study time so far {so_far:.1f} min)", file=sys.stderr)
        run_started = time.perf_counter()
        launch("evaluate-start" if arm == "before" else "run-one", spec, args.cores, scratch / f"{name}.log")
        (run_dir / "spec.json").unlink()
        record = json.loads((run_dir / "run.json").read_text())
        record["wall_seconds"] = round(time.perf_counter() - run_started, 1)  # training, saving, evaluation, loading
        (run_dir / "run.json").write_text(json.dumps(record, indent=1) + "\n")
        last = record["evals"][-1]
        print(
            f"[learning] {name}: {record.get('steps', 0)} steps, {metric} {last[metric]:.3f}, "
            f"{record['wall_seconds'] / 60:.1f} min",
            file=sys.stderr,
        )
    shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ statistics


def per_problem(run_dir: Path, metric: str, records: str = "eval.jsonl") -> dict[str, float]:
    from trl_guided.evaluate import per_problem_values, read_records

    reward = metric.rsplit("/", 1)[0]
    return per_problem_values(read_records(run_dir / records), [reward], 1)[metric]


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


def analyse(out: Path) -> dict:
    """learning.json's content, from run.json and eval.jsonl files alone."""
    runs_dir = out / "learning_runs"
    before_run = json.loads((runs_dir / "before" / "run.json").read_text())
    metric = headline(before_run["settings"]["reward_funcs"])
    before = per_problem(runs_dir / "before", metric)
    problems = sorted(before)
    runs = {}
    for path in sorted(runs_dir.glob("*/run.json")):
        if path.parent.name != "before":
            runs[path.parent.name] = json.loads(path.read_text())
    arms = [arm for arm in ARMS if any(r["arm"] == arm for r in runs.values())]
    seeds = sorted({r["seed"] for r in runs.values()})
    complete = [s for s in seeds if all(run_name(arm, s) in runs for arm in arms)]
    after = {run_name(arm, s): per_problem(runs_dir / run_name(arm, s), metric) for arm in arms for s in complete}

    def matrix(arm: str) -> np.ndarray:
        return np.array([[after[run_name(arm, s)][p] for p in problems] for s in complete])

    base = np.array([before[p] for p in problems])
    equal_steps = min((r["steps"] for r in runs.values()), default=0)
    equal_tokens = min((r["tokens"] for r in runs.values()), default=0)
    report_arms = {}
    for arm in arms:
        arm_runs = [runs[run_name(arm, s)] for s in complete]
        gains = matrix(arm) - base
        report_arms[arm] = {
            "overrides": ARMS[arm],
            "seeds": complete,
            "steps": [r["steps"] for r in arm_runs],
            "tokens": [r["tokens"] for r in arm_runs],
            "train_seconds": [r["train_seconds"] for r in arm_runs],
            "accuracy_before": float(base.mean()),
            "accuracy_after": [float(row.mean()) for row in matrix(arm)],
            "gain": float(gains.mean()),
            "gain_ci95": hierarchical_ci(gains),
            "nll_per_token_before": before_run["evals"][0].get("nll_per_token"),
            "nll_per_token_after": [r["evals"][-1].get("nll_per_token") for r in arm_runs],
            "truncated_after": [r["evals"][-1].get("truncated") for r in arm_runs],
            "train_reward_at_end": [reward_at(r["curve"], "seconds", float("inf")) for r in arm_runs],
            "train_reward_at_equal_steps": [reward_at(r["curve"], "step", equal_steps) for r in arm_runs],
            "train_reward_at_equal_tokens": [reward_at(r["curve"], "tokens", equal_tokens) for r in arm_runs],
        }
    pairs = {}
    for i, first in enumerate(arms):
        for second in arms[i + 1 :]:
            difference = matrix(first) - matrix(second)
            pairs[f"{first} - {second}"] = {
                "difference": float(difference.mean()),
                "ci95": hierarchical_ci(difference),
            }
    return {
        # Summed over the runs (each child process from start to exit), so a resumed study still adds up.
        "study_seconds": round(sum(r.get("wall_seconds", 0.0) for r in [before_run, *runs.values()]), 1),
        "question": "Does guided GRPO reach a better model than plain GRPO for the same wall-clock?",
        "metric": f"{metric} on the test split, greedy, plain sampling",
        "problems": len(problems),
        "seeds_complete": complete,
        "equal_steps": equal_steps,
        "equal_tokens": equal_tokens,
        "before": before_run,
        "arms": report_arms,
        "pairs": pairs,
        "runs": {name: {k: v for k, v in run.items() if k != "curve"} for name, run in runs.items()},
        "curves": {name: run["curve"] for name, run in runs.items()},
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(ARMS, ("#444444", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"), strict=False))
    fig, (reward_ax, accuracy_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    before = report["arms"][next(iter(report["arms"]))]["accuracy_before"] if report["arms"] else None
    for arm in report["arms"]:
        names = [run_name(arm, s) for s in report["arms"][arm]["seeds"]]
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
            evals = report["runs"][name]["evals"]
            xs = [0.0] + [e["seconds"] / 60 for e in evals]
            ys = [before] + [e[report["metric"].split()[0]] for e in evals]
            accuracy_ax.plot(xs, ys, color=colours[arm], alpha=0.3, linewidth=0.8, marker="o", markersize=3)
            points.append((xs, ys))
        xs = np.mean([p[0] for p in points], axis=0)
        ys = np.mean([p[1] for p in points], axis=0)
        accuracy_ax.plot(xs, ys, color=colours[arm], linewidth=2.5, marker="o", label=arm)
    reward_ax.set(title="Training reward (moving mean of 5 steps)", xlabel="training wall-clock (min)")
    reward_ax.set(ylabel="reward")
    accuracy_ax.set(
        title=f"Held-out accuracy ({report['problems']} test problems, greedy)",
        xlabel="training wall-clock (min)",
        ylabel="accuracy",
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
    report = analyse(out)
    report = {
        "command": " ".join(["python bench/learning.py", *sys.argv[1:]]),
        "settings": {
            "recipe": _shown(Path(args.recipe)),
            "arms": {arm: ARMS[arm] for arm in report["arms"]},  # every arm with finished runs, not only this call's
            "seeds": args.seeds,
            "budget_minutes": args.budget_minutes,
            "eval_every_minutes": args.eval_every_minutes,
            "threads": args.threads,
            "cores": args.cores,
            "tiny": args.tiny,
            "set": dict(args.set),
        },
        "machine": machine(),
        **report,
    }
    (out / "learning.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out / "learning.png")
    return report


def print_table(report: dict) -> None:
    print(f"{'arm':<16}{'steps':>12}{'tokens':>16}{'accuracy':>22}{'gain [95% CI]':>28}")
    for arm, entry in report["arms"].items():
        after = np.mean(entry["accuracy_after"])
        low, high = entry["gain_ci95"]
        print(
            f"{arm:<16}{np.mean(entry['steps']):>12.1f}{np.mean(entry['tokens']):>16.0f}"
            f"{entry['accuracy_before']:>12.3f} -> {after:.3f}{entry['gain']:>+12.3f} [{low:+.3f}, {high:+.3f}]"
        )
    for pair, entry in report["pairs"].items():
        low, high = entry["ci95"]
        print(f"{pair}: {entry['difference']:+.3f} [{low:+.3f}, {high:+.3f}]")


def markdown_table(report: dict) -> str:
    """The README table: per arm, mean steps and generated tokens per run, accuracy before -> after, the gain and the
    difference to plain GRPO with their 95 % CIs, and the base model's NLL/token of the arm's test answers."""
    lines = [
        "| arm | steps | tokens | accuracy before -> after | gain [95% CI] | vs plain [95% CI] "
        "| NLL/token before -> after |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, entry in report["arms"].items():
        low, high = entry["gain_ci95"]
        pair = report["pairs"].get(f"plain - {arm}")
        versus = (
            "" if pair is None else f"{-pair['difference']:+.3f} [{-pair['ci95'][1]:+.3f}, {-pair['ci95'][0]:+.3f}]"
        )
        after = [v for v in entry["nll_per_token_after"] if v is not None]
        before = entry["nll_per_token_before"]
        nll = f"{before:.2f} -> {np.mean(after):.2f}" if before is not None and after else "-"
        lines.append(
            f"| {arm} | {np.mean(entry['steps']):.1f} | {np.mean(entry['tokens']):.0f} | "
            f"{entry['accuracy_before']:.3f} -> {np.mean(entry['accuracy_after']):.3f} | "
            f"{entry['gain']:+.3f} [{low:+.3f}, {high:+.3f}] | {versus or '-'} | "
            f"{nll} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("run-one", "evaluate-start"):
        spec = json.loads(Path(argv[1]).read_text())
        (run_one if argv[0] == "run-one" else evaluate_start)(spec)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(BENCH), help="Where learning.json, learning.png, learning_runs/ go.")
    parser.add_argument("--recipe", default=str(RECIPE), help="The base recipe the arms overlay (bench/GPU.md).")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget-minutes", type=float, default=6.0, help="Training wall-clock per run.")
    parser.add_argument("--eval-every-minutes", type=float, default=None, help="Also evaluate snapshots this often.")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads per run.")
    parser.add_argument("--cores", default="0", help="taskset core list for the runs ('' for none).")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        type=lambda text: tuple(yaml.safe_load(part) if i else part for i, part in enumerate(text.split("=", 1))),
        metavar="FIELD=VALUE",
        help="Override a recipe field in every arm (a diagnostic variant; give it its own --out).",
    )
    parser.add_argument("--fresh", action="store_true", help="Redo runs that finished earlier.")
    parser.add_argument("--report-only", action="store_true", help="Only recompute learning.json and learning.png.")
    parser.add_argument("--markdown", action="store_true", help="Print learning.json as the README table and exit.")
    parser.add_argument("--tiny", action="store_true", help="A tiny local model and a few seconds per run (CI).")
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table(json.loads((Path(args.out) / "learning.json").read_text())))
        return
    if args.tiny and args.out == str(BENCH):
        parser.error("--tiny writes a smoke result: give --out DIR so bench/learning.json is not overwritten")
    if args.tiny and args.model is None:
        sys.path.insert(0, str(ROOT))
        from trl_guided.tiny_models import build_tiny_model

        args.model = build_tiny_model(Path(args.out) / "tiny-model")
    if not args.report_only:
        run_study(args)
    report = write_report(args)
    print_table(report)
    print(f"wrote {Path(args.out) / 'learning.json'} and {Path(args.out) / 'learning.png'}")


if __name__ == "__main__":
    main()
