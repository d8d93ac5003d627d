"""launch_train.sh: the exact commands for 0, 1, 2 and 8 GPUs (dry runs), and the vLLM server failure paths."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..ports import answers, free_port

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "launch_train.sh"
GPU_RECIPE = ROOT / "recipes" / "qwen2.5-1.5b-instruct" / "gsm8k_guided.yaml"
ENV = {**os.environ, "VENV": sys.prefix}


def launch(*args, env=None, timeout=120):
    return subprocess.run(
        ["bash", str(LAUNCHER), *map(str, args)], capture_output=True, text=True, env=env or ENV, timeout=timeout
    )


def commands(result) -> dict[str, list[str]]:
    lines = {}
    for line in result.stdout.splitlines():
        for role in ("server", "train"):
            if line.startswith(f"[launch] {role}: "):
                lines[role] = shlex.split(line.split(": ", 1)[1])
    return lines


def test_dry_run_without_gpu_is_the_cpu_demo():
    result = launch("--gpus", "0", "--dry-run")
    assert result.returncode == 0, result.stderr
    train = commands(result)["train"]
    assert train[1:4] == ["-m", "trl_guided.train", "--config"]
    assert train[4].endswith("recipes/smollm2-135m-instruct/length_cpu.yaml") and "--use_cpu" in train
    assert "server" not in commands(result)


def test_dry_run_one_gpu_colocates_vllm():
    train = commands(launch(GPU_RECIPE, "--gpus", "1", "--dry-run"))["train"]
    assert train[1:4] == ["launch", "--num_processes", "1"]
    assert train[-4:] == ["--use_vllm", "true", "--vllm_mode", "colocate"]


@pytest.mark.parametrize("gpus, vllm_gpus", [(2, 1), (8, 1), (8, 2)])
def test_dry_run_several_gpus_serves_vllm_and_trains_with_zero3(gpus, vllm_gpus):
    result = launch(GPU_RECIPE, "--gpus", gpus, "--vllm-gpus", vllm_gpus, "--dry-run", "--", "--max_steps", "5")
    assert result.returncode == 0, result.stderr
    server, train = commands(result)["server"], commands(result)["train"]
    assert server[1] == "CUDA_VISIBLE_DEVICES=" + ",".join(map(str, range(vllm_gpus)))
    assert server[2:6] == ["VLLM_SERVER_DEV_MODE=1", "vllm", "serve", "Qwen/Qwen2.5-1.5B-Instruct"]
    flags = " ".join(server)
    for flag in (
        '--weight-transfer-config {"backend":"nccl"}',
        "--logprobs-mode processed_logprobs",
        "--max-logprobs -1",
        "--enable-prefix-caching",
        f"--data-parallel-size {vllm_gpus}",
    ):
        assert flag in flags
    assert train[1] == "CUDA_VISIBLE_DEVICES=" + ",".join(map(str, range(vllm_gpus, gpus)))
    assert train[train.index("--config_file") + 1] == str(ROOT / "zero3.yaml")
    assert train[train.index("--num_processes") + 1] == str(gpus - vllm_gpus)
    assert train[-6:] == ["--vllm_server_host", "127.0.0.1", "--vllm_server_port", "8000", "--max_steps", "5"]


@pytest.mark.parametrize("flags", [["--model_name_or_path", "Qwen/Qwen2.5-0.5B-Instruct"], ["--model_name_or_path=x"]])
def test_a_model_given_after_the_separator_is_the_one_vllm_serves(flags):
    result = launch(GPU_RECIPE, "--gpus", 2, "--dry-run", "--", "--model_name_or_path", "first", *flags)
    assert result.returncode == 0, result.stderr
    served = flags[-1].split("=")[-1]
    assert commands(result)["server"][5] == served  # the last one given, like the trainer's parser
    assert commands(result)["train"][-len(flags) :] == flags


def test_a_model_flag_without_a_value_is_refused():
    result = launch(GPU_RECIPE, "--gpus", 2, "--dry-run", "--", "--model_name_or_path")
    assert result.returncode == 2 and "--model_name_or_path needs a value" in result.stderr


def test_bad_arguments_are_refused():
    assert launch("--gpus", "2", "--vllm-gpus", "2", "--dry-run").returncode == 2
    assert launch(ROOT / "recipes" / "nope.yaml", "--dry-run").returncode == 2
    assert launch("--gpus", "two", "--dry-run").returncode == 2


def _fake_vllm(tmp_path, body: str) -> str:
    fake = tmp_path / "fake-vllm"
    fake.write_text(f"#!/usr/bin/env bash\n{body}\n")
    fake.chmod(0o755)
    return str(fake)


def test_a_server_that_dies_stops_the_launch_with_its_log(tmp_path):
    body = 'echo "CUDA out of memory (fake)"; exit 3'
    env = {**ENV, "VLLM_BIN": _fake_vllm(tmp_path, body), "VLLM_PORT": str(free_port())}
    result = launch(GPU_RECIPE, "--gpus", "2", env=env, timeout=300)
    assert result.returncode == 1
    assert "exited before answering" in result.stderr and "CUDA out of memory (fake)" in result.stderr
    assert "[launch] vLLM server ready" not in result.stdout


def test_a_server_that_never_answers_times_out_and_is_stopped(tmp_path):
    marker = tmp_path / "still-running"
    body = f"trap 'exit 0' TERM; echo loading; while true; do touch {marker}; sleep 0.2; done"
    port = free_port()
    env = {**ENV, "VLLM_BIN": _fake_vllm(tmp_path, body), "VLLM_PORT": str(port), "VLLM_TIMEOUT": "3"}
    result = launch(GPU_RECIPE, "--gpus", "2", env=env, timeout=300)
    assert result.returncode == 1
    assert f"did not answer http://127.0.0.1:{port}/health within 3 s" in result.stderr and "loading" in result.stderr
    marker.unlink()
    subprocess.run(["sleep", "1"], check=True)
    assert not marker.exists(), "the fake vLLM server is still running after the launcher exited"


def test_training_that_fails_stops_the_server_it_started(tmp_path):
    """The server answers, training dies (a GPU recipe on this CPU machine): the launcher exits with the failure and
    stops the server it started."""
    port = free_port()
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "health").write_text("ok")
    body = f"cd {tmp_path / 'www'} && exec {sys.executable} -m http.server {port} --bind 127.0.0.1"
    env = {**ENV, "VLLM_BIN": _fake_vllm(tmp_path, body), "VLLM_PORT": str(port), "VLLM_TIMEOUT": "60"}
    result = launch(GPU_RECIPE, "--gpus", "2", env=env, timeout=600)
    assert "[launch] vLLM server ready" in result.stdout
    assert result.returncode != 0
    assert "No GPU found" in result.stderr  # the training process's own one-line error
    assert not answers(port), "the server still answers after the launcher exited"


# ------------------------------------------------------------------- stop signals reach the training, then the server

FAKE_TRAINING = """#!/usr/bin/env bash
# Stand-in for the training (python -m trl_guided.train, or accelerate launch): runs until SIGTERM, then "saves"
# (checks that the vLLM server, if any, still answers) and exits 143 as trl-guided train does. Other python calls are
# real.
if [ "$(basename "$0")" = python ] && [ "$1 $2" != "-m trl_guided.train" ]; then exec {python} "$@"; fi
saved() {{
  if [ -n "${{FAKE_HEALTH:-}}" ] && {python} -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1])' \\
    "$FAKE_HEALTH" 2>/dev/null; then echo "TERM; server up while saving" >> "$FAKE_LOG"
  else echo "TERM" >> "$FAKE_LOG"; fi
  exit 143
}}
trap saved TERM
touch "$FAKE_LOG.started"
while true; do sleep 0.1; done
"""


def _isolated_launcher(tmp_path: Path) -> tuple[Path, dict]:
    """launch_train.sh in a copy of the checkout whose setup step does nothing, with a stand-in training in VENV."""
    root, venv = tmp_path / "checkout", tmp_path / "venv"
    (root / "scripts").mkdir(parents=True)
    (venv / "bin").mkdir(parents=True)
    (root / "launch_train.sh").write_text(LAUNCHER.read_text())
    (root / "scripts" / "setup_env.sh").write_text("exit 0\n")
    for name in ("python", "accelerate"):
        (venv / "bin" / name).write_text(FAKE_TRAINING.format(python=sys.executable))
        (venv / "bin" / name).chmod(0o755)
    return root / "launch_train.sh", {**ENV, "VENV": str(venv), "FAKE_LOG": str(tmp_path / "training.log")}


@pytest.mark.parametrize("gpus", [0, 2])
def test_a_stop_signal_reaches_the_training_and_the_server_stops_after_it(tmp_path, gpus):
    launcher, env, port = *_isolated_launcher(tmp_path), free_port()
    if gpus:
        (tmp_path / "www").mkdir()
        (tmp_path / "www" / "health").write_text("ok")
        body = f"cd {tmp_path / 'www'} && exec {sys.executable} -m http.server {port} --bind 127.0.0.1"
        env.update(
            VLLM_BIN=_fake_vllm(tmp_path, body), VLLM_PORT=str(port), FAKE_HEALTH=f"http://127.0.0.1:{port}/health"
        )
    command = ["bash", str(launcher), str(GPU_RECIPE), "--gpus", str(gpus)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "training.log.started").exists():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr
    assert "SIGTERM: asking the training to save a checkpoint" in stderr and "stopped by SIGTERM" in stdout
    assert (tmp_path / "training.log").read_text() == ("TERM; server up while saving\n" if gpus else "TERM\n")
    if gpus:
        assert not answers(port), "the server still answers after the launcher exited"
