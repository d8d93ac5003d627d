"""Benchmarks must keep running: a tiny-size smoke run that checks they emit valid JSON (not the timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ot_benchmark_smoke():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ot_bench.py"), "--tiny", "--out", "-"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout[result.stdout.index("{\n") :])
    kernel, step = report["kernel"], report["training_step"]
    assert kernel["max_relative_difference"] < 1e-3  # the dense reference computes the same OT
    for key in ("speedup", "memory_ratio", "banded_seconds", "dense_seconds"):
        assert kernel[key] > 0
    assert step["seconds_per_step_ot_off"] > 0 and step["seconds_per_step_ot_on"] > 0
