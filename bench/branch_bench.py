"""Benchmark 6, branch points: the extra rollout cost of choosing the branch point from the policy's entropies.

Times one guided generation batch (`_generate_and_score_completions`: three phases, rewards, advantages, loss focus)
with `branch_point="punctuation"` (decode-based, no model call) against `"entropy"` (plus one no-grad forward of the
policy over each phase-1 sample, see `RolloutBackend.token_signals`) and `"random"` (no model call: its time differs
from punctuation's only by where it cuts), on the same prompts and seed, repeats interleaved, warm-up excluded.
`low_prob` reads the same forward as `entropy`, so it costs the same. The scoring forward is also timed on its own.
Since the transformers backend reads the signals off generation (`SignalRecorder`), the scoring forward runs only on
backends that keep no logits (vLLM): on the transformers backend this benchmark times it as 0 now.

Run through `python bench/run_all.py --only branching` (embedded SmolLM2-135M, G=8, 256 completion tokens, 3 repeats).
"""

from __future__ import annotations

import time
from typing import Any

from harness import (
    benchmark_inputs,
    build_trainer,
    describe,
    last_metric,
    machine_info,
    progress,
    ratio,
    resolve_model,
    summary,
    synchronize,
)
from transformers import set_seed

STRATEGIES = ("punctuation", "entropy", "random")


def timed_signals(trainer) -> list[float]:
    """Wrap the trainer's scoring forward; the returned list collects its wall seconds per call."""
    seconds: list[float] = []
    backend = trainer._backend
    score = backend.token_signals

    def timed(prompts, samples):
        start = time.perf_counter()
        result = score(prompts, samples)
        seconds.append(time.perf_counter() - start)
        return result

    backend.token_signals = timed
    return seconds


def run(settings) -> dict[str, Any]:
    model_path = resolve_model(settings)
    progress("branching", f"building one guided trainer per strategy on {settings.model}")
    trainers = {
        name: build_trainer("guided", settings, model_path, overrides={"branch_point": name}) for name in STRATEGIES
    }
    scoring = {name: timed_signals(trainer) for name, trainer in trainers.items()}
    inputs = benchmark_inputs(settings, trainers[STRATEGIES[0]])
    records: dict[str, list] = {name: [] for name in STRATEGIES}
    for repeat in range(settings.warmup + settings.repeats):
        timed = repeat >= settings.warmup
        for name in STRATEGIES:  # interleaved, so load on a shared machine hits all alike
            scoring[name].clear()
            set_seed(settings.seed + repeat)
            synchronize()
            start = time.perf_counter()
            trainers[name]._generate_and_score_completions(inputs)
            synchronize()
            record = {
                "wall_seconds": time.perf_counter() - start,
                "scoring_seconds": sum(scoring[name]),
                "prefix_length": last_metric(trainers[name], "guidance/prefix_length"),
                "branch_position": last_metric(trainers[name], "guidance/branch_position"),
                "empty_prefix_ratio": last_metric(trainers[name], "guidance/empty_prefix_ratio"),
            }
            progress("branching", f"{'warm-up' if not timed else f'repeat {repeat}'} {name}: {record}")
            if timed:
                records[name].append(record)
    result = {
        name: {key: summary([r[key] for r in rows]) for key in rows[0] if rows[0][key] is not None} | {"repeats": rows}
        for name, rows in records.items()
    }
    median = {name: result[name]["wall_seconds"]["median"] for name in STRATEGIES}
    return {
        "benchmark": "branching",
        "machine": machine_info(),
        "settings": describe(settings, model_path),
        "backend": "transformers",
        **result,
        "ratios": {
            "entropy_vs_punctuation_wall": ratio(median["entropy"], median["punctuation"]),
            "random_vs_punctuation_wall": ratio(median["random"], median["punctuation"]),
            "entropy_scoring_share": ratio(result["entropy"]["scoring_seconds"]["median"], median["entropy"]),
        },
    }
