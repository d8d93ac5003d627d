"""A study's report as text: the terminal table and the README's markdown tables (arms; learning-rate grid)."""

from __future__ import annotations

import numpy as np


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


def _before_after(before: float | None, after: list) -> str:
    """'before -> mean after' with two decimals, '-' without a value on either side."""
    after = [v for v in after if v is not None]
    return f"{before:.2f} -> {np.mean(after):.2f}" if before is not None and after else "-"


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
        nll = _before_after(entry["nll_per_token_before"], entry["nll_per_token_after"])
        repetition = _before_after(entry.get("repetition_before"), entry.get("repetition_after", []))
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
