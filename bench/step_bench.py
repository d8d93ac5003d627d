"""Benchmark 3, whole training step and peak memory: `trainer.train()` for warm-up + N steps, per trainer.

Each trainer trains in its own child process (this file with `--worker vanilla|guided`), so its peak memory is its
own: peak RSS is the child's `resource.getrusage(RUSAGE_SELF).ru_maxrss` (the kernel's high-water mark, model load
included), and `rss_before_train_mb` is the resident size once the trainer is built. A callback times each optimizer
step from `on_step_begin` to `on_step_end` (rollout, loss, backward, optimizer step; data loading and logging are
outside); the warm-up steps are dropped and the median reported. TRL's own `step_time` metric (its `training_step`,
without the optimizer step) is reported next to it. On a GPU the CUDA peak allocation is recorded too.

ZeRO-3 (`run_zero3`): the same worker under `accelerate launch --config_file recipes/accelerate/zero3_cpu.yaml
--num_processes 2` (DeepSpeed ZeRO-3 over gloo, one thread per process): one launch, the vanilla trainer then the
guided one in the same two processes, each with its own warm-up steps. Every generation call of a sharded model
gathers the parameters, so this is where the number of gathers per rollout shows. Peak RSS is reported per trainer
but is cumulative (the guided trainer runs second in the same processes): the memory target belongs to `run`.

Run through `python bench/run_all.py --only step,zero3`; this file's command line is the child process only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from harness import (
    KINDS,
    ROOT,
    Settings,
    add_arguments,
    build_trainer,
    describe,
    emit,
    machine_info,
    parse_json_output,
    peak_rss_mb,
    progress,
    ratio,
    resolve_model,
    rss_mb,
    settings_from,
    summary,
    synchronize,
    target,
)
from transformers import TrainerCallback

STEP_RATIO_AT_MOST = 0.8
MEMORY_RATIO_AT_MOST = 1.05


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step, from `on_step_begin` to `on_step_end`."""

    def __init__(self, label: str, total: int, verbose: bool):
        self.label, self.total, self.verbose = label, total, verbose
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        self.seconds.append(time.perf_counter() - self._start)
        if self.verbose:
            progress(self.label, f"step {len(self.seconds)}/{self.total}: {self.seconds[-1]:.2f} s")


def measure(kind: str, settings, model_path: str, bench: str) -> dict[str, Any] | None:
    """Train one trainer for warm-up + repeats steps in this process; the main process returns the report."""
    total = settings.warmup + settings.repeats
    timer = StepTimer(f"{bench} {kind}", total, verbose=int(os.environ.get("RANK", "0")) == 0)
    trainer = build_trainer(kind, settings, model_path, max_steps=total, callbacks=[timer])
    rss_before = rss_mb()
    trainer.train()
    accelerator = trainer.accelerator
    peaks = accelerator.gather(torch.tensor([peak_rss_mb(), rss_before], device=accelerator.device).unsqueeze(0))
    if not accelerator.is_main_process:
        return None
    logs = [entry for entry in trainer.state.log_history if "step_time" in entry]
    report = {
        "trainer": type(trainer).__name__,
        "processes": accelerator.num_processes,
        "deepspeed": trainer.is_deepspeed_enabled,
        "step_seconds": summary(timer.seconds[settings.warmup :]),
        "warmup_step_seconds": timer.seconds[: settings.warmup],
        "trl_step_time": summary([entry["step_time"] for entry in logs[settings.warmup :]]),
        "mean_completion_length": [entry.get("completions/mean_length") for entry in logs],
        "peak_rss_mb": float(peaks[:, 0].max()),  # the largest process when there are several
        "peak_rss_mb_per_process": peaks[:, 0].tolist(),
        "rss_before_train_mb": float(peaks[:, 1].max()),
        "memory_measure": "ru_maxrss of the training process (kernel high-water mark, model load included)",
    }
    timed_logs = logs[settings.warmup :]
    for key in sorted({key for entry in timed_logs for key in entry if key.startswith("guidance/")}):
        values = [entry[key] for entry in timed_logs if key in entry]
        report[key] = sum(values) / len(values)  # mean over the timed steps
    if torch.cuda.is_available():  # on a GPU the memory that matters is the device's
        report["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        report["memory_measure"] = "torch.cuda.max_memory_allocated of the main process"
    else:
        report["peak_memory_mb"] = report["peak_rss_mb"]
    return report


def worker(kinds: list[str], settings, model_path: str, bench: str) -> dict[str, Any] | None:
    """The child process: measure each trainer in turn (the step benchmark gives each child one trainer)."""
    reports = {}
    for kind in kinds:
        reports[kind] = measure(kind, settings, model_path, bench)
        gc.collect()
    return None if any(report is None for report in reports.values()) else reports


def run_child(command: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a benchmark child; its stderr streams through, its stdout must end with the JSON report."""
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).parent)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... exited with {result.returncode}")
    return parse_json_output(result.stdout)


def step_ratios(reports: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    vanilla, guided = reports["vanilla"], reports["guided"]
    return {
        "step_seconds_ratio": ratio(guided["step_seconds"]["median"], vanilla["step_seconds"]["median"]),
        "trl_step_time_ratio": ratio(guided["trl_step_time"]["median"], vanilla["trl_step_time"]["median"]),
    }


def run(settings) -> dict[str, Any]:
    model_path = resolve_model(settings)
    reports = {}
    for kind in KINDS:
        progress("step", f"{kind}: {settings.warmup} warm-up + {settings.repeats} timed steps in a child process")
        command = [sys.executable, __file__, "--worker", kind, "--model-path", model_path]
        reports.update(run_child(command + ["--settings", json.dumps(vars(settings))]))
    ratios = step_ratios(reports)
    ratios["peak_memory_ratio"] = ratio(reports["guided"]["peak_memory_mb"], reports["vanilla"]["peak_memory_mb"])
    return {
        "benchmark": "step",
        "machine": machine_info(),
        "settings": describe(settings, model_path),
        **reports,
        "ratios": ratios,
        "targets": {
            "step": target(ratios["step_seconds_ratio"], STEP_RATIO_AT_MOST),
            "memory": target(ratios["peak_memory_ratio"], MEMORY_RATIO_AT_MOST),
        },
    }


ACCELERATE_CONFIG = ROOT / "recipes" / "accelerate" / "zero3_cpu.yaml"
ZERO3_PROCESSES = 2


def zero3_settings(tiny: bool) -> Settings:
    """The embedded SmolLM2-135M, G=4, 64 completion tokens, 1 + 2 steps (tiny: the tiny model, 1 + 1 steps)."""
    if tiny:
        return Settings.tiny()
    return Settings(num_generations=4, groups=1, max_completion_length=64, repeats=2, threads=1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_zero3(settings: Settings) -> dict[str, Any]:
    model_path = resolve_model(settings)
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    progress("zero3", f"{ZERO3_PROCESSES} ZeRO-3 processes, vanilla then guided, {settings.warmup}+{settings.repeats}")
    command = [accelerate, "launch", "--config_file", str(ACCELERATE_CONFIG), "--num_processes", str(ZERO3_PROCESSES)]
    command += ["--main_process_port", str(free_port()), __file__]
    command += ["--worker", ",".join(KINDS), "--model-path", model_path, "--bench-name", "zero3"]
    reports = run_child(command + ["--settings", json.dumps(vars(settings))], env=env)
    ratios = step_ratios(reports)
    return {
        "benchmark": "zero3",
        "machine": machine_info(),
        "settings": describe(settings, model_path),
        "accelerate_config": str(ACCELERATE_CONFIG.relative_to(ROOT)),
        "processes": ZERO3_PROCESSES,
        **reports,
        "ratios": ratios,
        "targets": {"zero3_step": target(ratios["step_seconds_ratio"], STEP_RATIO_AT_MOST)},
    }


def main() -> None:
    """The child process: `--worker KINDS --model-path PATH --settings JSON` measures those trainers here."""
    parser = argparse.ArgumentParser(description="benchmark child process (see bench/run_all.py)")
    add_arguments(parser)
    parser.add_argument("--worker", required=True, help="comma-separated trainer kinds to measure here")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--bench-name", default="step")
    args = parser.parse_args()
    report = worker(args.worker.split(","), settings_from(args), args.model_path, args.bench_name)
    if report is not None:
        emit(report)


if __name__ == "__main__":
    main()
