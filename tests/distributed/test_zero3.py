"""DeepSpeed ZeRO-3 for real on CPU: `accelerate launch`, 2 processes (gloo), guided GRPO with OT on, entropy branch
points, two prefixes per group, the `low_prob` scope and TRL's high-entropy mask."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from ..ports import free_port
from .test_ddp import assert_zero_advantage_reports

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_zero3_two_processes_guided_with_ot_entropy_branches_and_two_prefixes(tiny_llama, tmp_path):
    out = tmp_path / "run"
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / "zero3_cpu.yaml")]
    command += [
        "--main_process_port",
        str(free_port()),
        str(ROOT / "tests" / "distributed" / "scripts" / "zero3_guided_ot.py"),
    ]
    command += [tiny_llama, str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads(path.read_text()) for path in sorted(out.glob("report-rank*.json"))]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for report in reports:
        assert report["deepspeed"] and report["sharded"], "parameters were not partitioned by ZeRO-3"
        assert report["reference"] == "DeepSpeedEngine"  # the OT reference model is sharded too
        assert report["steps"] == 3 and len(report["losses"]) == 3
        assert all(math.isfinite(x) for x in report["losses"] + report["ot_costs"])
        assert all(length > 0 for length in report["guide_lengths"]), "the steps were not guided"
        assert report["num_prefixes"] == [2, 2, 2]
        assert all(b >= m > 0 for b, m in zip(report["branch_entropies"], report["mean_entropies"], strict=True))
        # One rollout per step (steps_per_generation = 1), each gathering the sharded parameters once for its three
        # phases and the entropy scoring forward, not once per phase.
        assert report["gathers_per_rollout"] == [1, 1, 1], report["gathers_per_rollout"]
        # low_prob at 0.05 under the top-50 % entropy mask: some tokens, all of them unlikely when sampled.
        assert all(0 < f < 1 for f in report["trained_fractions"]), report["trained_fractions"]
        assert all(p < 0.05 for p in report["trained_probs"]), report["trained_probs"]
    assert reports[0]["losses"] == reports[1]["losses"]  # logged losses are reduced across ranks
    checkpoint = out / "checkpoint-3"
    assert (checkpoint / "trainer_state.json").exists()
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert model.num_parameters() == reference.num_parameters()


@pytest.mark.slow
def test_zero3_rank_with_only_zero_advantage_rows_joins_every_collective(tiny_llama, tmp_path):
    """The DDP test's script (tests/distributed/test_ddp.py) under ZeRO-3: rank 1 holds only zero-advantage rows,
    both ranks run equal row counts through every sharded layer, and the savings leave the weights as they are."""
    out = tmp_path / "run"
    out.mkdir()
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / "zero3_cpu.yaml")]
    command += ["--main_process_port", str(free_port())]
    command += [str(ROOT / "tests" / "distributed" / "scripts" / "ddp_zero_advantage.py"), tiny_llama, str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = {r["rank"]: r for r in (json.loads(f.read_text()) for f in sorted(out.glob("report-rank*.json")))}
    assert_zero_advantage_reports(reports)
