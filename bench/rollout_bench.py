"""Benchmark 1, rollout: wall time and generated tokens of one generation batch, vanilla vs guided, one process.

Times each trainer's `_generate_and_score_completions(inputs)` (generation, rewards, advantages, and for guided the
loss-focus post-processing) on the same prompts, G, lengths and seed, repeats interleaved, warm-up excluded. Generated
tokens are counted at TRL's backend dispatch (`GRPOTrainer._generate_single_turn`, every phase call of the guided
trainer goes through it): vanilla = sum of completion lengths; guided = phase-1 prefix samples (once per group) +
guidance + postfix samples, of which the tokens cut away (prefix after its last punctuation mark, EOS retries, guidance
and postfix beyond their drawn budgets) are reported as `discarded_tokens`. Decode steps (sum over transformers
`generate` calls of the new columns) are the sequential work of the transformers backend.

Run through `python bench/run_all.py --only rollout` (embedded SmolLM2-135M, G=8, 256 completion tokens, 3 repeats).
"""

from __future__ import annotations

import time
from typing import Any

from harness import (
    KINDS,
    GenerationCounter,
    benchmark_inputs,
    build_trainer,
    describe,
    guided_settings_used,
    last_metric,
    machine_info,
    progress,
    ratio,
    resolve_model,
    summary,
    synchronize,
    target,
)
from transformers import set_seed

WALL_RATIO_AT_MOST = 1.0


def guided_breakdown(trainer, rows: int, num_generations: int, generated: int) -> dict[str, Any]:
    """Kept prefix (once per group), guidance and postfix tokens from the guided trainer's metrics; the rest of what
    was generated was discarded."""
    means = {name: last_metric(trainer, f"guidance/{name}_length") for name in ("prefix", "guide", "postfix")}
    if any(value is None for value in means.values()):
        return {}
    prefix = means["prefix"] * rows / num_generations  # every row of a group carries its group's prefix
    guidance, postfix = means["guide"] * rows, means["postfix"] * rows
    return {
        "prefix_tokens_kept": prefix,
        "guidance_tokens": guidance,
        "postfix_tokens": postfix,
        "discarded_tokens": generated - prefix - guidance - postfix,
        "empty_prefix_ratio": last_metric(trainer, "guidance/empty_prefix_ratio"),
    }


def rollout_once(trainer, inputs: list[dict], counter: GenerationCounter, seed: int, kind: str) -> dict[str, Any]:
    set_seed(seed)
    counter.reset()
    synchronize()
    start = time.perf_counter()
    trainer._generate_and_score_completions(inputs)
    synchronize()
    record = {"wall_seconds": time.perf_counter() - start, **counter.totals()}
    record["mean_completion_length"] = last_metric(trainer, "completions/mean_length")
    if kind == "guided":
        record.update(guided_breakdown(trainer, len(inputs), trainer.num_generations, record["generated_tokens"]))
    return record


def aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("wall_seconds", "generate_seconds", "generated_tokens", "decode_steps", "row_steps")
    result = {key: summary([r[key] for r in records]) for key in keys}
    result["repeats"] = records
    return result


def run(settings) -> dict[str, Any]:
    model_path = resolve_model(settings)
    progress("rollout", f"building both trainers on {settings.model}")
    trainers = {kind: build_trainer(kind, settings, model_path) for kind in KINDS}
    inputs = benchmark_inputs(settings)
    records: dict[str, list] = {kind: [] for kind in KINDS}
    with GenerationCounter(trainers["vanilla"].eos_token_ids) as counter:
        total = settings.warmup + settings.repeats
        for repeat in range(total):
            timed = repeat >= settings.warmup
            for kind in KINDS:  # interleaved, so load on a shared machine hits both alike
                label = f"repeat {repeat - settings.warmup + 1}/{settings.repeats}" if timed else "warm-up"
                progress("rollout", f"{label} {kind}")
                record = rollout_once(trainers[kind], inputs, counter, settings.seed + repeat, kind)
                progress("rollout", f"  {record['wall_seconds']:.2f} s, {record['generated_tokens']} tokens")
                if timed:
                    records[kind].append(record)
    result = {kind: aggregate(records[kind]) for kind in KINDS}
    medians = {key: {k: result[k][key]["median"] for k in KINDS} for key in result["vanilla"] if key != "repeats"}
    ratios = {f"{key}_ratio": ratio(v["guided"], v["vanilla"]) for key, v in medians.items()}
    return {
        "benchmark": "rollout",
        "machine": machine_info(),
        "settings": describe(settings, model_path),
        "guided_settings": guided_settings_used(trainers["guided"]),
        "backend": "transformers",
        **result,
        "ratios": ratios,
        "targets": {"rollout_wall": target(ratios["wall_seconds_ratio"], WALL_RATIO_AT_MOST)},
    }
