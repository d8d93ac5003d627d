"""Where a training step's time goes, vanilla vs guided: cProfile (Python functions) and torch.profiler (operators).

Both trainers train warm-up + 1 steps in this process (same settings as the other benchmarks); only the last step is
profiled. Prints one JSON object: per trainer, the step time and the top entries by cumulative time (cProfile,
restricted to TRL / trl_guided / transformers / torch.autograd frames so the list names the phases) and by self CPU
time (torch operators). A tool for optimising, not a measurement: it is not part of the report.

    python bench/run_all.py --profile                  # embedded SmolLM2-135M, G=8, 256 completion tokens
    python bench/run_all.py --profile --tiny --top 15
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from typing import Any

import torch
from harness import build_trainer, progress
from transformers import TrainerCallback

INTERESTING = ("trl/", "trl_guided/", "transformers/generation", "transformers/trainer.py", "torch/autograd", "bench/")


class ProfileLastStep(TrainerCallback):
    """Profiles the optimizer step number `step` (1-based), from `on_step_begin` to `on_step_end`."""

    def __init__(self, step: int):
        self.step, self.count, self.seconds = step, 0, 0.0
        self.python = cProfile.Profile()
        self.torch = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.count += 1
        if self.count == self.step:
            self.torch.start()
            self.python.enable()
            self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.count == self.step:
            self.seconds = time.perf_counter() - self._start
            self.python.disable()
            self.torch.stop()


def python_top(profile: cProfile.Profile, top: int, step_seconds: float) -> list[dict[str, Any]]:
    stats = pstats.Stats(profile, stream=io.StringIO())
    rows = []
    for (path, line, name), (_, calls, _, cumulative, _) in stats.stats.items():
        if any(part in path for part in INTERESTING):
            short = path.split("site-packages/")[-1].split("/work/main/")[-1]
            rows.append({"function": f"{short}:{line}({name})", "calls": calls, "cumulative_seconds": cumulative})
    rows.sort(key=lambda row: -row["cumulative_seconds"])
    for row in rows:
        row["share_of_step"] = row["cumulative_seconds"] / step_seconds if step_seconds else None
    return rows[:top]


def torch_top(profiler, top: int) -> list[dict[str, Any]]:
    events = sorted(profiler.key_averages(), key=lambda event: -event.self_cpu_time_total)
    return [
        {"op": event.key, "calls": event.count, "self_cpu_seconds": event.self_cpu_time_total / 1e6}
        for event in events[:top]
    ]


def profile(kind: str, settings, model_path: str, top: int) -> dict[str, Any]:
    step = settings.warmup + 1
    callback = ProfileLastStep(step)
    trainer = build_trainer(kind, settings, model_path, max_steps=step, callbacks=[callback])
    progress("profile", f"{kind}: {settings.warmup} warm-up step(s), then 1 profiled step")
    trainer.train()
    progress("profile", f"{kind}: profiled step {callback.seconds:.2f} s")
    return {
        "step_seconds": callback.seconds,
        "python_cumulative": python_top(callback.python, top, callback.seconds),
        "torch_self_cpu": torch_top(callback.torch, top),
    }
