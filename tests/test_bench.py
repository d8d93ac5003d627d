"""Benchmarks must keep running: tiny-size smoke runs that check they emit valid JSON (not the timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def _positive(value) -> bool:
    return isinstance(value, int | float) and value > 0


@pytest.mark.slow
def test_run_all_tiny_smoke(tmp_path):
    """The single command of issue 7 at tiny size: every benchmark runs and reports guided vs vanilla."""
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)  # stdout carries the JSON report and nothing else
    assert json.loads(out.read_text()) == report
    assert report["errors"] == {}
    assert report["mode"] == "tiny"
    for key in ("cpu_count", "cpu_model", "torch", "trl", "transformers"):
        assert report["machine"][key]
    assert set(report["benchmarks"]) == {"rollout", "loss", "step", "zero3", "ot"}
    assert all(_positive(value) for value in report["ratios"].values() if value is not None)
    for name in ("rollout_wall", "rollout_generated_tokens", "loss_backward", "step", "peak_memory", "zero3_step"):
        assert _positive(report["ratios"][name]), name
    for name in ("rollout_wall", "loss_backward", "step", "memory", "zero3_step", "ot_overhead"):
        assert set(report["targets"][name]) == {"value", "at_most", "pass"}
        assert isinstance(report["targets"][name]["pass"], bool)
    assert all(_positive(seconds) for seconds in report["durations_seconds"].values())

    bench = report["benchmarks"]
    for kind in ("vanilla", "guided"):
        rollout = bench["rollout"][kind]
        for key in ("wall_seconds", "generated_tokens", "decode_steps"):
            assert _positive(rollout[key]["median"]) and len(rollout[key]["repeats"]) == 1
        assert _positive(bench["loss"][kind]["seconds"]["median"])
        assert bench["loss"][kind]["batch"]["trained_tokens"] > 0
        for name in ("step", "zero3"):
            assert _positive(bench[name][kind]["step_seconds"]["median"])
            assert _positive(bench[name][kind]["peak_rss_mb"])
        assert bench["zero3"][kind]["processes"] == 2 and bench["zero3"][kind]["deepspeed"]
    guided = bench["rollout"]["guided"]["repeats"][0]
    assert guided["discarded_tokens"] >= 0 and guided["guidance_tokens"] > 0
    # The trained tokens of the guidance scope are a subset of the completion tokens.
    assert bench["loss"]["guided"]["batch"]["trained_tokens"] <= bench["loss"]["vanilla"]["batch"]["completion_tokens"]
    assert bench["ot"]["training_step"]["seconds_per_step_ot_on"] > 0
