"""Plain multi-process DDP for real on CPU: `accelerate launch`, 2 processes over gloo, no DeepSpeed, guided GRPO.

`accelerate launch --cpu --num_processes 2` starts a single process, so the launch uses `--multi_gpu`; the script's
`use_cpu=True` then makes accelerate pick the MULTI_CPU type and the gloo backend.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from ..ports import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "distributed" / "scripts" / "ddp_guided.py"


@pytest.mark.slow
def test_ddp_two_processes_guided_replicas_stay_in_sync(tiny_llama, tmp_path):
    out = tmp_path / "run"
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    command += [str(SCRIPT), tiny_llama, str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = {r["rank"]: r for r in (json.loads(f.read_text()) for f in sorted(out.glob("report-rank*.json")))}
    assert sorted(reports) == [0, 1]
    for report in reports.values():
        assert report["num_processes"] == 2 and report["backend"] == "gloo"
        assert report["wrapped"] == "DistributedDataParallel" and not report["deepspeed"]
        assert report["shared_prefix_forwards"] == 3, "the loss did not run through the shared-prefix forward"
        assert report["steps"] == 3 and len(report["losses"]) == 3
        assert all(math.isfinite(x) for x in report["losses"] + report["rewards"])
        assert all(length > 0 for length in report["guide_lengths"]), "the steps were not guided"
    first, second = reports[0], reports[1]
    assert first["losses"] == second["losses"] and first["rewards"] == second["rewards"]  # reduced across ranks
    assert first["prompts_digest"] != second["prompts_digest"], "both ranks sampled the same prompts"
    # Different data, one model: DDP's gradient all-reduce keeps the replicas bit-identical, and training moved them.
    assert first["checksum_after"] == second["checksum_after"]
    assert first["checksum_before"] == second["checksum_before"] != first["checksum_after"]

    checkpoint = out / "checkpoint-3"
    assert (checkpoint / "trainer_state.json").exists() and (checkpoint / "optimizer.pt").exists()
    spec = importlib.util.spec_from_file_location("ddp_guided", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.checksum(AutoModelForCausalLM.from_pretrained(checkpoint)) == first["checksum_after"]


@pytest.mark.slow
def test_ddp_rank_with_only_zero_advantage_rows_joins_every_collective(tiny_llama, tmp_path):
    """Rank 1 holds only zero-advantage rows: it still runs a forward and backward per micro-batch (no hang), and
    the savings leave the trained weights as they are without them (the same steps, savings off)."""
    out = tmp_path / "run"
    out.mkdir()
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    command += [str(ROOT / "tests" / "distributed" / "scripts" / "ddp_zero_advantage.py"), tiny_llama, str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = {r["rank"]: r for r in (json.loads(f.read_text()) for f in sorted(out.glob("report-rank*.json")))}
    assert_zero_advantage_reports(reports)


def assert_zero_advantage_reports(reports: dict) -> None:
    """What `scripts/ddp_zero_advantage.py` reports when the savings are exact and every rank joined every step."""
    assert sorted(reports) == [0, 1] and reports[0]["num_processes"] == 2
    first, second = reports[0]["rows"], reports[1]["rows"]
    assert len(first) == len(second) == 4 and all(trains == 0 for trains, _ in second)
    # Both ranks ran as many rows as the busier one needed (at least one): equal shapes in every collective.
    assert [ran for _, ran in first] == [ran for _, ran in second] == [max(trains, 1) for trains, _ in first]
    assert any(ran < 4 for _, ran in first), "no micro-batch left a row out: the test saw no saving"
    assert reports[0]["checksum"] == reports[1]["checksum"], "the replicas diverged"
    for report in reports.values():
        assert report["max_difference"] < 1e-5, "the savings changed the trained weights"
