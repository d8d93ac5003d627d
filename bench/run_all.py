"""The one entry point of the guided-vs-vanilla benchmarks: runs them and writes one JSON report.

    python bench/run_all.py                          # everything, full sizes -> bench/results.json (about an hour)
    python bench/run_all.py --tiny                   # tiny model, few tokens, 1 repeat: a smoke run, JSON on stdout
    python bench/run_all.py --only zero3 --update    # re-run some benchmarks and replace them in bench/results.json
    python bench/run_all.py --markdown               # print bench/results.json as the table of docs/performance.md
    python bench/run_all.py --profile                # where one step's time goes (cProfile + torch.profiler), JSON

Benchmarks, one module each: rollout (rollout_bench.py: one generation batch), loss (loss_bench.py: loss + backward,
guidance scope), step (step_bench.py: whole step + peak RSS, one child process per trainer), zero3 (step_bench.py
under 2-process ZeRO-3 on CPU, embedded model), ot (ot_bench.py: the Sinkhorn kernel banded vs dense, and the OT
overhead on a guided step), branching (branch_bench.py: rollout with entropy vs punctuation branch points). The model
and size flags (see --help) apply to rollout, loss, step, branching and --profile; zero3
and ot have fixed sizes. Ratios are guided / vanilla, measured in the same run; targets are recorded with pass/fail,
not asserted. Progress goes to stderr, the JSON to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import branch_bench
import loss_bench
import ot_bench
import profile_step
import rollout_bench
import step_bench
import table
from harness import (
    KINDS,
    add_arguments,
    describe,
    emit,
    emit_text,
    machine_info,
    progress,
    resolve_model,
    settings_from,
    target,
)

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results.json"
BENCHMARKS = ("rollout", "loss", "step", "zero3", "ot", "branching")
OT_OVERHEAD_AT_MOST = 0.15


def run_ot(tiny: bool, saved_report: str | None = None) -> dict[str, Any]:
    """The OT benchmark; `saved_report`: fold in an earlier report (e.g. bench/ot.json) instead of re-running it."""
    if saved_report:
        report = json.loads(Path(saved_report).read_text())
        report["folded_from"] = str(saved_report)
    else:
        report = ot_bench.run(tiny)
    report["targets"] = {"ot_overhead": target(report["training_step"]["overhead"], OT_OVERHEAD_AT_MOST)}
    return report


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    if name == "ot":
        return run_ot(args.tiny, args.ot_report)
    if name == "zero3":
        return step_bench.run_zero3(step_bench.zero3_settings(args.tiny))
    module = {"rollout": rollout_bench, "loss": loss_bench, "step": step_bench, "branching": branch_bench}[name]
    return module.run(settings_from(args))


def profile(args: argparse.Namespace) -> dict[str, Any]:
    settings = settings_from(args)
    model_path = resolve_model(settings)
    report = {"settings": describe(settings, model_path)}
    for kind in KINDS:
        report[kind] = profile_step.profile(kind, settings, model_path, args.top)
    return report


def headline(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The headline ratios, guided / vanilla (the rows of docs/performance.md's table)."""

    def get(bench: str, *keys: str) -> float | None:
        value: Any = results.get(bench, {})
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    return {
        "rollout_wall": get("rollout", "ratios", "wall_seconds_ratio"),
        "rollout_generated_tokens": get("rollout", "ratios", "generated_tokens_ratio"),
        "rollout_decode_steps": get("rollout", "ratios", "decode_steps_ratio"),
        "loss_backward": get("loss", "ratios", "seconds_ratio"),
        "step": get("step", "ratios", "step_seconds_ratio"),
        "peak_memory": get("step", "ratios", "peak_memory_ratio"),
        "zero3_step": get("zero3", "ratios", "step_seconds_ratio"),
        "ot_overhead": get("ot", "training_step", "overhead"),
        "entropy_branch_rollout": get("branching", "ratios", "entropy_vs_punctuation_wall"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    parser.add_argument("--update", action="store_true", help="replace the chosen benchmarks in the existing --out")
    parser.add_argument("--ot-report", help="fold in a saved OT report (e.g. bench/ot.json) instead of re-running it")
    parser.add_argument("--markdown", nargs="?", const=str(RESULTS), metavar="REPORT", help="print REPORT as a table")
    parser.add_argument("--profile", action="store_true", help="profile one step of each trainer instead")
    parser.add_argument("--top", type=int, default=25, help="--profile: entries per table")
    parser.set_defaults(out=None)
    args = parser.parse_args()
    if args.markdown:
        emit_text(table.render(json.loads(Path(args.markdown).read_text())))
        return
    if args.profile:
        emit(profile(args), args.out or "-")
        return
    if args.out is None:
        args.out = "-" if args.tiny else str(RESULTS)
    chosen = args.only.split(",") if args.only else list(BENCHMARKS)
    chosen = [name for name in chosen if name not in args.skip.split(",")]
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {','.join(BENCHMARKS)}")
    if args.update and not Path(args.out).is_file():
        parser.error(f"--update needs an existing report at --out ({args.out})")

    previous = json.loads(Path(args.out).read_text()) if args.update else {}
    results = dict(previous.get("benchmarks", {}))
    durations = dict(previous.get("durations_seconds", {}))
    errors = {name: error for name, error in previous.get("errors", {}).items() if name not in chosen}
    start = time.perf_counter()
    for name in chosen:
        progress("all", f"--- {name} ---")
        began = time.perf_counter()
        try:
            results[name] = run_one(name, args)
        except Exception as error:  # keep the other benchmarks; the failure is in the report and the exit code
            traceback.print_exc()
            errors[name] = f"{type(error).__name__}: {error}"
            results.pop(name, None)
        durations[name] = time.perf_counter() - began
        progress("all", f"{name} took {durations[name]:.1f} s")
    for result in results.values():
        result.pop("machine", None)  # the same machine for all: reported once
    durations["total"] = sum(seconds for name, seconds in durations.items() if name != "total")
    report = {
        "machine": previous.get("machine") or machine_info(),
        "mode": "tiny" if args.tiny else "full",
        "ratios": headline(results),
        "targets": {key: value for r in results.values() for key, value in r.get("targets", {}).items()},
        "durations_seconds": durations,
        "errors": errors,
        "benchmarks": results,
    }
    if args.update:  # the machine line above stays the original run's; these benchmarks ran here, later
        report["updated"] = {"benchmarks": chosen, "machine": machine_info(), "seconds": time.perf_counter() - start}
    emit(report, args.out)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
