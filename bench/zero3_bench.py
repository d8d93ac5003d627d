"""Benchmark 4, ZeRO-3 on 2 CPU processes, tiny model: whole training step, vanilla vs guided.

Runs bench/step_bench.py's worker under `accelerate launch --config_file recipes/accelerate/zero3_cpu.yaml
--num_processes 2` (DeepSpeed ZeRO-3 over gloo, one thread per process): one launch, the vanilla trainer then the
guided one in the same two processes, each with its own warm-up steps. Every generation call of a sharded model
gathers the parameters, so this is where the number of gathers per rollout shows. Peak RSS is reported per trainer
but is cumulative (the guided trainer runs second in the same processes): the memory target belongs to bench 3.

    python bench/zero3_bench.py            # tiny 2-layer model, G=4, 64 completion tokens, 1 + 3 steps
    python bench/zero3_bench.py --tiny     # smoke run: 24 completion tokens, 1 + 1 steps
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from harness import (
    KINDS,
    ROOT,
    Settings,
    add_arguments,
    describe,
    emit,
    machine_info,
    progress,
    resolve_model,
    settings_from,
    target,
)
from step_bench import STEP_RATIO_AT_MOST, run_child, step_ratios

ACCELERATE_CONFIG = ROOT / "recipes" / "accelerate" / "zero3_cpu.yaml"
PROCESSES = 2


def zero3_settings(tiny: bool) -> Settings:
    """Always a tiny model; the full run gets longer completions and 3 timed steps."""
    settings = Settings.tiny()
    if not tiny:
        settings.repeats, settings.max_completion_length = 3, 64
        settings.prefix_min_tokens, settings.prefix_max_tokens, settings.max_guide_tokens = 8, 24, 8
    return settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(settings: Settings) -> dict[str, Any]:
    model_path = resolve_model(settings)
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    progress("zero3", f"{PROCESSES} ZeRO-3 processes, vanilla then guided, {settings.warmup}+{settings.repeats} steps")
    command = [accelerate, "launch", "--config_file", str(ACCELERATE_CONFIG), "--num_processes", str(PROCESSES)]
    command += ["--main_process_port", str(free_port()), str(Path(__file__).with_name("step_bench.py"))]
    command += ["--worker", ",".join(KINDS), "--model-path", model_path, "--bench-name", "zero3"]
    reports = run_child(command + ["--settings", json.dumps(vars(settings))], env=env)
    ratios = step_ratios(reports)
    return {
        "benchmark": "zero3",
        "machine": machine_info(),
        "settings": describe(settings, model_path),
        "accelerate_config": str(ACCELERATE_CONFIG.relative_to(ROOT)),
        "processes": PROCESSES,
        **reports,
        "ratios": ratios,
        "targets": {"zero3_step": target(ratios["step_seconds_ratio"], STEP_RATIO_AT_MOST)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args()
    emit(run(settings_from(args, zero3_settings(args.tiny))), args.out)


if __name__ == "__main__":
    main()
