"""`--plan`: the runs and batches of each phase, their training minutes and, once the starting model has been
evaluated, an estimate of the study's total from the measured evaluation rate and start-up of finished runs."""

from __future__ import annotations

import numpy as np

from .ledger import load_json, read_ledger
from .plan import StudyPlan


def _evaluation_minutes(plan: StudyPlan, record: dict, counts: dict, runs: list[dict]) -> tuple[float, str]:
    """Seconds of evaluation the study will take, and how they were estimated."""
    args, parallel = plan.args, plan.args.parallel
    per_problem = record["eval_seconds"] / record["evals"][0]["problems"]
    snapshots = int(args.budget_minutes // args.eval_every_minutes) if args.eval_every_minutes else 0
    test = args.test_problems or record["evals"][0]["problems"]
    tune_problems = args.validation_problems * 1.3
    final_problems = test + snapshots * args.curve_problems
    if args.eval_backend != "vllm":
        seconds = counts["tune_batches"] * tune_problems * per_problem
        seconds += counts["final_batches"] * final_problems * per_problem
        return seconds, f"{per_problem:.2f} s per problem, as the starting model's {record['evals'][0]['problems']}"
    # Evaluation rounds after each phase's training, one engine per core: their rate is that of the rounds so far
    # (engine start-up included), else the starting model's (one engine for one model: pessimistic).
    evaluated = [r for r in runs if r.get("eval_seconds") and r.get("evals")]
    problems = sum(e.get("problems", 0) for r in evaluated for e in r["evals"])
    rate = sum(r["eval_seconds"] for r in evaluated) / problems if problems else per_problem
    work = counts["tune_runs"] * tune_problems + len(plan.arms) * len(args.seeds) * final_problems
    seconds = work * rate / parallel
    text = f"evaluation rounds {seconds / 60:.0f} min at {rate:.2f} s per problem and core"
    return seconds, text + ("" if problems else " (the starting model's rate)")


def describe(plan: StudyPlan) -> str:
    """The plan: runs and batches per phase, their training minutes, and (once the starting model has been
    evaluated: its seconds per problem, and the measured start-up of finished runs) an estimate of the total."""
    tuned, parallel, args = plan.tuned_arms(), plan.args.parallel, plan.args
    grid = len(args.lr_grid or [])
    counts = {
        "tune_runs": len(tuned) * grid * len(args.tune_seeds) if tuned else 0,
        "tune_batches": len(args.tune_seeds) * -(-len(tuned) * grid // parallel) if tuned else 0,
        "final_batches": len(args.seeds) * -(-len(plan.arms) // parallel),
        "pairing": 2 if parallel > 1 and args.pairing_check_minutes else 0,
    }
    lines = [
        f"arms ({len(plan.arms)}): {', '.join(plan.arms)}; tuned: {', '.join(tuned) or 'none'}",
        f"tuning: {counts['tune_runs']} runs in {counts['tune_batches']} batches x {args.tune_minutes} min of "
        "training",
        f"test runs: {len(plan.arms) * len(args.seeds)} runs in {counts['final_batches']} batches x "
        f"{args.budget_minutes} min of training",
    ]
    training = counts["tune_batches"] * args.tune_minutes + counts["final_batches"] * args.budget_minutes
    training += counts["pairing"] * args.pairing_check_minutes
    lines.append(f"training wall-clock: {training:.0f} min")
    before = plan.runs / "before" / "run.json"
    record = load_json(before) if before.exists() else {}
    if "eval_seconds" not in record or "problems" not in record["evals"][0]:
        lines.append("estimate of the total: after the starting model's evaluation (--stop-after before)")
        return "\n".join(lines)
    runs = [load_json(p) for p in plan.runs.glob("*/**/run.json") if p.parent.name != "before"]
    setups = [r["setup_seconds"] for r in runs if r.get("setup_seconds") is not None]
    setup = float(np.median(setups)) if setups else 60.0
    training = counts["tune_batches"] * (args.tune_minutes * 60 + setup)
    training += counts["final_batches"] * (args.budget_minutes * 60 + setup)
    training += counts["pairing"] * (args.pairing_check_minutes * 60 + setup)
    rounds, evaluation = _evaluation_minutes(plan, record, counts, runs)
    lines.append(
        f"estimate: {(training + rounds) / 60:.0f} min ({evaluation}; start-up {setup:.0f} s per run"
        f"{'' if setups else ' (assumed)'}; a trained model's answers may be longer)"
    )
    spent = sum(entry["wall_seconds"] for entry in read_ledger(plan.runs)) / 60
    lines.append(f"spent so far: {spent:.0f} min (ledger.jsonl)")
    return "\n".join(lines)
