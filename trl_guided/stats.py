"""Statistics of evaluations (pure: no model, no file): unbiased pass@k, bootstrap confidence intervals over problems,
paired bootstrap of a difference, exact McNemar test, each metric's direction (better/worse/ties), the metrics of a
result recomputed from its per-sample records, the comparison of two results, and their plain-text tables.

`trl_guided.evaluate` produces the results these read; docs/evaluation.md describes the numbers.
"""

from __future__ import annotations

import math

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
# Settings two comparable results may differ in: how samples were computed, not what they are (fluency is compared on
# the problems both scored, so a `quality_limit` difference narrows that metric, it does not bias it).
COMPARE_FREE_SETTINGS = ("batch_size", "backend", "vllm_gpu_memory_utilization", "quality_limit")


class EvalError(ValueError):
    """Bad evaluation input, reported to the user as one line."""


# ------------------------------------------------------------------------------------------------------ statistics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `c` correct among `n` samples (Chen et al. 2021): 1 - C(n-c, k) / C(n, k),
    the probability that k samples drawn without replacement from the n contain a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _resample_means(values: np.ndarray, seed: int, resamples: int) -> np.ndarray:
    """Means of `resamples` bootstrap resamples of `values` (problems drawn with replacement)."""
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(values), size=(resamples, len(values)))
    return values[indices].mean(axis=1)


def bootstrap_ci(
    values, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-problem `values` (seeded: the same values give the same
    interval). A single value, or identical values, give a zero-width interval."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return (math.nan, math.nan)
    means = _resample_means(values, seed, resamples)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return (float(low), float(high))


def paired_bootstrap_ci(before, after, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """Interval of mean(after - before) when the same problems are resampled for both (the pairing keeps the
    problem-to-problem variance, which both evaluations share, out of the interval)."""
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if before.shape != after.shape:
        raise ValueError(f"paired values differ in number: {before.shape} vs {after.shape}")
    return bootstrap_ci(after - before, seed=seed, resamples=resamples)


def mcnemar_exact(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value: under "no change", each of the `wins + losses` discordant problems is a win
    with probability 1/2, so p = min(1, 2 * P(Binomial(n, 1/2) <= min(wins, losses)))."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2**n)


def wins_losses_ties(before, after) -> tuple[int, int, int]:
    """Problems where `after` scores higher, lower, the same."""
    wins = sum(a > b for b, a in zip(before, after, strict=True))
    losses = sum(a < b for b, a in zip(before, after, strict=True))
    return wins, losses, len(before) - wins - losses


# Which way a metric improves. Rewards and pass@k/avg@k rise; these fall; how long a completion should be is the
# task's business, so lengths have no direction and their problems are counted as higher/lower, not better/worse.
LOWER_IS_BETTER = frozenset({"truncated", "repetition", "nll_per_token"})
UNDIRECTED = frozenset({"completion_tokens", "completion_chars"})


def metric_direction(name: str) -> str | None:
    """'higher' or 'lower' (the better value), or None for a metric with no better side (lengths)."""
    if name in UNDIRECTED:
        return None
    return "lower" if name in LOWER_IS_BETTER else "higher"


def directed_counts(name: str, higher: int, lower: int, ties: int) -> dict[str, int]:
    """Per-problem counts of a comparison by the metric's direction: `better`/`worse`/`ties` (a fall in a
    lower-is-better metric is better), or `higher`/`lower`/`ties` for a metric without one."""
    direction = metric_direction(name)
    if direction is None:
        return {"higher": higher, "lower": lower, "ties": ties}
    better, worse = (higher, lower) if direction == "higher" else (lower, higher)
    return {"better": better, "worse": worse, "ties": ties}


def count_text(entry: dict) -> str:
    """A comparison entry's per-problem counts in a few characters: `5 better / 0 worse / 5 ties`."""
    if "better" in entry:
        return f"{entry['better']} better / {entry['worse']} worse / {entry['ties']} ties"
    return f"{entry['higher']} higher / {entry['lower']} lower / {entry['ties']} ties"


def repetition(text: str, n: int = 10) -> float:
    """Fraction of the text's character n-grams that repeat an earlier one: ~0 for prose, near 1 for degenerate loops
    such as `1.1.1.1.` or a sentence said over and over (which a language model finds likely, so NLL misses them)."""
    grams = [text[i : i + n] for i in range(len(text) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def is_binary(values) -> bool:
    """True for 0/1 (accuracy-like) reward values."""
    values = [v for v in values if v is not None]
    return bool(values) and all(v in (0.0, 1.0) for v in values)


# ------------------------------------------------------------------------------------------ metrics from records


def _problem_order(records: list[dict]) -> list[str]:
    order: dict[str, None] = {}
    for record in records:
        order.setdefault(record["problem_id"], None)
    return list(order)


def per_problem_values(records: list[dict], reward_names: list[str], num_samples: int) -> dict[str, dict[str, float]]:
    """metric -> {problem id -> the problem's value}. A metric's value is the mean of these over problems.

    Per reward: `mean` (its mean over the problem's samples); for 0/1 rewards also `pass@1`, `pass@K` and `avg@K`
    (K = num_samples; avg@K is the mean accuracy of the K samples, which is also the unbiased pass@1). Samples whose
    reward is None (gold answer unparseable) are left out; a problem without any scored sample is left out of that
    reward's metrics. Then `completion_tokens`, `completion_chars`, `truncated` (fraction of samples that hit
    max_new_tokens), `repetition` (see `repetition`) and, with a quality model, `nll_per_token` (its NLL summed over
    the problem's completion tokens, divided by their number).
    """
    by_problem: dict[str, list[dict]] = {}
    for record in records:
        by_problem.setdefault(record["problem_id"], []).append(record)
    values: dict[str, dict[str, float]] = {}
    for name in reward_names:
        scored = {
            pid: [r["rewards"][name] for r in rows if r["rewards"][name] is not None]
            for pid, rows in by_problem.items()
        }
        scored = {pid: v for pid, v in scored.items() if v}
        values[f"{name}/mean"] = {pid: float(np.mean(v)) for pid, v in scored.items()}
        if is_binary([x for v in scored.values() for x in v]):
            for k in sorted({1, num_samples}):
                values[f"{name}/pass@{k}"] = {
                    pid: pass_at_k(len(v), int(sum(v)), k) for pid, v in scored.items() if len(v) >= k
                }
            values[f"{name}/avg@{num_samples}"] = dict(values[f"{name}/mean"])
    values["completion_tokens"] = {
        pid: float(np.mean([r["tokens"] for r in rows])) for pid, rows in by_problem.items()
    }
    values["completion_chars"] = {
        pid: float(np.mean([len(r["completion"]) for r in rows])) for pid, rows in by_problem.items()
    }
    values["truncated"] = {pid: float(np.mean([r["truncated"] for r in rows])) for pid, rows in by_problem.items()}
    values["repetition"] = {
        pid: float(np.mean([repetition(r["completion"]) for r in rows])) for pid, rows in by_problem.items()
    }
    if any(r.get("nll") is not None for r in records):
        nll = {}
        for pid, rows in by_problem.items():
            tokens = sum(r["nll_tokens"] for r in rows if r.get("nll") is not None)
            if tokens:
                nll[pid] = sum(r["nll"] for r in rows if r.get("nll") is not None) / tokens
        values["nll_per_token"] = nll
    return values


def metrics_from_records(records: list[dict], reward_names: list[str], num_samples: int, seed: int) -> dict:
    """The `metrics` and `problems` sections of a result file, from the per-sample records alone."""
    values = per_problem_values(records, reward_names, num_samples)
    metrics = {}
    for name, by_problem in values.items():
        problem_values = list(by_problem.values())
        low, high = bootstrap_ci(problem_values, seed=seed)
        metrics[name] = {
            "value": float(np.mean(problem_values)) if problem_values else math.nan,
            "ci95": [low, high],
            "problems": len(problem_values),
        }
    problems = {pid: {name: v[pid] for name, v in values.items() if pid in v} for pid in _problem_order(records)}
    return {"metrics": metrics, "problems": problems}


# ----------------------------------------------------------------------------------------------------- comparison


def _settings_that_matter(result: dict) -> dict:
    return {k: v for k, v in result["settings"].items() if k not in COMPARE_FREE_SETTINGS}


def compare(before: dict, after: dict, force: bool = False, seed: int = 0) -> dict:
    """Metric by metric on the problems both evaluated: both values, the difference with a paired bootstrap CI, and
    per-problem wins/losses/ties (plus an exact McNemar p-value for 0/1 rewards).

    Refuses (EvalError) results from different problem sets or settings, unless `force`.
    """
    before_ids, after_ids = set(before["problems"]), set(after["problems"])
    if not force:
        if before_ids != after_ids:
            raise EvalError(
                f"the two results evaluated different problems ({len(before_ids)} vs {len(after_ids)} problems, "
                f"{len(before_ids ^ after_ids)} not in both); evaluate both on the same task/split/limit, or pass "
                "--force to compare the common ones"
            )
        mine, theirs = _settings_that_matter(before), _settings_that_matter(after)
        differing = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differing:
            detail = ", ".join(f"{k}: {mine.get(k)!r} vs {theirs.get(k)!r}" for k in differing)
            raise EvalError(f"the two results used different settings ({detail}); pass --force to compare anyway")
    common = [pid for pid in before["problems"] if pid in after_ids]
    if not common:
        raise EvalError("the two results have no problem in common; nothing to compare")
    metrics = {}
    for name in before["metrics"]:
        if name not in after["metrics"]:
            continue
        pairs = [
            (before["problems"][pid][name], after["problems"][pid][name])
            for pid in common
            if name in before["problems"][pid] and name in after["problems"][pid]
        ]
        if not pairs:
            continue
        b, a = (np.array(x, dtype=np.float64) for x in zip(*pairs, strict=True))
        low, high = paired_bootstrap_ci(b, a, seed=seed)
        higher, lower, ties = wins_losses_ties(b.tolist(), a.tolist())
        entry = {
            "before": float(b.mean()),
            "after": float(a.mean()),
            "diff": float(a.mean() - b.mean()),
            "diff_ci95": [low, high],
            "problems": len(pairs),
            "better_when": metric_direction(name),
            **directed_counts(name, higher, lower, ties),
        }
        if is_binary(b.tolist() + a.tolist()):
            entry["mcnemar_p"] = mcnemar_exact(higher, lower)
        metrics[name] = entry
    return {
        "before": {"model": before["model"], "settings": before["settings"]},
        "after": {"model": after["model"], "settings": after["settings"]},
        "problems": len(common),
        "forced": bool(
            force and (before_ids != after_ids or _settings_that_matter(before) != _settings_that_matter(after))
        ),
        "metrics": metrics,
    }


def headline_metric(reward_funcs: list[str]) -> str | None:
    """The metric a one-line summary (and the learning study) reports for an evaluation with these rewards: the first
    reward's mean (its accuracy for a 0/1 reward)."""
    return f"{reward_funcs[0]}/mean" if reward_funcs else None


def summary_line(comparison: dict) -> str:
    """E.g. `arithmetic_accuracy: 0.12 -> 0.21 (+0.09, 95% CI +0.03..+0.15, 18 better / 5 worse / 77 ties)`."""
    name = headline_metric(comparison["before"]["settings"]["reward_funcs"])
    entry = comparison["metrics"].get(name) if name else None
    if entry is None:
        return "no reward metric to compare"
    low, high = entry["diff_ci95"]
    return (
        f"{name.removesuffix('/mean')}: {entry['before']:.2f} -> {entry['after']:.2f} ({entry['diff']:+.2f}, 95% CI "
        f"{low:+.2f}..{high:+.2f}, {count_text(entry)})"
    )


def _number(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4g}" if abs(value) >= 1000 else f"{value:.3f}"


def format_result(result: dict) -> str:
    """A result as a plain table: metric, value, 95% CI, problems."""
    settings = result["settings"]
    lines = [
        f"{result['model']['name']} on {settings['task']}/{settings['split']}: {settings['problems']} problems x "
        f"{settings['num_samples']} sample(s), {settings['sampling']} sampling, temperature {settings['temperature']}"
        + (" (greedy)" if settings["temperature"] == 0 else ""),
        f"{'metric':<34} {'value':>9}  {'95% CI':<19} {'problems':>8}",
    ]
    for name, entry in result["metrics"].items():
        low, high = entry["ci95"]
        lines.append(
            f"{name:<34} {_number(entry['value']):>9}  [{_number(low)}, {_number(high)}]".ljust(65)
            + f"{entry['problems']:>8}"
        )
    return "\n".join(lines)


def format_comparison(comparison: dict) -> str:
    """A comparison as a plain table: metric, before, after, difference with its 95% CI, the per-problem counts
    (better/worse/ties, or higher/lower/ties for lengths), p."""
    lines = [
        f"before: {comparison['before']['model']['name']}",
        f"after:  {comparison['after']['model']['name']}",
        f"{comparison['problems']} problems matched by id" + (" (forced)" if comparison.get("forced") else ""),
        f"{'metric':<34} {'before':>8} {'after':>8} {'diff':>8}  {'95% CI of diff':<20} "
        f"{'problems: better / worse / ties':<37} {'McNemar p':>9}",
    ]
    for name, e in comparison["metrics"].items():
        low, high = e["diff_ci95"]
        p = f"{e['mcnemar_p']:.3g}" if "mcnemar_p" in e else ""
        interval = f"[{low:+.3f}, {high:+.3f}]"
        lines.append(
            f"{name:<34} {_number(e['before']):>8} {_number(e['after']):>8} {e['diff']:>+8.3f}  "
            f"{interval:<20} {count_text(e):<37} {p:>9}"
        )
    lines.append(summary_line(comparison))
    return "\n".join(lines)
