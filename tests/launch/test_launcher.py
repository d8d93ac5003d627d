"""launch_train.sh: the exact commands for 0, 1, 2 and 8 GPUs (dry runs) as the recipe's generation decides them, the
main job on GPUs, the vLLM server failure paths, and that running the job installs nothing."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ..ports import answers, free_port

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "launch_train.sh"
GPU_RECIPE = ROOT / "recipes" / "qwen2.5-1.5b-instruct" / "gsm8k_guided.yaml"  # vLLM server mode
NO_VLLM_RECIPE = ROOT / "recipes" / "qwen3-0.6b" / "gsm8k_kl.yaml"  # no use_vllm: TRL's default, false
MAIN_GPU_RECIPE = ROOT / "recipes" / "smollm2-135m-instruct" / "instructions_gpu.yaml"
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


def test_dry_run_one_gpu_colocates_a_server_mode_recipe():
    result = launch(GPU_RECIPE, "--gpus", "1", "--dry-run")
    assert result.returncode == 0, result.stderr
    train = commands(result)["train"]
    assert train[1:4] == ["launch", "--num_processes", "1"]
    assert train[-2:] == ["--vllm_mode", "colocate"] and "--use_vllm" not in train  # the recipe turns vLLM on
    assert "server" not in commands(result) and "server mode needs a GPU of its own" in result.stdout


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_main_job_on_gpus_without_a_recipe_trains_the_gpu_recipe_with_the_server_its_mode_needs(gpus):
    fields = yaml.safe_load(MAIN_GPU_RECIPE.read_text())
    assert not fields.get("use_cpu") and fields["bf16"] is True, "the GPU main job's recipe trains on the GPU"
    assert fields["model_name_or_path"] == "embedded:smollm2-135m-instruct"
    assert fields["use_vllm"] is True and fields["vllm_mode"] == "server"
    result = launch("--gpus", gpus, "--dry-run", env={**ENV, "WANDB_MODE": "offline"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"recipe {MAIN_GPU_RECIPE};" in result.stdout
    found = commands(result)
    train = found["train"]
    assert train[train.index("--config") + 1] == str(MAIN_GPU_RECIPE)
    assert "--use_cpu" not in train and "--bf16" not in train and "--use_vllm" not in train
    if gpus == 1:  # the server would need a GPU of its own: vLLM runs inside the one training process
        assert "server" not in found
        assert train[1:4] == ["launch", "--num_processes", "1"] and train[-2:] == ["--vllm_mode", "colocate"]
        return
    server = found["server"]
    assert server[1] == "CUDA_VISIBLE_DEVICES=0" and server[3:5] == ["vllm", "serve"]
    assert Path(server[5], "config.json").is_file()  # the embedded model's local folder, the one training loads
    assert server[server.index("--dtype") + 1] == "bfloat16"  # the recipe's dtype
    assert train[1] == "CUDA_VISIBLE_DEVICES=" + ",".join(map(str, range(1, gpus)))
    assert train[train.index("--num_processes") + 1] == str(gpus - 1)
    assert train[-4:] == ["--vllm_server_host", "127.0.0.1", "--vllm_server_port", "8000"]


def _recipe_with(tmp_path: Path, **fields) -> Path:
    recipe = yaml.safe_load(GPU_RECIPE.read_text())
    recipe.update(fields)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("gpus", [1, 2, 8])
@pytest.mark.parametrize("generation", ["use_vllm false", "no use_vllm", "colocate"])
def test_a_recipe_without_server_mode_starts_no_server_and_trains_on_every_gpu(tmp_path, gpus, generation):
    recipe = {
        "use_vllm false": lambda: _recipe_with(tmp_path, use_vllm=False),
        "no use_vllm": lambda: NO_VLLM_RECIPE,
        "colocate": lambda: _recipe_with(tmp_path, vllm_mode="colocate"),
    }[generation]()
    result = launch(recipe, "--gpus", gpus, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "server" not in commands(result)
    train = commands(result)["train"]
    assert train[0] == f"{sys.prefix}/bin/accelerate"  # every GPU visible: no CUDA_VISIBLE_DEVICES
    assert train[train.index("--num_processes") + 1] == str(gpus)
    assert ("--config_file" in train) == (gpus > 1)
    assert train[train.index("--config") + 1 :] == [str(recipe)], "the recipe's own generation settings rule"
    refused = launch(recipe, "--gpus", gpus, "--vllm-gpus", "1", "--dry-run")
    assert refused.returncode == 2 and "--vllm-gpus sets the GPUs of a vLLM server" in refused.stderr


def test_the_flags_after_the_separator_decide_the_generation_too():
    result = launch(NO_VLLM_RECIPE, "--gpus", 4, "--dry-run", "--", "--use_vllm", "true", "--vllm_mode=server")
    assert result.returncode == 0, result.stderr
    found = commands(result)
    assert found["server"][5] == "Qwen/Qwen3-0.6B"
    assert found["train"][found["train"].index("--num_processes") + 1] == "3"
    result = launch(GPU_RECIPE, "--gpus", 4, "--dry-run", "--", "--use_vllm", "false")
    assert "server" not in commands(result)
    result = launch(NO_VLLM_RECIPE, "--gpus", 4, "--dry-run", "--", "--use_vllm", "--max_steps", "5")  # bare: true
    assert "generation: vLLM colocated" in result.stdout and "server" not in commands(result)
    result = launch(NO_VLLM_RECIPE, "--gpus", 4, "--dry-run", "--", "--use_vllm", "maybe")
    assert result.returncode == 2 and "use_vllm is 'maybe'; it takes true or false" in result.stderr
    result = launch(GPU_RECIPE, "--gpus", 4, "--dry-run", "--", "--vllm_mode", "remote")
    assert result.returncode == 2 and "vllm_mode 'remote' is neither server nor colocate" in result.stderr


def _fake_nvidia_smi(tmp_path: Path, gpus: int) -> dict:
    folder = tmp_path / "bin"
    folder.mkdir()
    lines = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})\\n" for i in range(gpus))
    (folder / "nvidia-smi").write_text(f'#!/usr/bin/env bash\nprintf "{lines}"\n')
    (folder / "nvidia-smi").chmod(0o755)
    return {**ENV, "PATH": f"{folder}:{os.environ['PATH']}"}


def test_gpus_found_by_nvidia_smi_choose_the_gpu_layout_and_a_cpu_recipe_stays_on_cpu(tmp_path):
    env = _fake_nvidia_smi(tmp_path, 2)
    result = launch(GPU_RECIPE, "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("[launch] 2 GPU(s)") and "server" in commands(result)
    cpu_recipe = ROOT / "recipes" / "smollm2-135m-instruct" / "length_cpu.yaml"
    result = launch(cpu_recipe, "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert "--use_cpu" in commands(result)["train"] and "sets use_cpu: true, so it trains on CPU" in result.stdout
    refused = launch(cpu_recipe, "--gpus", "2", "--dry-run")  # asked for GPUs explicitly: refused with the fix
    assert refused.returncode == 2 and "sets use_cpu: true, so --gpus 2 would go unused" in refused.stderr


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
        "--dtype bfloat16",  # the recipe's
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


SETUP_CALLED = "setup_env.sh ran"


def _isolated_launcher(tmp_path: Path, training: str = FAKE_TRAINING) -> tuple[Path, dict]:
    """launch_train.sh in a copy of the checkout whose setup and pip leave a mark if called, with a stand-in training
    in VENV."""
    root, venv = tmp_path / "checkout", tmp_path / "venv"
    (root / "scripts").mkdir(parents=True)
    (venv / "bin").mkdir(parents=True)
    (root / "launch_train.sh").write_text(LAUNCHER.read_text())
    shutil.copytree(ROOT / "recipes", root / "recipes")  # the default recipes
    marker = tmp_path / "installer-called"
    for installer in (root / "scripts" / "setup_env.sh", root / "scripts" / "setup_vllm_env.sh", venv / "bin" / "pip"):
        installer.write_text(f'#!/usr/bin/env bash\necho "{SETUP_CALLED}: $0 $*" >> {marker}\nexit 1\n')
        installer.chmod(0o755)
    for name in ("python", "accelerate"):
        (venv / "bin" / name).write_text(training.format(python=sys.executable))
        (venv / "bin" / name).chmod(0o755)
    return root / "launch_train.sh", {**ENV, "VENV": str(venv), "FAKE_LOG": str(tmp_path / "training.log")}


FINISHING_TRAINING = """#!/usr/bin/env bash
# Stand-in for the training that records its command and finishes at once. Other python calls are real.
if [ "$(basename "$0")" = python ] && [ "$1 $2" != "-m trl_guided.train" ]; then exec {python} "$@"; fi
echo "$(basename "$0") $*" >> "$FAKE_LOG"
"""


@pytest.mark.parametrize("gpus", [0, 1])
def test_running_the_job_sets_nothing_up(tmp_path, gpus):
    """The job runs in the environment setup made; it never calls scripts/setup_env.sh (which may install a browser
    with apt-get), the vLLM setup, or pip."""
    launcher, env = _isolated_launcher(tmp_path, FINISHING_TRAINING)
    result = subprocess.run(["bash", str(launcher), "--gpus", str(gpus)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "-m trl_guided.train --config" in (tmp_path / "training.log").read_text()
    assert not (tmp_path / "installer-called").exists(), (tmp_path / "installer-called").read_text()


def test_a_missing_environment_stops_the_job_with_the_setup_command(tmp_path):
    launcher, env = _isolated_launcher(tmp_path, FINISHING_TRAINING)
    empty = tmp_path / "no-venv"
    empty.mkdir()
    for args in ([], ["--dry-run"], ["--gpus", "2"]):
        result = subprocess.run(
            ["bash", str(launcher), *args], capture_output=True, text=True, env={**env, "VENV": str(empty)}
        )
        assert result.returncode == 2 and "Set it up once with `bash scripts/setup_env.sh`" in result.stderr
    assert not list(empty.iterdir()) and not (tmp_path / "installer-called").exists()
    assert not (tmp_path / "training.log").exists()


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
