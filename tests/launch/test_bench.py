"""Benchmarks must keep running: tiny-size smoke runs that check they emit valid JSON (not the timings)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _positive(value) -> bool:
    return isinstance(value, int | float) and value > 0


@pytest.mark.slow
def test_run_all_tiny_smoke(tmp_path):
    """`bench/run_all.py` at tiny size: every benchmark runs and reports guided vs vanilla."""
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
    assert set(report["benchmarks"]) == {"rollout", "loss", "step", "zero3", "ot", "branching"}
    # The OT overhead is a difference of two timings (on - off) / off: at tiny size it can be negative by noise.
    ratios = dict(report["ratios"])
    overhead = ratios.pop("ot_overhead")
    assert isinstance(overhead, float) and math.isfinite(overhead)
    assert all(_positive(value) for value in ratios.values() if value is not None)
    for name in ("rollout_wall", "rollout_generated_tokens", "loss_backward", "step", "peak_memory", "zero3_step"):
        assert _positive(report["ratios"][name]), name
    for name in ("rollout_wall", "loss_backward", "step", "memory", "zero3_step", "ot_overhead"):
        assert set(report["targets"][name]) == {"value", "at_most", "pass"}
        assert isinstance(report["targets"][name]["pass"], bool)
    assert all(_positive(seconds) for seconds in report["durations_seconds"].values())

    bench = report["benchmarks"]
    # No branch point runs a scoring forward on the transformers backend: entropy's signals come off generation.
    assert bench["branching"]["entropy"]["scoring_seconds"]["median"] == 0
    assert bench["branching"]["punctuation"]["scoring_seconds"]["median"] == 0
    assert _positive(report["ratios"]["entropy_branch_rollout"])
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
    kernel, step = bench["ot"]["kernel"], bench["ot"]["training_step"]
    assert kernel["max_relative_difference"] < 1e-3  # the dense reference computes the same OT
    for key in ("speedup", "memory_ratio", "banded_seconds", "dense_seconds"):
        assert kernel[key] > 0
    assert step["seconds_per_step_ot_off"] > 0 and step["seconds_per_step_ot_on"] > 0 and step["same_rollouts"]

    # docs/performance.md takes its table from `run_all.py --markdown`.
    command = [sys.executable, str(ROOT / "bench" / "run_all.py"), "--markdown", str(out)]
    rendered = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    table_lines = [line for line in rendered.splitlines() if line.startswith("| ")]
    assert len(table_lines) == 1 + 8 and "n/a" not in rendered and "Errors" not in rendered  # header + 8 rows

    # --update re-runs one benchmark and keeps the others.
    command = [sys.executable, str(ROOT / "bench" / "run_all.py"), "--tiny", "--only", "loss", "--update"]
    result = subprocess.run(command + ["--out", str(out)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    updated = json.loads(out.read_text())
    assert updated["updated"]["benchmarks"] == ["loss"]
    assert updated["benchmarks"]["zero3"] == bench["zero3"] and updated["benchmarks"]["loss"] != bench["loss"]
    assert set(updated["ratios"]) == set(report["ratios"])


@pytest.mark.slow
def test_decode_cost_tiny_times_prefill_and_decode_by_rows(tmp_path):
    """`bench/decode_cost.py --tiny`: a prefill and a decode step timed for every row count, as JSON."""
    out = tmp_path / "decode_cost.json"
    command = [sys.executable, str(ROOT / "bench" / "decode_cost.py"), "--tiny", "--repeats", "1", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert list(report["prefill_seconds_by_rows"]) == ["1", "2", "4", "8"]
    assert list(report["decode_step_seconds_by_rows"]) == ["1", "2", "4", "8", "12", "16"]
    timings = [*report["prefill_seconds_by_rows"].values(), *report["decode_step_seconds_by_rows"].values()]
    assert all(_positive(seconds) for seconds in timings) and report["prompt_tokens"] > 0


def test_step_cost_bench_tiny_interleaves_four_configurations_with_phases(tmp_path):
    """`bench/step_cost_bench.py --tiny`: TRL plain and the three plugin configurations each time every step and its
    phases, the savings are logged, and the ratios to TRL are recorded next to the targets."""
    out = tmp_path / "step_cost.json"
    command = [sys.executable, str(ROOT / "bench" / "step_cost_bench.py"), "--tiny", "--repeats", "1"]
    result = subprocess.run(
        command + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)
    assert json.loads(out.read_text()) == report and report["errors"] == {}
    configurations = report["configurations"]
    assert list(configurations) == ["trl_plain", "guidance_off", "default", "treerl"]
    for name, measured in configurations.items():
        assert len(measured["steps"]) == 2 and _positive(measured["step_seconds"]["median"])
        phases = measured["phase_medians_seconds"]
        assert _positive(phases["generation"]) and _positive(phases["loss"]) and phases["optimizer"] >= 0
        assert phases["generation"] + phases["loss"] <= phases["step"] * 1.01
        assert ("savings/skipped_rows" in measured) == (name != "trl_plain")
    # low_prob reads its log-probs off generation: no scoring forward on the transformers backend.
    assert configurations["treerl"]["phase_medians_seconds"]["branch_scoring"] == 0
    assert configurations["default"]["phase_medians_seconds"]["branch_scoring"] == 0  # punctuation does not
    assert set(report["ratios_to_trl_plain"]) == {"guidance_off", "default", "treerl"}
    assert all(_positive(value) for value in report["ratios_to_trl_plain"].values())
    assert set(report["targets"]) == {"guidance_off", "default", "treerl"}


def test_compare_runs_reads_two_training_runs(tmp_path):
    """bench/compare_runs.py (the GPU plan's summary) on two synthetic run directories."""
    for kind, step_time, memory, generated in (("guided", 6.0, 18000, 500), ("vanilla", 10.0, 20000, 1000)):
        run = tmp_path / kind
        run.mkdir()
        logs = [{"step": i, "step_time": step_time + (i == 0) * 50, "completions/mean_length": 300} for i in range(8)]
        (run / "trainer_state.json").write_text(json.dumps({"log_history": logs}))
        (run / "nvidia-smi.csv").write_text(f"0, 70000\n1, {memory - 100}\n1, {memory}\n")
        metrics = f'vllm:generation_tokens_total{{model_name="m"}} {generated}\nvllm:prefix_cache_queries_total 10\n'
        (run / "vllm-metrics.txt").write_text(metrics + "vllm:prefix_cache_hits_total 4\n")
    command = [sys.executable, str(ROOT / "bench" / "compare_runs.py"), "--guided", str(tmp_path / "guided")]
    command += ["--vanilla", str(tmp_path / "vanilla"), "--skip", "1", "--exclude-gpus", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ratios"] == {"step_time": 0.6, "peak_gpu_memory": 0.9, "vllm_generation_tokens": 0.5}
    assert report["guided"]["steps"] == 7 and report["guided"]["vllm"]["prefix_cache_hit_rate"] == 0.4


@pytest.mark.slow
def test_learning_study_tiny_end_to_end_and_resume(tmp_path):
    """`bench/learning.py --tiny`: the learning rate of an arm is tuned on the validation split (an arm that fixes its
    rate is not), two runs go side by side, every run trains and evaluates (snapshots on a test subset), the JSON and
    the PNG are written under the study's name, a rerun skips the finished runs, and the per-arm accuracies in the
    JSON are the ones the per-run records give."""
    from trl_guided.evaluate import read_records

    arms = tmp_path / "arms.yaml"
    arms.write_text("plain: {guidance: false}\nguided: {guidance: true, learning_rate: 2.0e-5}\n")
    command = [sys.executable, str(ROOT / "bench" / "learning.py"), "--tiny", "--out", str(tmp_path)]
    command += ["--name", "tiny_study", "--arms-file", str(arms), "--seeds", "0", "1", "--cores", ""]
    command += ["--budget-minutes", "0.04", "--eval-every-minutes", "0.01", "--curve-problems", "4"]
    command += ["--lr-grid", "1e-5", "4e-5", "--tune-minutes", "0.02", "--validation-problems", "8", "--parallel", "2"]
    command += ["--quality-problems", "5"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert first.returncode == 0, first.stderr[-4000:]
    report = json.loads((tmp_path / "tiny_study.json").read_text())
    assert not (tmp_path / "learning.json").exists()
    assert set(report["arms"]) == {"plain", "guided"} and report["seeds_complete"] == [0, 1]
    assert set(report["runs"]) == {"plain-seed0", "guided-seed0", "plain-seed1", "guided-seed1"}
    assert set(report["pairs"]) == {"plain - guided"}
    assert report["problems"] == 8 and report["study_seconds"] > 0

    # Only plain is tuned; its test runs use the chosen rate, guided its own.
    grid = report["lr_grid"]
    assert set(grid) == {"plain"} and grid["plain"]["rates"] == [1e-5, 4e-5] and grid["plain"]["complete"]
    assert all(score is not None and 0 <= score <= 1 for score in grid["plain"]["scores"])
    assert report["validation"]["problems"] == 8
    for run in report["runs"].values():
        assert run["learning_rate"] == (grid["plain"]["chosen"] if run["arm"] == "plain" else 2e-5)
        assert run["concurrent_with"] and run["concurrent_with"][0].endswith(f"seed{run['seed']}")  # same seed
        assert run["steps"] >= 1 and run["tokens"] > 0 and len(run["load_average"]["start"]) == 3
        assert run["train_seconds"] > 0 and run["eval_seconds"] > 0
        curve = report["curves"][f"{run['arm']}-seed{run['seed']}"]
        assert len(curve) == run["steps"]
        snapshots = [e for e in run["evals"] if e.get("subset")]
        assert len(report["learning_curves"][f"{run['arm']}-seed{run['seed']}"]) == len(snapshots) + 2
        assert all(e["problems"] == 4 for e in snapshots)
    assert any(e.get("subset") for run in report["runs"].values() for e in run["evals"])
    time = report["machine_time"]
    assert set(time["wall_minutes_by_phase"]) == {"before", "tune", "final"}
    assert time["core_minutes"]["tune"]["training"] > 0 and time["core_minutes"]["final"]["evaluation"] > 0
    assert report["base_median_completion_tokens"] > 0
    for arm, entry in report["arms"].items():
        assert entry["overrides"]["guidance"] == (arm != "plain")
        low, high = entry["gain_ci95"]
        assert low <= entry["gain"] <= high
        for seed, after in zip(entry["seeds"], entry["accuracy_after"], strict=True):
            records = read_records(tmp_path / "tiny_study_runs" / f"{arm}-seed{seed}" / "eval.jsonl")
            assert len(records) == 8 and "prompt" not in records[0]
            assert after == pytest.approx(sum(r["rewards"]["arithmetic_accuracy"] for r in records) / 8)
    assert "difference_to_plain_ci95" in report["arms"]["guided"]
    # Fluency on the first 5 test problems of each run; the starting model's on the same problems.
    before_records = read_records(tmp_path / "tiny_study_runs" / "before" / "eval.jsonl")
    order = list(dict.fromkeys(r["problem_id"] for r in before_records))
    common = set(order[:5])
    for name in report["runs"]:
        records = read_records(tmp_path / "tiny_study_runs" / name / "eval.jsonl")
        scored = {r["problem_id"] for r in records if r["nll"]}
        assert scored and scored <= set(order[:5])
        common &= scored
    first = [r for r in before_records if r["problem_id"] in common]
    for entry in report["arms"].values():
        assert entry["nll_per_token_before"] == pytest.approx(np.mean([r["nll"] / r["nll_tokens"] for r in first]))
        assert all(value > 0 for value in entry["nll_per_token_after"])
    _assert_png_not_blank(tmp_path / "tiny_study.png")

    run_json = tmp_path / "tiny_study_runs" / "guided-seed1" / "run.json"
    stamp = run_json.stat().st_mtime_ns
    again = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stderr.count("finished earlier, skipped") == 7  # the starting model, two tuning runs, four runs
    assert run_json.stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "tiny_study.json").read_text())["arms"] == report["arms"]

    markdown = [sys.executable, str(ROOT / "bench" / "learning.py"), "--markdown", "--out", str(tmp_path)]
    table = subprocess.run(markdown + ["--name", "tiny_study"], capture_output=True, text=True, timeout=120).stdout
    assert "| plain | " in table and "| arm | 1e-05 | 4e-05 |" in table and "**" in table


# A stand-in for vLLM in the study's evaluation children: logs each engine start and weight reload, answers every
# prompt with an empty completion (EOS). The study's flow is under test here; the real engine's reload is checked in
# tests/distributed/test_eval_vllm.py.
FAKE_VLLM = """
import os
import types


def _log(line):
    with open(os.environ["FAKE_VLLM_LOG"], "a") as handle:
        handle.write(f"{os.getpid()} {line}\\n")


class LLM:
    def __init__(self, **kwargs):
        _log(f"start {kwargs['model']}")

    def collective_rpc(self, method, kwargs=None):
        if callable(method):  # the CPU repack after a reload: a function run in the worker
            return
        assert method == "reload_weights" and os.path.isfile(os.path.join(kwargs["weights_path"], "config.json"))
        _log(f"reload {kwargs['weights_path']}")

    def reset_prefix_cache(self):
        pass

    def generate(self, prompts, params, use_tqdm=False):
        sample = types.SimpleNamespace(token_ids=[], finish_reason="stop")
        return [types.SimpleNamespace(outputs=[sample] * p.n) for p in params]


def SamplingParams(**kwargs):
    return types.SimpleNamespace(**kwargs)
"""

# The evaluation children's interpreter: this one, with the fake vLLM imported once TRL has been (TRL takes a
# `vllm` it finds at import for the real one); FAKE_VLLM_FAIL=1 makes an evaluation round fail (a crashed round).
FAKE_EVAL_PYTHON = """#!/usr/bin/env bash
if [ "$2" = evaluate-runs ] && [ -n "${{FAKE_VLLM_FAIL:-}}" ]; then echo "round failed on purpose" >&2; exit 3; fi
exec {python} -c 'import runpy, sys
import trl_guided.evaluate
import trl_guided.train  # imports the GRPOTrainer of TRL, which takes the vllm it finds (trl_guided loads it lazily)
sys.path.insert(0, "{fake}")
import vllm
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")' "$@"
"""


@pytest.mark.slow
def test_learning_study_with_vllm_evaluation_rounds_resumes_a_failed_round_without_training_again(tmp_path):
    """`--eval-backend vllm`: the runs of a phase train first (models wait in the run folder), then one evaluation
    child per core scores them with one engine, reloading weights for every further model; a failed round leaves
    the trained runs waiting, and the rerun evaluates them without training them again."""
    fake = tmp_path / "fake"
    (fake / "vllm").mkdir(parents=True)
    (fake / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    python = tmp_path / "eval-python"
    python.write_text(FAKE_EVAL_PYTHON.format(fake=fake, python=sys.executable))
    python.chmod(0o755)
    arms = tmp_path / "arms.yaml"
    arms.write_text("plain: {guidance: false}\nguided: {guidance: true}\n")
    command = [sys.executable, str(ROOT / "bench" / "learning.py"), "--tiny", "--out", str(tmp_path / "out")]
    # 3 s of training: room for a snapshot (every 0.6 s) after the first step also when both runs share one core.
    command += ["--arms-file", str(arms), "--seeds", "0", "--cores", "", "--budget-minutes", "0.05"]
    command += ["--eval-every-minutes", "0.01", "--curve-problems", "4", "--parallel", "2"]
    command += ["--eval-backend", "vllm", "--eval-python", str(python)]
    log = tmp_path / "vllm.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FAKE_VLLM_LOG": str(log)}
    runs = tmp_path / "out" / "learning_runs"
    trained = [runs / "plain-seed0", runs / "guided-seed0"]

    failed = subprocess.run(command, capture_output=True, text=True, timeout=900, env={**env, "FAKE_VLLM_FAIL": "1"})
    assert failed.returncode != 0 and "an evaluation round failed" in failed.stderr, failed.stderr[-3000:]
    for run in trained:  # trained, waiting for their evaluations
        assert (run / "trained.json").exists() and (run / "models" / "final" / "config.json").exists()
        assert not (run / "run.json").exists()
    assert json.loads((runs / "before" / "run.json").read_text())["settings"]["backend"] == "vllm"

    again = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "final/plain-seed0: trained earlier, waits for its evaluation" in again.stderr
    assert not re.search(r"\d+/\d+ final/plain-seed0", again.stderr)  # not trained again
    assert "evaluating 2 final runs (2 vLLM engines)" in again.stderr
    for run in trained:
        record = json.loads((run / "run.json").read_text())
        assert not (run / "trained.json").exists() and not (run / "models").exists()
        assert record["evals"][-1]["step"] == record["steps"] >= 1 and record["eval_seconds"] > 0
        assert record["evals"][-1]["problems"] == 8  # the test problems of --tiny
        snapshots = [e for e in record["evals"] if e.get("subset")]
        assert snapshots and all(e["problems"] == 4 for e in snapshots)
    phases = [json.loads(line)["phase"] for line in (runs / "ledger.jsonl").read_text().splitlines()]
    assert phases == ["before", "final", "final evaluation"]
    report = json.loads((tmp_path / "out" / "learning.json").read_text())
    assert report["machine_time"]["wall_minutes_by_phase"]["final evaluation"] > 0

    # One engine per evaluation child (the snapshots and the final model of a run), further models reloaded into it.
    lines = [line.split(" ", 2) for line in log.read_text().splitlines()]
    by_process = {}
    for pid, action, path in lines:
        by_process.setdefault(pid, []).append((action, path))
    for actions in by_process.values():
        assert [action for action, _ in actions].count("start") == 1 and actions[0][0] == "start"
    evaluated = {path for _, _, path in lines}
    for run in trained:
        assert str(run / "models" / "final") in evaluated and str(run / "models" / "snapshot-1") in evaluated
    assert sum(action == "reload" for _, action, _ in lines) >= 2

    # A round killed after a run's record was written, before its models were deleted: the next call removes them.
    (trained[0] / "models" / "final").mkdir(parents=True)
    (trained[0] / "trained.json").write_text("{}")
    third = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert third.returncode == 0 and "final/plain-seed0: finished earlier, skipped" in third.stderr, third.stderr
    assert not (trained[0] / "models").exists() and not (trained[0] / "trained.json").exists()


def _assert_png_not_blank(path: Path) -> None:
    """The figure has the curves of both arms: pixels in the plain (grey) and the guided (blue) colour."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    for colour in ((0x44, 0x44, 0x44), (0x1F, 0x77, 0xB4)):
        assert (np.abs(pixels - colour).sum(axis=-1) < 30).sum() > 200, f"no curve drawn in colour {colour}"
