"""Faults that lose nothing: `kill -9` of `trl-guided train` mid-step and mid-save, then `resume_from_checkpoint: true`
gives the same steps and the same final weights as a run that was never killed; SIGTERM mid-step with
`enable_jit_checkpoint` (one process, and two DDP processes signalled at different times) saves the step it was in and
loses nothing at all."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STEPS = 5
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _recipe(tmp_path: Path, model: str, output_dir: Path) -> str:
    recipe = {
        "model_name_or_path": model,
        "task": "length",
        "reward_funcs": ["smooth_length"],
        "length_target": 40,
        "num_generations": 4,
        "per_device_train_batch_size": 4,
        "max_completion_length": 16,
        "prefix_min_tokens": 2,
        "prefix_max_tokens": 6,
        "max_guide_tokens": 4,
        "punctuation": ["e", "a", "o", "t", "s"],
        "learning_rate": 1.0e-2,
        "max_steps": STEPS,
        "save_strategy": "steps",
        "save_steps": 1,
        "logging_steps": 1,
        "seed": 3,
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "log_completions": False,
        "output_dir": str(output_dir),
    }
    path = tmp_path / f"{output_dir.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _train(recipe: str, *extra: str) -> None:
    command = [sys.executable, "-m", "trl_guided.cli", "train", "--config", recipe, *extra]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _kill_at(recipe: str, fault: str, marker: Path) -> None:
    command = [sys.executable, str(HERE / "fault_cli.py"), str(marker), fault, "--", "train", "--config", recipe]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert process.poll() is None, f"the run ended before the fault point: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "the fault point was never reached"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def _steps(output_dir: Path) -> list[dict]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    watched = ("step", "loss", "reward", "grad_norm")
    return [{k: v for k, v in e.items() if k in watched or k.startswith("guidance/")} for e in history if "loss" in e]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama):
    """The run that was never killed."""
    tmp_path = tmp_path_factory.mktemp("reference")
    output_dir = tmp_path / "never-killed"
    _train(_recipe(tmp_path, tiny_llama, output_dir))
    return _steps(output_dir), load_file(output_dir / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault, resumed_from",
    [
        ("step:3", "checkpoint-2"),  # killed during step 3: steps 1-2 are kept
        ("save:3", "checkpoint-2"),  # killed while checkpoint-3 was written: it is incomplete and skipped
    ],
)
def test_kill_9_loses_nothing_before_the_last_complete_checkpoint(
    tmp_path, tiny_llama, reference, fault, resumed_from
):
    output_dir = tmp_path / "killed"
    recipe = _recipe(tmp_path, tiny_llama, output_dir)
    _kill_at(recipe, fault, tmp_path / "fault-reached")
    checkpoints = sorted(p.name for p in output_dir.glob("checkpoint-*"))
    if fault.startswith("save"):
        assert "checkpoint-3" in checkpoints and not (output_dir / "checkpoint-3" / "trainer_state.json").exists()
    else:
        assert checkpoints[-1] == resumed_from
    _train(recipe, "--resume_from_checkpoint", "true")
    steps, weights = _steps(output_dir), load_file(output_dir / "model.safetensors")
    reference_steps, reference_weights = reference
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert steps == reference_steps
    assert weights.keys() == reference_weights.keys()
    assert all((weights[name] == reference_weights[name]).all() for name in weights)


# ------------------------------------------------------------------------------------ SIGTERM (enable_jit_checkpoint)


def _command(processes: int, *args: str) -> list[str]:
    """`python ARGS` in one process, or under `accelerate launch` in `processes` CPU DDP processes (gloo)."""
    if processes == 1:
        return [sys.executable, *args]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes"]
    accelerate += [str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*accelerate, "--main_process_port", str(port), *args]


def _pid_at(marker: Path, process: subprocess.Popen, log: Path) -> int:
    deadline = time.monotonic() + 300
    while not (marker.exists() and marker.read_text().strip()):
        assert process.poll() is None, f"the run ended before {marker.name}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{marker.name} was never reached"
        time.sleep(0.05)
    return int(marker.read_text())


def _stop_with_sigterm(recipe: str, marker: Path, processes: int) -> tuple[int, str]:
    """Run with SIGTERM sent during step 3 to the main process, and to every process while checkpoint-3 is written
    (a second signal for the main process; the only one for the others, after they stopped for it). (status, stdout)"""
    flags = ["--enable_jit_checkpoint", "true", "--save_steps", "100"]  # the stop's checkpoint is the only one
    command = _command(processes, str(HERE / "fault_cli.py"), str(marker), "term:3", "--", "train", "--config", recipe)
    out, err = marker.with_name("stdout.txt"), marker.with_name("stderr.txt")
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen([*command, *flags], env=ENV, stdout=stdout, stderr=stderr)
        try:
            os.kill(_pid_at(marker.with_name(f"{marker.name}.step.0"), process, err), signal.SIGTERM)
            for rank in range(processes):
                os.kill(_pid_at(marker.with_name(f"{marker.name}.save.{rank}"), process, err), signal.SIGTERM)
            process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode is not None, err.read_text()[-3000:]
    return process.returncode, out.read_text()


def _launch(processes: int, recipe: str, *extra: str) -> None:
    command = _command(processes, "-m", "trl_guided.cli", "train", "--config", recipe, *extra)
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, tiny_llama):
    """The two-process run that was never stopped."""
    tmp_path = tmp_path_factory.mktemp("ddp-reference")
    output_dir = tmp_path / "never-stopped"
    _launch(2, _recipe(tmp_path, tiny_llama, output_dir))
    return _steps(output_dir), load_file(output_dir / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_mid_step_saves_that_step_and_the_resumed_run_is_the_same_run(
    tmp_path, tiny_llama, request, processes
):
    """SIGTERM during step 3 (after its rollout): step 3 finishes, is logged and saved as checkpoint-3 (a second
    signal during that save changes nothing), the run exits 143 with one line; resuming gives every step and the final
    weights of a run never stopped, run the same way. With two processes only rank 0 is signalled in the step: rank 1
    stops at the same step through the agreement, and gets its own signal while saving."""
    from trl_guided.checkpoints import INCOMPLETE_MARKER, is_complete

    reference = request.getfixturevalue("reference" if processes == 1 else "ddp_reference")
    output_dir = tmp_path / "stopped"
    recipe = _recipe(tmp_path, tiny_llama, output_dir)
    status, stdout = _stop_with_sigterm(recipe, tmp_path / "signal", processes)
    checkpoint = output_dir / "checkpoint-3"
    if processes == 1:
        assert status == 143  # accelerate's launcher reports its workers' failure as 1
    assert status != 0
    assert f"Stopped by a signal after step 3; saved {checkpoint}. Resume:" in stdout
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-3"]
    assert is_complete(checkpoint) and not (checkpoint / INCOMPLETE_MARKER).exists()
    assert not (output_dir / "model.safetensors").exists(), "a stopped run must not save itself as finished"
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3], "step 3 was not logged before its save"

    _launch(processes, recipe, "--resume_from_checkpoint", "true")
    steps, weights = _steps(output_dir), load_file(output_dir / "model.safetensors")
    reference_steps, reference_weights = reference
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert steps == reference_steps
    assert weights.keys() == reference_weights.keys()
    assert all((weights[name] == reference_weights[name]).all() for name in weights)
