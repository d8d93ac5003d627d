"""The OT benchmark (`python bench/run_all.py --only ot`).

1. Kernel: the banded log-domain Sinkhorn (trl_guided.ot) against a dense (B, T, T) log-domain implementation of the
   same OT, forward + backward, each in a fresh subprocess (this file with `--kernel`) so peak RSS is its own.
2. Training step: a guided GRPO step with OT off vs on (same seed, learning rate 0, so the same rollouts), built by
   the shared harness.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from harness import Settings, build_trainer, emit, peak_rss_mb, progress, resolve_model, rss_mb

from trl_guided.ot import banded_sinkhorn

NEG = -1e30


def dense_sinkhorn(x, y, mask, window, epsilon, iterations):
    """The same entropic OT with a full (B, T, T) cost matrix: the reference the banded kernel must beat."""
    x = torch.nn.functional.normalize(x.float(), dim=-1, eps=1e-8)
    y = torch.nn.functional.normalize(y.float(), dim=-1, eps=1e-8)
    cost = 1.0 - x @ y.transpose(1, 2)
    index = torch.arange(x.size(1))
    band = (index[:, None] - index[None, :]).abs() <= window
    valid = mask[:, :, None] & mask[:, None, :] & band
    scaled = (-cost / epsilon).masked_fill(~valid, NEG)
    count = mask.sum(-1, keepdim=True).clamp(min=1).float()
    log_marginal = torch.where(mask, -torch.log(count), torch.zeros_like(count))
    f = torch.zeros_like(log_marginal)
    g = torch.zeros_like(log_marginal)
    for _ in range(iterations):
        f = torch.where(mask, log_marginal - torch.logsumexp(scaled + g[:, None, :], dim=-1), 0.0)
        g = torch.where(mask, log_marginal - torch.logsumexp(scaled + f[:, :, None], dim=1), 0.0)
    plan = (scaled + f[:, :, None] + g[:, None, :]).masked_fill(~valid, float("-inf")).exp()
    return (plan * cost.masked_fill(~valid, 0.0)).sum(dim=(1, 2))


@dataclasses.dataclass
class KernelShape:
    batch: int = 8
    length: int = 1024
    hidden: int = 896
    window: int = 16
    iterations: int = 50
    repeats: int = 2

    @classmethod
    def tiny(cls) -> KernelShape:
        return cls(batch=2, length=64, hidden=16, window=4, iterations=5, repeats=1)


def run_kernel(kind: str, batch: int, length: int, hidden: int, window: int, iterations: int, repeats: int) -> dict:
    """Forward + backward of one kernel; called in its own process."""
    torch.manual_seed(0)
    x = torch.randn(batch, length, hidden, requires_grad=True)
    y = torch.randn(batch, length, hidden)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[:, int(length * 0.9) :] = False
    solve = banded_sinkhorn if kind == "banded" else dense_sinkhorn
    baseline = rss_mb()
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        cost = solve(x, y, mask, window, 0.1, iterations)
        cost.sum().backward()
        times.append(time.perf_counter() - start)
        value = cost.detach().tolist()
        x.grad = None
    peak = peak_rss_mb()
    return {"seconds": min(times), "peak_extra_mb": max(peak - baseline, 0.0), "cost": value}


def kernel_benchmark(shape: KernelShape) -> dict:
    batch, length, hidden, window, iterations = shape.batch, shape.length, shape.hidden, shape.window, shape.iterations
    results = {}
    for kind in ("banded", "dense"):
        progress("ot", f"{kind} kernel, B={batch} T={length} H={hidden} window={window}, in a child process")
        command = [sys.executable, __file__, "--kernel", kind, "--shape", json.dumps(dataclasses.asdict(shape))]
        out = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        results[kind] = json.loads(out.stdout)
    banded, dense = results["banded"], results["dense"]
    agree = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(banded["cost"], dense["cost"], strict=True))
    return {
        "shape": {"B": batch, "T": length, "H": hidden, "window": window, "iterations": iterations},
        "banded_seconds": banded["seconds"],
        "dense_seconds": dense["seconds"],
        "speedup": dense["seconds"] / banded["seconds"],
        "banded_peak_extra_mb": banded["peak_extra_mb"],
        "dense_peak_extra_mb": dense["peak_extra_mb"],
        "memory_ratio": dense["peak_extra_mb"] / max(banded["peak_extra_mb"], 1e-3),
        "max_relative_difference": agree,
        "targets": {"speedup_at_least": 3.0, "memory_ratio_at_least": 10.0},
    }


def step_benchmark(settings: Settings) -> dict:
    """Median seconds per guided GRPO step with OT off and on, same seed, data and rollouts, in this process."""
    model_path = resolve_model(settings)
    results = {}
    for label, ot_coef in (("ot_off", 0.0), ("ot_on", 0.1)):
        progress("ot", f"guided training, {label}: {settings.warmup} warm-up + {settings.repeats} timed steps")
        steps = settings.warmup + settings.repeats
        # Learning rate 0: identical rollouts in both runs, so the timing difference is the OT work alone.
        overrides = dict(learning_rate=0.0, ot_coef=ot_coef, ot_window=16)
        trainer = build_trainer("guided", settings, model_path, max_steps=steps, overrides=overrides)
        trainer.train()
        history = [e for e in trainer.state.log_history if "step_time" in e][settings.warmup :]
        results[label] = statistics.median(e["step_time"] for e in history)
        results[f"{label}_lengths"] = [e["completions/mean_length"] for e in history]
    return {
        "model": settings.model,
        "steps_timed": settings.repeats,
        "seconds_per_step_ot_off": results["ot_off"],
        "seconds_per_step_ot_on": results["ot_on"],
        "overhead": results["ot_on"] / results["ot_off"] - 1.0,
        "same_rollouts": results["ot_off_lengths"] == results["ot_on_lengths"],
        "target": {"overhead_at_most": 0.15},
    }


def step_settings(tiny: bool) -> Settings:
    """The embedded SmolLM2-135M, G=4, 8 rows, 48 completion tokens, 1 + 6 steps (tiny: the tiny model, 1 + 1)."""
    if tiny:
        settings = Settings.tiny()
        settings.max_completion_length, settings.prefix_min_tokens, settings.prefix_max_tokens = 16, 2, 6
        return settings
    return Settings(num_generations=4, groups=2, max_completion_length=48, repeats=6, learning_rate=0.0)


def run(tiny: bool) -> dict[str, Any]:
    return {
        "kernel": kernel_benchmark(KernelShape.tiny() if tiny else KernelShape()),
        "training_step": step_benchmark(step_settings(tiny)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="one kernel in this process (run by kernel_benchmark)")
    parser.add_argument("--kernel", choices=["banded", "dense"], required=True)
    parser.add_argument("--shape", required=True, help="JSON of a KernelShape")
    args = parser.parse_args()
    shape = KernelShape(**json.loads(args.shape))
    emit(run_kernel(args.kernel, **dataclasses.asdict(shape)))


if __name__ == "__main__":
    main()
