"""Render a bench/run_all.py report as the Markdown table of docs/performance.md (never hand-copied numbers).

python bench/run_all.py --markdown                     # the table of bench/results.json
python bench/run_all.py --markdown /tmp/results.json
"""

from __future__ import annotations

from typing import Any


def median(entry: dict[str, Any], key: str) -> float | None:
    value = entry.get(key)
    return value.get("median") if isinstance(value, dict) else value


def number(value: float | None, digits: int = 2, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def target(report: dict[str, Any], name: str) -> str:
    entry = report["targets"].get(name)
    if not entry:
        return ""
    return f"≤ {entry['at_most']} ({'pass' if entry['pass'] else 'MISS'})"


def rows(report: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    benchmarks, ratios = report["benchmarks"], report["ratios"]
    table = []
    if "rollout" in benchmarks:
        vanilla, guided = benchmarks["rollout"]["vanilla"], benchmarks["rollout"]["guided"]
        table.append(
            (
                "rollout wall (s)",
                number(median(vanilla, "wall_seconds"), 1),
                number(median(guided, "wall_seconds"), 1),
                number(ratios["rollout_wall"]),
                target(report, "rollout_wall"),
            )
        )
        for label, key, ratio in (
            ("generated tokens", "generated_tokens", "rollout_generated_tokens"),
            ("sequential decode steps", "decode_steps", "rollout_decode_steps"),
        ):
            table.append(
                (label, number(median(vanilla, key), 0), number(median(guided, key), 0), number(ratios[ratio]), "")
            )
    if "loss" in benchmarks:
        vanilla, guided = benchmarks["loss"]["vanilla"], benchmarks["loss"]["guided"]
        table.append(
            (
                "loss + backward (s)",
                number(median(vanilla, "seconds")),
                number(median(guided, "seconds")),
                number(ratios["loss_backward"]),
                target(report, "loss_backward"),
            )
        )
    if "step" in benchmarks:
        vanilla, guided = benchmarks["step"]["vanilla"], benchmarks["step"]["guided"]
        table.append(
            (
                "whole training step (s)",
                number(median(vanilla, "step_seconds"), 1),
                number(median(guided, "step_seconds"), 1),
                number(ratios["step"]),
                target(report, "step"),
            )
        )
        table.append(
            (
                "peak RSS (MB)",
                number(vanilla.get("peak_memory_mb"), 0),
                number(guided.get("peak_memory_mb"), 0),
                number(ratios["peak_memory"]),
                target(report, "memory"),
            )
        )
    if "zero3" in benchmarks:
        zero3 = benchmarks["zero3"]
        model = "tiny model" if zero3.get("settings", {}).get("model") == "tiny" else "embedded model"
        table.append(
            (
                f"ZeRO-3, 2 CPU processes, {model}: step (s)",
                number(median(zero3["vanilla"], "step_seconds")),
                number(median(zero3["guided"], "step_seconds")),
                number(ratios["zero3_step"]),
                target(report, "zero3_step"),
            )
        )
    if "ot" in benchmarks:
        table.append(
            (
                "OT overhead on a guided step (window 16)",
                "",
                "",
                number(ratios["ot_overhead"]),
                target(report, "ot_overhead"),
            )
        )
    return table


def render(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"Machine: {machine['cpu_count']} cores ({machine['cpu_model']}), {machine['memory_gb']} GB, no GPU; torch "
        f"{machine['torch']}, transformers {machine['transformers']}, trl {machine['trl']}.",
        "",
        "| | vanilla `GRPOTrainer` | `GuidedGRPOTrainer` | ratio | target |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in rows(report)]
    if report.get("updated"):
        later = report["updated"]["machine"]
        lines += [
            "",
            f"Re-run later on its own (`--update`): {', '.join(report['updated']['benchmarks'])}, with torch "
            f"{later['torch']}, transformers {later['transformers']}, trl {later['trl']}.",
        ]
    if report.get("errors"):
        lines += ["", f"Errors in this run: {report['errors']}"]
    return "\n".join(lines)
