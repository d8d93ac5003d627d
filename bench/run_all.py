"""Run every guided-vs-vanilla benchmark and write one JSON report.

    python bench/run_all.py                    # full sizes, writes bench/results.json (tens of minutes on 2 cores)
    python bench/run_all.py --tiny             # tiny model, few tokens, 1 repeat: a smoke run, JSON on stdout only
    python bench/run_all.py --only rollout,loss --out /tmp/r.json

Benchmarks: rollout (1), loss (2: loss + backward, guidance scope), step (3: whole step + peak RSS, one child process
per trainer), zero3 (4: 2-process ZeRO-3 on CPU, tiny model), ot (5: bench/ot_bench.py, called as is). The model and
size flags (see --help) apply to rollout, loss and step; zero3 always uses the tiny model. Ratios are guided / vanilla,
measured in this run; targets are recorded with pass/fail, not asserted. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import loss_bench
import rollout_bench
import step_bench
import zero3_bench
from harness import add_arguments, emit, machine_info, parse_json_output, progress, settings_from, target

BENCH = Path(__file__).resolve().parent
BENCHMARKS = ("rollout", "loss", "step", "zero3", "ot")
OT_OVERHEAD_AT_MOST = 0.15


def run_ot(tiny: bool, saved_report: str | None = None) -> dict[str, Any]:
    """bench/ot_bench.py as is: its command line at full size (JSON on stdout, bench/ot.json left alone); at tiny size
    only its training-step benchmark, in this process (its kernel part has its own smoke test in tests/).
    `saved_report`: fold in a report ot_bench.py wrote earlier (e.g. bench/ot.json) instead of re-running it."""
    if saved_report:
        report = json.loads(Path(saved_report).read_text())
        report["folded_from"] = str(saved_report)
    elif tiny:
        import ot_bench

        report = {"training_step": ot_bench.step_benchmark("tiny", steps=1, max_completion_length=16)}
    else:
        command = [sys.executable, str(BENCH / "ot_bench.py"), "--out", "-"]
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=BENCH)
        if result.returncode != 0:
            raise RuntimeError(f"ot_bench.py exited with {result.returncode}")
        report = parse_json_output(result.stdout)
    report["targets"] = {"ot_overhead": target(report["training_step"]["overhead"], OT_OVERHEAD_AT_MOST)}
    return report


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    if name == "ot":
        return run_ot(args.tiny, args.ot_report)
    if name == "zero3":
        return zero3_bench.run(zero3_bench.zero3_settings(args.tiny))
    module = {"rollout": rollout_bench, "loss": loss_bench, "step": step_bench}[name]
    return module.run(settings_from(args))


def headline(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The ratios of the issue's table, guided / vanilla."""

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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    parser.add_argument(
        "--ot-report", help="fold in a saved bench/ot_bench.py report (e.g. bench/ot.json) instead of re-running it"
    )
    parser.set_defaults(out=None)
    args = parser.parse_args()
    if args.out is None:
        args.out = "-" if args.tiny else str(BENCH / "results.json")
    chosen = args.only.split(",") if args.only else list(BENCHMARKS)
    chosen = [name for name in chosen if name not in args.skip.split(",")]
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {','.join(BENCHMARKS)}")

    results, durations, errors = {}, {}, {}
    start = time.perf_counter()
    for name in chosen:
        progress("all", f"--- {name} ---")
        began = time.perf_counter()
        try:
            results[name] = run_one(name, args)
        except Exception as error:  # keep the other benchmarks; the failure is in the report and the exit code
            traceback.print_exc()
            errors[name] = f"{type(error).__name__}: {error}"
        durations[name] = time.perf_counter() - began
        progress("all", f"{name} took {durations[name]:.1f} s")
    for result in results.values():
        result.pop("machine", None)  # the same machine for all: reported once
    report = {
        "machine": machine_info(),
        "mode": "tiny" if args.tiny else "full",
        "ratios": headline(results),
        "targets": {key: value for r in results.values() for key, value in r.get("targets", {}).items()},
        "durations_seconds": {**durations, "total": time.perf_counter() - start},
        "errors": errors,
        "benchmarks": results,
    }
    emit(report, args.out)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
