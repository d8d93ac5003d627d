"""Benchmark 2, loss + backward (guidance scope): `compute_loss` + `backward` on each trainer's own scored batch.

Each trainer first makes one rollout through its real entry point (`_prepare_inputs`, which generates, scores,
shuffles and splits exactly as in training); that batch is then fixed and the trainer's `compute_loss` followed by
`accelerator.backward` is timed on it, repeats interleaved, warm-up excluded. The vanilla batch holds every completion
column; the guided batch (scope `guidance`) stops after the last guidance token, and whatever the trainer does in its
loss forward (e.g. sharing the prompt+prefix per group) is what gets timed.

Run through `python bench/run_all.py --only loss` (embedded SmolLM2-135M, G=8, 256 completion tokens, 3 repeats).
"""

from __future__ import annotations

import time
from typing import Any

from harness import (
    KINDS,
    benchmark_inputs,
    build_trainer,
    describe,
    guided_settings_used,
    machine_info,
    progress,
    ratio,
    resolve_model,
    summary,
    synchronize,
    target,
)
from transformers import set_seed

LOSS_BACKWARD_RATIO_AT_MOST = 0.5


def scored_batch(trainer, inputs: list[dict], seed: int) -> dict[str, Any]:
    """One rollout through the trainer's own `_prepare_inputs` (the training path: generate, score, split)."""
    set_seed(seed)
    trainer._step = 0  # TRL generates when `_step % (steps_per_generation * num_iterations) == 0`
    batch = trainer._prepare_inputs(inputs)
    # Trainer.train() sets this for every optimizer step; TRL's loss normalizers read it.
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    return batch


def batch_shape(batch: dict[str, Any]) -> dict[str, int]:
    mask = batch["completion_mask"]
    trained = mask * batch["tool_mask"] if "tool_mask" in batch else mask
    return {
        "rows": mask.size(0),
        "prompt_columns": batch["prompt_ids"].size(1),
        "completion_columns": mask.size(1),
        "completion_tokens": int(mask.sum()),
        "trained_tokens": int(trained.sum()),
    }


def loss_backward_once(trainer, batch: dict[str, Any]) -> dict[str, float]:
    model = trainer.model_wrapped
    synchronize()
    start = time.perf_counter()
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(model, batch)
    synchronize()
    middle = time.perf_counter()
    trainer.accelerator.backward(loss)
    synchronize()
    end = time.perf_counter()
    model.zero_grad(set_to_none=True)
    return {"loss_seconds": middle - start, "backward_seconds": end - middle, "seconds": end - start}


def run(settings) -> dict[str, Any]:
    model_path = resolve_model(settings)
    progress("loss", f"building both trainers on {settings.model}")
    trainers = {kind: build_trainer(kind, settings, model_path) for kind in KINDS}
    inputs = benchmark_inputs(settings)
    batches = {}
    for kind in KINDS:
        progress("loss", f"rollout for the fixed {kind} batch")
        batches[kind] = scored_batch(trainers[kind], inputs, settings.seed)
    records: dict[str, list] = {kind: [] for kind in KINDS}
    for repeat in range(settings.warmup + settings.repeats):
        timed = repeat >= settings.warmup
        for kind in KINDS:
            label = f"repeat {repeat - settings.warmup + 1}/{settings.repeats}" if timed else "warm-up"
            record = loss_backward_once(trainers[kind], batches[kind])
            progress("loss", f"{label} {kind}: {record['seconds']:.2f} s")
            if timed:
                records[kind].append(record)
    keys = ("seconds", "loss_seconds", "backward_seconds")
    result = {
        kind: {"batch": batch_shape(batches[kind]), **{key: summary([r[key] for r in records[kind]]) for key in keys}}
        for kind in KINDS
    }
    ratios = {f"{key}_ratio": ratio(result["guided"][key]["median"], result["vanilla"][key]["median"]) for key in keys}
    return {
        "benchmark": "loss_backward",
        "machine": machine_info(),
        "settings": describe(settings, model_path),
        "guided_settings": guided_settings_used(trainers["guided"]),
        **result,
        "ratios": ratios,
        "targets": {"loss_backward": target(ratios["seconds_ratio"], LOSS_BACKWARD_RATIO_AT_MOST)},
    }
