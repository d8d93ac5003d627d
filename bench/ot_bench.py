"""OT benchmarks, printed as JSON.

1. Kernel: the banded log-domain Sinkhorn (trl_guided.ot) against a dense (B, T, T) log-domain implementation of the
   same OT, forward + backward, each in a fresh subprocess so peak RSS is its own.
2. Training step: a guided GRPO step on the embedded SmolLM2-135M with OT off vs on (same run, same seed).

    python bench/ot_bench.py                      # full sizes (T=1024, H=896, window 16, B=8), writes bench/ot.json
    python bench/ot_bench.py --tiny --out -       # seconds-long smoke run (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

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


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {"seconds": min(times), "peak_extra_mb": max(peak - baseline, 0.0), "cost": value}


def kernel_benchmark(batch, length, hidden, window, iterations, repeats) -> dict:
    results = {}
    for kind in ("banded", "dense"):
        command = [sys.executable, __file__, "--kernel", kind, "--batch", str(batch), "--length", str(length)]
        command += ["--hidden", str(hidden), "--window", str(window), "--iterations", str(iterations)]
        command += ["--repeats", str(repeats)]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
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


def step_benchmark(model: str, steps: int, max_completion_length: int) -> dict:
    """Median seconds per guided GRPO step with OT off and on, same seed, data and rollouts, in this process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tempfile

    from trl_guided import GuidedGRPOConfig, GuidedGRPOTrainer
    from trl_guided.data import load_task
    from trl_guided.rewards import get_reward
    from trl_guided.tiny_models import build_tiny_model

    if model == "tiny":
        model = build_tiny_model(tempfile.mkdtemp(prefix="tiny-"))
    results = {}
    for label, ot_coef in (("ot_off", 0.0), ("ot_on", 0.1)):
        args = GuidedGRPOConfig(
            output_dir=tempfile.mkdtemp(prefix="ot-bench-"),
            per_device_train_batch_size=8,
            num_generations=4,
            max_completion_length=max_completion_length,
            max_steps=steps + 1,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            seed=0,
            learning_rate=0.0,  # identical rollouts in both runs: the timing difference is the OT work alone
            ot_coef=ot_coef,
            ot_window=16,
        )
        trainer = GuidedGRPOTrainer(
            model=model,
            reward_funcs=get_reward("smooth_length", target=120),
            args=args,
            train_dataset=load_task("length"),
        )
        trainer.train()
        history = [e for e in trainer.state.log_history if "step_time" in e][1:]  # drop the warm-up step
        results[label] = statistics.median(e["step_time"] for e in history)
        results[f"{label}_lengths"] = [e["completions/mean_length"] for e in history]
    return {
        "model": model if not model.startswith("/") else "tiny",
        "steps_timed": steps,
        "seconds_per_step_ot_off": results["ot_off"],
        "seconds_per_step_ot_on": results["ot_on"],
        "overhead": results["ot_on"] / results["ot_off"] - 1.0,
        "same_rollouts": results["ot_off_lengths"] == results["ot_on_lengths"],
        "target": {"overhead_at_most": 0.15},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", choices=["banded", "dense"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--max-completion-length", type=int, default=48)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke run that checks the benchmark runs")
    parser.add_argument("--kernel-only", action="store_true", help="skip the training-step benchmark")
    parser.add_argument("--out", default=str(Path(__file__).with_name("ot.json")), help="JSON file, or - for stdout")
    args = parser.parse_args()
    if args.kernel:
        result = run_kernel(
            args.kernel, args.batch, args.length, args.hidden, args.window, args.iterations, args.repeats
        )
        print(json.dumps(result))
        return
    if args.tiny:
        args.batch, args.length, args.hidden, args.window, args.iterations, args.repeats = 2, 64, 16, 4, 5, 1
        args.model, args.steps, args.max_completion_length = "tiny", 1, 16
    report = {
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "kernel": kernel_benchmark(args.batch, args.length, args.hidden, args.window, args.iterations, args.repeats),
    }
    if not args.kernel_only:
        report["training_step"] = step_benchmark(args.model, args.steps, args.max_completion_length)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out != "-":
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
