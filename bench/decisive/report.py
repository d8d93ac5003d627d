"""The decisive study's report: bench/learning_decisive.json and bench/learning_decisive.png, in the schema of the
other study reports (bench/learning.py), from the committed records alone.

    python bench/decisive/report.py             # bench/decisive/{phase1/start,phase2/*} -> bench/learning_decisive.*
    python bench/decisive/report.py --out DIR   # somewhere else (the tests)

Phase 2's runs (bench/decisive/phase2/run.sh) train and evaluate with `trl-guided train` and `trl-guided eval`; this
script lays their records out as a study's run folders (`<arm>-seed<k>/run.json`, `eval.jsonl`, and the starting
model's `before/`) and hands them to the study's own statistics (`study.analysis.analyse`): the gain per arm with a
95 % CI over seeds and problems, the differences paired by seed and problem, the curves. Machine time comes from the
decisive study's ledger (bench/decisive/ledger.jsonl): jobs side by side count once. For instruction following it adds
two measures the reward does not see (bench/answer_relevance.py): answers that name their topic, and the reward with
off-topic answers scored 0.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
import yaml

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [folder for folder in (str(BENCH), str(BENCH.parent)) if folder not in sys.path]

from answer_position import _test_problems  # noqa: E402
from answer_relevance import relevance_by_problem  # noqa: E402
from constraint_kinds import problem_specs, tally  # noqa: E402
from study.analysis import analyse, hierarchical_ci  # noqa: E402
from study.ledger import load_json, save_json  # noqa: E402
from study.outputs import PALETTE, machine  # noqa: E402
from study.plan import run_name, study_paths  # noqa: E402
from study.tables import markdown_table  # noqa: E402
from study.worker import count_tokens  # noqa: E402

from trl_guided.evaluate import read_records  # noqa: E402

DECISIVE = Path(__file__).resolve().parent
NAME = "learning_decisive"
ARM_ORDER = ["plain", "guided_postfix", "guided", "treerl"]
SMOOTHING = 5  # steps in the training reward's moving mean
RUN_FOLDER = re.compile(r"(?P<arm>[a-z_0-9]+)-s(?P<seed>\d+)")


def finished_runs(phase2: Path) -> list[tuple[str, int, Path]]:
    """(arm, seed, folder) of every phase-2 run with its comparison to the start (trained and evaluated)."""
    runs = []
    for folder in sorted(phase2.iterdir()):
        match = RUN_FOLDER.fullmatch(folder.name)
        if match and (folder / "comparison.json").exists():
            runs.append((match["arm"], int(match["seed"]), folder))
    return runs


def arm_rank(arm: str) -> int:
    return ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER)


def check_overlay(folder: Path, arm: str, overlay: dict) -> None:
    """The run trained what its arm's overlay says (its run_config.json), else the report would mislabel it."""
    training = load_json(folder / "run_config.json")["training"]
    wrong = {key: (training.get(key), value) for key, value in overlay.items() if training.get(key) != value}
    if wrong:
        raise SystemExit(f"{folder}: trained with {wrong} (run's value, arm {arm}'s overlay); rerun it or rename it")


def training_curve(state: dict, training: dict) -> tuple[list[dict], float]:
    """The per-step curve of a run (trainer_state.json's log), as the study's worker records it, and its tokens."""
    curve, seconds = [], 0.0
    for entry in state["log_history"]:
        if "step_time" not in entry:
            continue
        seconds += entry["step_time"]
        curve.append(
            {
                "step": entry["step"],
                "seconds": round(seconds, 3),
                "reward": entry["reward"],
                "mean_length": entry.get("completions/mean_length", 0.0),
                "prefix_length": entry.get("guidance/prefix_length", 0.0),
            }
        )
    rows_per_step = training["per_device_train_batch_size"] * training["gradient_accumulation_steps"]
    return curve, count_tokens(curve, rows_per_step, training["num_generations"])


def metric_values(result: dict) -> dict:
    """An evaluation result's metrics (`trl-guided eval --output`), each as its value."""
    return {key: metric["value"] for key, metric in result["metrics"].items()}


def run_record(arm: str, seed: int, folder: Path, overlay: dict) -> dict:
    """A phase-2 run as the study's run.json: settings, per-step curve, timings and its final evaluation."""
    training = load_json(folder / "run_config.json")["training"]
    state = load_json(folder / "trainer_state.json")
    curve, tokens = training_curve(state, training)
    result = load_json(folder / "eval_end.json")
    evaluation = metric_values(result)
    summary = next((e for e in reversed(state["log_history"]) if "train_runtime" in e), {})
    return {
        "arm": arm,
        "arm_overlay": overlay,
        "seed": seed,
        "phase": "final",
        "name": run_name(arm, seed),
        "learning_rate": training["learning_rate"],
        "train_seconds": round(summary.get("train_runtime", curve[-1]["seconds"] if curve else 0.0), 2),
        "steps": state["global_step"],
        "tokens": round(tokens),
        "curve": curve,
        "records": str(folder.relative_to(BENCH.parent)) if folder.is_relative_to(BENCH.parent) else str(folder),
        "evals": [{"seconds": curve[-1]["seconds"] if curve else 0.0, "step": state["global_step"],
                   "records": "eval.jsonl", "split": "test", **evaluation}],
    }  # fmt: skip


def start_record(start: Path) -> dict:
    """The starting model's evaluation as the study's before/run.json."""
    result = load_json(start / "eval_start.json")
    evaluation = metric_values(result)
    return {
        "model": result["model"],
        "settings": result["settings"],
        "versions": result["versions"],
        "evals": [{"seconds": 0.0, "step": 0, "records": "eval.jsonl", **evaluation}],
    }


def parse_utc(moment: str) -> datetime:
    return datetime.strptime(moment, "%Y-%m-%dT%H:%M:%SZ")


def machine_time(ledger: list[dict], sittings: list[dict]) -> dict:
    """Wall minutes the study held the machine (the union of its jobs' intervals: jobs side by side count once), per
    sitting (a job belongs to the last sitting begun at or before its start) and core-minutes (minutes x cores)."""
    starts = sorted((parse_utc(s["from_utc"]), s["sitting"]) for s in sittings)
    by_sitting: dict[int, list[tuple[datetime, datetime]]] = {}
    for job in ledger:
        start, end = parse_utc(job["start_utc"]), parse_utc(job["end_utc"])
        sitting = [number for begun, number in starts if begun <= start]
        if not sitting:
            raise SystemExit(f"a job started at {job['start_utc']}, before the first sitting: add its sitting")
        by_sitting.setdefault(sitting[-1], []).append((start, end))
    minutes = {number: union_minutes(intervals) for number, intervals in sorted(by_sitting.items())}
    cores = sum(job["wall_minutes"] * len(str(job["cores"]).split(",")) for job in ledger)
    return {
        "wall_minutes": round(sum(minutes.values()), 1),
        "sittings": {str(number): round(value, 1) for number, value in minutes.items()},
        "core_minutes": round(cores, 1),
        "jobs": len(ledger),
        "note": (
            "from bench/decisive/ledger.jsonl (phase 1's jobs included) and sittings.json: wall minutes are the union "
            "of the jobs' intervals (jobs side by side count once); core minutes: each job's minutes times its cores"
        ),
    }


def union_minutes(intervals: list[tuple[datetime, datetime]]) -> float:
    total, reached = 0.0, None
    for start, end in sorted(intervals):
        if reached is not None and start < reached:
            start = reached
        if end > start:
            total += (end - start).total_seconds() / 60
        reached = end if reached is None else max(reached, end)
    return total


def constraint_kinds(runs: list[tuple[str, int, Path]], start: Path, task: dict) -> dict:
    """Instruction following: per constraint kind, followed / given by the starting model and by each arm (its seeds
    summed), which shows the decisions training won or lost."""
    specs = problem_specs(_test_problems(task))
    kinds = {"start": tally(read_records(start / "eval_start.jsonl"), specs)["kinds"]}
    for arm, _, folder in runs:
        counts = kinds.setdefault(arm, {})
        for kind, (followed, given) in tally(read_records(folder / "eval_end.jsonl"), specs)["kinds"].items():
            total = counts.setdefault(kind, [0, 0])
            total[0], total[1] = total[0] + followed, total[1] + given
    return kinds


def answer_relevance(runs: list[tuple[str, int, Path]], start: Path, seeds: list[int]) -> dict:
    """Instruction following, two measures the reward does not see (bench/answer_relevance.py): the share of answers
    that name their request's topic, and the headline reward with off-topic answers scored 0. Per arm over the seeds
    every arm finished: the value per seed, the change from the start and the difference to plain GRPO, with 95 % CIs
    over seeds and problems. A fall in the first is the constraint checker being gamed."""
    metric = load_json(start / "eval_start.json")["settings"]["reward_funcs"][0]  # the study's headline reward
    before = relevance_by_problem(read_records(start / "eval_start.jsonl"), metric)
    problems = sorted(before)
    after = {
        (arm, seed): relevance_by_problem(read_records(folder / "eval_end.jsonl"), metric)
        for arm, seed, folder in runs
        if seed in seeds
    }
    arms = list(dict.fromkeys(arm for arm, _ in after))
    measures = {}
    for name in ("on_topic", "followed_on_topic"):
        base = np.array([before[p][name] for p in problems])
        matrices = {arm: np.array([[after[arm, s][p][name] for p in problems] for s in seeds]) for arm in arms}
        entries = {}
        for arm, matrix in matrices.items():
            entry = {
                "after": [float(row.mean()) for row in matrix],
                "change": float((matrix - base).mean()),
                "change_ci95": hierarchical_ci(matrix - base),
            }
            if arm != "plain" and "plain" in matrices:
                entry["difference_to_plain"] = float((matrix - matrices["plain"]).mean())
                entry["difference_to_plain_ci95"] = hierarchical_ci(matrix - matrices["plain"])
            entries[arm] = entry
        measures[name] = {"before": float(base.mean()), "arms": entries}
    return {
        "note": (
            "added after reading the answers (not in the study's design): on_topic = the answer names its request's "
            f"topic; followed_on_topic = {metric} with off-topic answers scored 0"
        ),
        "seeds": seeds,
        **measures,
    }


def lay_out(runs_dir: Path, start: Path, runs: list[tuple[str, int, Path]], overlays: dict) -> None:
    """The records as a study's run folders, for `study.analysis.analyse`."""
    (runs_dir / "before").mkdir(parents=True)
    save_json(runs_dir / "before" / "run.json", start_record(start))
    shutil.copy(start / "eval_start.jsonl", runs_dir / "before" / "eval.jsonl")
    for arm, seed, folder in runs:
        check_overlay(folder, arm, overlays[arm])
        target = runs_dir / run_name(arm, seed)
        target.mkdir()
        save_json(target / "run.json", run_record(arm, seed, folder, overlays[arm]))
        shutil.copy(folder / "eval_end.jsonl", target / "eval.jsonl")


def build_report(decisive: Path, arms_file: Path) -> dict:
    overlays = yaml.safe_load(arms_file.read_text())
    runs = sorted(finished_runs(decisive / "phase2"), key=lambda run: (arm_rank(run[0]), run[1]))
    if not runs:
        raise SystemExit(f"{decisive / 'phase2'}: no finished run (a folder <arm>-s<seed> with comparison.json) yet")
    unknown = sorted({arm for arm, _, _ in runs} - set(overlays))
    if unknown:
        raise SystemExit(f"{decisive / 'phase2'}: runs of arms {unknown}, which {arms_file} does not define")
    seeds = {arm: {seed for run_arm, seed, _ in runs if run_arm == arm} for arm, _, _ in runs}
    if not set.intersection(*seeds.values()):
        finished = ", ".join(f"{arm} {sorted(arm_seeds)}" for arm, arm_seeds in seeds.items())
        raise SystemExit(f"no seed that every arm finished yet (finished: {finished}); the report pairs by seed")
    with tempfile.TemporaryDirectory() as scratch:
        lay_out(study_paths(Path(scratch), NAME)[2], decisive / "phase1" / "start", runs, overlays)
        report = analyse(Path(scratch), NAME, ARM_ORDER)
    task = load_json(runs[0][2] / "run_config.json").get("task", {})
    report["constraint_kinds"] = report["answer_relevance"] = None  # both exist for instruction following only
    if task.get("task") == "instructions":
        start = decisive / "phase1" / "start"
        report["constraint_kinds"] = constraint_kinds(runs, start, task)
        report["answer_relevance"] = answer_relevance(runs, start, report["seeds_complete"])
    ledger = read_records(decisive / "ledger.jsonl")
    sittings = load_json(decisive / "sittings.json")["sittings"]
    report["machine_time"] = machine_time(ledger, sittings)
    report["study_seconds"] = round(report["machine_time"]["wall_minutes"] * 60, 1)
    report["question"] = "Does guided GRPO reach a better model than plain GRPO in the same optimizer steps?"
    runs_commands = {run_name(arm, seed): (folder / "train_command.sh").read_text() for arm, seed, folder in runs}
    return {
        "command": "python bench/decisive/report.py",
        "settings": {
            "name": NAME,
            "design": (
                "equal optimizer steps (each arm's step time measured apart: bench/decisive/phase1.md); every run on "
                "one core with one thread, two runs side by side"
            ),
            "arms": {arm: overlays[arm] for arm in report["arms"]},
            "train_commands": runs_commands,
        },
        "machine": machine(),
        **report,
    }


def draw_intervals(ax, entries: dict[str, dict], key: str, colours: dict, per_seed: dict | None = None) -> None:
    """One point with its 95 % CI per arm (`entries[arm][key]`, `[key + "_ci95"]`), and small dots per seed."""
    for i, (arm, entry) in enumerate(entries.items()):
        low, high = entry[f"{key}_ci95"]
        ax.errorbar(i, entry[key], yerr=[[entry[key] - low], [high - entry[key]]], fmt="o", capsize=6,
                    color=colours[arm], markersize=8)  # fmt: skip
        if per_seed:
            ax.scatter(np.full(len(per_seed[arm]), i + 0.15), per_seed[arm], color=colours[arm], alpha=0.5, s=14)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(entries)), list(entries))


def plot_report(report: dict, path: Path) -> None:
    """Training reward over optimizer steps per arm; each arm's held-out gain, its difference to plain GRPO, and
    (instruction following) the change in answers that name their topic."""
    import matplotlib  # heavy, and only the report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend

    arms = list(report["arms"])
    colours = dict(zip(arms, PALETTE, strict=False))
    fig, ((reward_ax, gain_ax), (difference_ax, topic_ax)) = plt.subplots(2, 2, figsize=(14, 9))
    for arm in arms:
        rewards = []
        for seed in report["arms"][arm]["seeds"]:
            curve = report["curves"][run_name(arm, seed)]
            window = min(SMOOTHING, len(curve))
            if window == 0:
                continue
            reward = np.convolve([row["reward"] for row in curve], np.ones(window) / window, mode="valid")
            steps = np.arange(window, len(curve) + 1)
            reward_ax.plot(steps, reward, color=colours[arm], alpha=0.3, linewidth=0.8)
            rewards.append((steps, reward))
        if rewards:
            length = min(len(r) for _, r in rewards)
            mean = np.mean([r[:length] for _, r in rewards], axis=0)
            reward_ax.plot(rewards[0][0][:length], mean, color=colours[arm], linewidth=2.5, label=arm)
    reward_ax.set(
        title=f"Training reward (moving mean of {SMOOTHING} steps)", xlabel="optimizer step", ylabel="reward"
    )
    metric = report["metric"].split()[0]
    per_seed = {arm: np.array(e["accuracy_after"]) - e["accuracy_before"] for arm, e in report["arms"].items()}
    draw_intervals(gain_ax, report["arms"], "gain", colours, per_seed)
    gain_ax.set(title=f"Held-out gain vs start ({report['problems']} test problems, greedy)", ylabel=metric)
    guided = {arm: entry for arm, entry in report["arms"].items() if "difference_to_plain" in entry}
    draw_intervals(difference_ax, guided, "difference_to_plain", colours)
    difference_ax.set(title="Difference to plain GRPO (paired by seed and problem)", ylabel=metric)
    difference_ax.axhspan(-0.04, 0.04, color="grey", alpha=0.15, label="within +-0.04")
    low, high = difference_ax.get_ylim()
    difference_ax.set_ylim(min(low, -0.06), max(high, 0.06))
    difference_ax.legend(loc="best", fontsize=9)
    relevance = (report.get("answer_relevance") or {}).get("on_topic")
    if relevance:
        before = relevance["before"]
        per_seed = {arm: np.array(e["after"]) - before for arm, e in relevance["arms"].items()}
        draw_intervals(topic_ax, relevance["arms"], "change", colours, per_seed)
        topic_ax.set(
            title=f"Answers that name their topic: change vs start ({before:.2f}; not rewarded)", ylabel="share"
        )
    else:
        topic_ax.axis("off")
    for ax in (reward_ax, gain_ax, difference_ax, topic_ax):
        ax.grid(alpha=0.3)
    reward_ax.legend(loc="best", fontsize=9)
    fig.suptitle("Thin / small: one seed; thick / large: mean over seeds with its 95 % CI")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def interval(entry: dict, key: str) -> str:
    """An entry's value and its 95 % CI, e.g. "+0.111 [+0.071, +0.149]"."""
    low, high = entry[f"{key}_ci95"]
    return f"{entry[key]:+.3f} [{low:+.3f}, {high:+.3f}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decisive", default=str(DECISIVE), help="the study's records (phase1/, phase2/, ledger)")
    parser.add_argument("--arms", default=str(BENCH / "learning_regime_arms.yaml"), help="arm name -> overlay")
    parser.add_argument("--out", default=str(BENCH), help=f"where {NAME}.json and {NAME}.png go")
    parser.add_argument("--markdown", action="store_true", help="also print the README's table")
    args = parser.parse_args(argv)
    report = build_report(Path(args.decisive), Path(args.arms))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    json_path, png_path, _ = study_paths(Path(args.out), NAME)
    save_json(json_path, report)
    plot_report(report, png_path)
    for arm, entry in report["arms"].items():
        line = f"{arm:16s} seeds {entry['seeds']}  gain {interval(entry, 'gain')}"
        if "difference_to_plain" in entry:
            line += f"  vs plain {interval(entry, 'difference_to_plain')}"
        print(line)
    kinds = report["constraint_kinds"] or {}
    for kind in sorted(kinds.get("start", {})):
        print(
            f"{kind:16s}", "  ".join(f"{column} {kinds[column][kind][0]}/{kinds[column][kind][1]}" for column in kinds)
        )
    relevance = report["answer_relevance"] or {}
    for name in ("on_topic", "followed_on_topic"):
        if name in relevance:
            print(f"{name} (not rewarded, not in the design): start {relevance[name]['before']:.3f}")
            for arm, entry in relevance[name]["arms"].items():
                line = f"{arm:16s} change {interval(entry, 'change')}"
                if "difference_to_plain" in entry:
                    line += f"  vs plain {interval(entry, 'difference_to_plain')}"
                print(line)
    print(f"wrote {json_path} and {png_path}")
    if args.markdown:
        print(markdown_table(report))


if __name__ == "__main__":
    main()
