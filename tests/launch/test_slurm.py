"""slurm/train.slurm: dry runs on fake allocations (node roles, ranks, flags), refusals, and one run of the real script
with stand-ins for srun, vllm and accelerate (the server wait, the per-node launch and the cleanup)."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ..ports import answers, free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "slurm" / "train.slurm"
RECIPE = ROOT / "recipes" / "qwen2.5-1.5b-instruct" / "gsm8k_guided.yaml"
ENV = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {"VENV": sys.prefix}


def run(*args, env=None, timeout=60):
    command = ["bash", str(SCRIPT), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env or ENV, timeout=timeout, cwd=ROOT)


def slurm_env(nodelist: str, nnodes: int | None = None, **extra) -> dict[str, str]:
    env = {**ENV, "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_ID": "4242", **extra}
    if nnodes is not None:
        env["SLURM_NNODES"] = str(nnodes)
    return env


def commands(result) -> dict[str, list[str]]:
    found = {}
    for line in result.stdout.splitlines():
        if line.startswith("[slurm] ") and ": " in line:
            role, command = line[len("[slurm] ") :].split(": ", 1)
            if role in ("server", "train") or role.startswith("train rank "):
                found[role] = shlex.split(command)
    return found


def option(command: list[str], name: str) -> str:
    for i, arg in enumerate(command):
        if arg == name:
            return command[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {command}")


@pytest.mark.parametrize("nodes", [2, 4])
def test_dry_run_serves_vllm_on_the_first_node_and_trains_on_the_others(nodes):
    gpus = 8
    env = slurm_env(f"gpu[01-{nodes:02d}]", nodes)
    result = run(RECIPE, "--dry-run", "--", "--max_steps", "5", env=env)
    assert result.returncode == 0, result.stderr
    found = commands(result)
    names = [f"gpu{i:02d}" for i in range(1, nodes + 1)]

    server = found["server"]
    assert server[:5] == ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={names[0]}", "env"]
    assert server[5:9] == ["VLLM_SERVER_DEV_MODE=1", "vllm", "serve", "Qwen/Qwen2.5-1.5B-Instruct"]
    flags = " ".join(server)
    for flag in (
        "--host 0.0.0.0",
        "--port 8000",
        '--weight-transfer-config {"backend":"nccl"}',
        "--logprobs-mode processed_logprobs",
        "--max-logprobs -1",
        "--enable-prefix-caching",
        "--tensor-parallel-size 1",
        "--data-parallel-size 1",
        "--dtype bfloat16",  # the recipe's
    ):
        assert flag in flags

    srun = found["train"]
    assert srun[0] == "srun" and srun[-3:-1] == ["bash", "-c"]
    assert option(srun, "--nodes") == option(srun, "--ntasks") == str(nodes - 1)
    assert option(srun, "--nodelist").split(",") == names[1:]
    assert option(srun, "--kill-on-bad-exit") == "1"
    task = shlex.split(srun[-1])
    assert task[0] == "exec" and option(task, "--machine_rank") == "$SLURM_PROCID"  # expanded by each task

    ranks = {role: cmd for role, cmd in found.items() if role.startswith("train rank ")}
    assert sorted(ranks) == [f"train rank {r} on {names[r + 1]}" for r in range(nodes - 1)]
    for role, cmd in ranks.items():
        rank = int(role.split()[2])
        assert cmd[0] == f"{sys.prefix}/bin/accelerate" and cmd[1] == "launch"
        assert option(cmd, "--config_file") == str(ROOT / "zero3.yaml")
        assert option(cmd, "--num_machines") == str(nodes - 1)
        assert option(cmd, "--num_processes") == str((nodes - 1) * gpus)
        assert option(cmd, "--machine_rank") == str(rank)
        assert option(cmd, "--main_process_ip") == names[1]  # rank 0 runs there
        assert option(cmd, "--main_process_port") == "29500"
        script = cmd[cmd.index("-m") :]
        assert script[:4] == ["-m", "trl_guided.train", "--config", str(RECIPE)]
        assert "--use_vllm" not in script and "--vllm_mode" not in script  # the recipe's server mode rules
        assert option(script, "--vllm_server_host") == names[0]
        assert option(script, "--vllm_server_port") == "8000"
        assert script[-2:] == ["--max_steps", "5"]
        # The task srun runs is this command with the rank left to $SLURM_PROCID.
        assert task[1:] == [a if i != cmd.index("--machine_rank") + 1 else "$SLURM_PROCID" for i, a in enumerate(cmd)]


def test_dry_run_vllm_parallelism_gpus_per_node_and_ports():
    env = slurm_env("a100-[1-3]", 3, SLURM_GPUS_ON_NODE="4", VLLM_PORT="8123", MAIN_PROCESS_PORT="6000")
    result = run(RECIPE, "--vllm-tp", "2", "--vllm-dp", "2", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    found = commands(result)
    server, rank1 = found["server"], found["train rank 1 on a100-3"]
    assert option(server, "--tensor-parallel-size") == "2" and option(server, "--data-parallel-size") == "2"
    assert option(server, "--port") == "8123" and option(rank1, "--vllm_server_port") == "8123"
    assert option(rank1, "--num_processes") == "8" and option(rank1, "--main_process_port") == "6000"
    # --gpus-per-node beats SLURM_GPUS_ON_NODE; the server node must hold tp x dp GPUs
    result = run(RECIPE, "--gpus-per-node", "2", "--dry-run", env=env)
    assert option(commands(result)["train rank 0 on a100-2"], "--num_processes") == "4"
    result = run(RECIPE, "--vllm-tp", "4", "--vllm-dp", "2", "--dry-run", env=env)
    assert result.returncode == 2 and "needs more than the 4 GPUs" in result.stderr


def test_dry_run_from_the_environment_and_outside_slurm():
    result = run(RECIPE, env={**slurm_env("n[1-2]"), "DRY_RUN": "1"})
    assert result.returncode == 0 and "train rank 0 on n2" in result.stdout
    result = run(RECIPE, "--dry-run")  # no allocation: a fake two-node preview
    assert result.returncode == 0 and "fake node list node[01-02]" in result.stdout
    assert "train rank 0 on node02" in result.stdout


def test_nodelists_are_expanded_like_scontrol(tmp_path):
    result = run(RECIPE, "--dry-run", env=slurm_env("x[8-10],y,rack[1-2]-n[07,09]", 8))
    assert result.returncode == 0, result.stderr
    assert option(commands(result)["train"], "--nodelist") == "x9,x10,y,rack1-n07,rack1-n09,rack2-n07,rack2-n09"
    assert "vLLM node: x8 " in result.stdout
    # With Slurm installed, scontrol is the authority.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _tool(bin_dir, "scontrol", '#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] && printf "s1\\ns2\\ns3\\n"\n')
    env = slurm_env("whatever[1-3]", 3, PATH=f"{bin_dir}:{os.environ['PATH']}")
    found = commands(run(RECIPE, "--dry-run", env=env))
    assert option(found["train"], "--nodelist") == "s2,s3" and option(found["server"], "--nodelist") == "s1"


def test_the_server_serves_the_model_the_trainer_flags_give():
    override = ["--", "--model_name_or_path", "embedded:smollm2-135m-instruct"]
    result = run(RECIPE, "--dry-run", *override, env=slurm_env("n[1-2]", 2, WANDB_MODE="offline"))
    assert result.returncode == 0, result.stderr
    served = commands(result)["server"][8]
    assert Path(served, "config.json").is_file()  # resolved to its folder, whatever transformers prints on import


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--dry-run"], slurm_env("n[1-2]", 2), "no recipe given"),
        ([ROOT / "recipes" / "nope.yaml", "--dry-run"], slurm_env("n[1-2]", 2), "recipe '"),
        ([RECIPE, "--dry-run"], slurm_env("n1", 1), "it needs 2 or more"),
        ([RECIPE, "--dry-run"], slurm_env("n[1-3]", 2), "SLURM_NNODES=2 but"),
        ([RECIPE, "--gpus-per-node", "eight", "--dry-run"], slurm_env("n[1-2]", 2), "positive numbers"),
        ([RECIPE, "--gpu", "8", "--dry-run"], slurm_env("n[1-2]", 2), "unknown option --gpu"),
        ([RECIPE], ENV, "not inside a Slurm job"),
        ([ROOT / "recipes" / "accelerate" / "zero3_cpu.yaml", "--dry-run"], slurm_env("n[1-2]"), "no model_name"),
    ],
)
def test_bad_input_is_refused_with_the_fix(args, env, message):
    result = run(*args, env=env)
    assert result.returncode == 2, result.stdout
    assert message in result.stderr and result.stderr.startswith("train.slurm: "), result.stderr
    assert "[slurm] server:" not in result.stdout


def test_one_node_points_to_the_single_node_launcher():
    result = run(RECIPE, "--dry-run", env=slurm_env("solo", 1, SLURM_GPUS_ON_NODE="8"))
    assert f"./launch_train.sh {RECIPE} --gpus 8" in result.stderr


NO_VLLM_RECIPE = ROOT / "recipes" / "qwen3-0.6b" / "gsm8k_kl.yaml"  # no use_vllm: TRL's default, false


@pytest.mark.parametrize("nodes", [1, 3])
@pytest.mark.parametrize(
    "flags", [[], ["--", "--use_vllm", "true", "--vllm_mode", "colocate"]], ids=["none", "colocate"]
)
def test_a_recipe_without_server_mode_starts_no_server_and_trains_on_every_node(nodes, flags):
    """As launch_train.sh: the recipe's generation (use_vllm false, or vllm_mode colocate) means no server, and every
    node trains, rank 0 on the first."""
    result = run(NO_VLLM_RECIPE, "--dry-run", *flags, env=slurm_env(f"gpu[1-{nodes}]", nodes))
    assert result.returncode == 0, result.stderr
    found = commands(result)
    assert "server" not in found and "no server" in result.stdout
    names = [f"gpu{i}" for i in range(1, nodes + 1)]
    assert option(found["train"], "--nodelist").split(",") == names
    assert sorted(role for role in found if role.startswith("train rank ")) == [
        f"train rank {rank} on {name}" for rank, name in enumerate(names)
    ]
    rank0 = found["train rank 0 on gpu1"]
    assert option(rank0, "--main_process_ip") == "gpu1" and option(rank0, "--num_processes") == str(8 * nodes)
    assert "--vllm_server_host" not in rank0 and rank0[rank0.index("--config") + 1 :] == [
        str(NO_VLLM_RECIPE),
        *flags[1:],
    ]


@pytest.mark.parametrize(
    "recipe, flags, message",
    [
        (NO_VLLM_RECIPE, ["--vllm-tp", "2"], "--vllm-tp and --vllm-dp size a vLLM server, and this job starts none"),
        (ROOT / "recipes" / "smollm2-135m-instruct" / "length_cpu.yaml", [], "sets use_cpu: true"),
        (RECIPE, ["--", "--vllm_mode", "remote"], "vllm_mode 'remote' is neither server nor colocate"),
    ],
)
def test_settings_that_cannot_take_effect_are_refused(recipe, flags, message):
    result = run(recipe, "--dry-run", *flags, env=slurm_env("n[1-2]", 2))
    assert result.returncode == 2 and message in result.stderr, result.stderr


# ---------------------------------------------------------------------------- the real script with stand-in tools

FAKE_SRUN = """#!{python}
# srun stand-in: drop the options, run the command once per task with SLURM_PROCID set (tasks in parallel). Like srun
# it passes SIGTERM/SIGINT on to its tasks, which run in sessions of their own (as tasks on other nodes: only srun's
# forwarding reaches them), and exits with the highest task status (128 + N for a task killed by signal N), or with
# $FAKE_SRUN_STOPPED_STATUS after a forwarded signal (a real srun's status then depends on how its tasks stopped).
# Python, not bash: a trapped signal that interrupts bash's `wait` as a task is reaped loses that task's status
# (`wait` then returns -1: exit status 255); os.waitpid keeps it.
import os, signal, subprocess, sys

args = sys.argv[1:]
ntasks = 1
while args and args[0].startswith("--"):
    if args[0].startswith("--ntasks="):
        ntasks = int(args[0].split("=", 1)[1])
    args.pop(0)
with open(os.environ["FAKE_LOG"], "a") as log:
    print(f"srun {{ntasks}} task(s): {{' '.join(args)}}", file=log)
if ntasks == 1:
    os.execvpe(args[0], args, {{**os.environ, "SLURM_PROCID": "0"}})
env = [{{**os.environ, "SLURM_PROCID": str(i)}} for i in range(ntasks)]
tasks = [subprocess.Popen(args, env=env[i], start_new_session=True) for i in range(ntasks)]
forwarded = []


def forward(signum, frame):
    forwarded.append(signum)
    for task in tasks:
        task.send_signal(signum)


signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
status = max(128 - code if code < 0 else code for code in [task.wait() for task in tasks])
sys.exit(int(os.environ.get("FAKE_SRUN_STOPPED_STATUS", status)) if forwarded else status)
"""

FAKE_ACCELERATE = """#!/usr/bin/env bash
echo "rank=$SLURM_PROCID args=$*" >> "$FAKE_LOG"
exit "${FAKE_TRAIN_STATUS:-0}"
"""

FAKE_VLLM_HEALTHY = """#!/usr/bin/env bash
# vllm stand-in: answers /health on --port until it is stopped; leaves a marker while it runs.
port=$(echo "$*" | sed -E 's/.*--port ([0-9]+).*/\\1/')
echo $$ > "$FAKE_PIDFILE"  # for the test's teardown, should the script under test leave the server behind
echo "fake vllm $* (VLLM_SERVER_DEV_MODE=$VLLM_SERVER_DEV_MODE)"
exec {python} -c '
import http.server, pathlib, sys
marker = pathlib.Path(sys.argv[2])
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        marker.touch()
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
' "$port" "$FAKE_MARKER"
"""


def _tool(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(textwrap.dedent(body))
    path.chmod(0o755)


@pytest.fixture
def fake_cluster(tmp_path):
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    _tool(bin_dir, "srun", FAKE_SRUN.format(python=sys.executable))
    _tool(venv / "bin", "python", f'#!/usr/bin/env bash\nexec {sys.executable} "$@"\n')
    _tool(venv / "bin", "accelerate", FAKE_ACCELERATE)
    port = free_port()
    env = slurm_env(
        "localhost,fake[2-3]",
        3,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        VENV=str(venv),
        VLLM_PORT=str(port),
        LOG_DIR=str(tmp_path / "logs"),
        FAKE_LOG=str(tmp_path / "calls.log"),
        FAKE_MARKER=str(tmp_path / "server-ran"),
        FAKE_PIDFILE=str(tmp_path / "server.pid"),
    )
    yield tmp_path, env, port
    pidfile = tmp_path / "server.pid"
    if pidfile.exists():  # a failed test must not leave its fake server running
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_a_run_waits_for_the_server_launches_every_node_and_stops_the_server(fake_cluster):
    tmp_path, env, port = fake_cluster
    _tool(tmp_path / "bin", "vllm", FAKE_VLLM_HEALTHY.format(python=sys.executable))
    env["VLLM_BIN"] = str(tmp_path / "bin" / "vllm")
    result = run(RECIPE, "--gpus-per-node", "2", "--", "--max_steps", "1", env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"[slurm] vLLM server ready on localhost:{port}" in result.stdout
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls[0].startswith("srun 1 task(s): env VLLM_SERVER_DEV_MODE=1")
    launches = sorted(line for line in calls if line.startswith("rank="))
    assert len(launches) == 2
    for rank, line in enumerate(launches):
        args = line.split(" args=", 1)[1].split()
        assert line.startswith(f"rank={rank} ") and option(args, "--machine_rank") == str(rank)
        assert option(args, "--num_processes") == "4" and option(args, "--main_process_ip") == "fake2"
        assert option(args, "--vllm_server_host") == "localhost" and args[-2:] == ["--max_steps", "1"]
    assert (tmp_path / "server-ran").exists(), "the health check never reached the fake server"
    assert "fake vllm serve" in (tmp_path / "logs" / "vllm-4242.log").read_text()
    time.sleep(0.5)
    assert not answers(port), "the vLLM server is still running after the job ended"


def test_a_run_without_server_mode_starts_no_server_and_launches_every_node(fake_cluster):
    tmp_path, env, _ = fake_cluster
    _tool(tmp_path / "bin", "vllm", f"#!/usr/bin/env bash\ntouch {tmp_path / 'vllm-started'}; exit 3\n")
    env["VLLM_BIN"] = str(tmp_path / "bin" / "vllm")
    result = run(NO_VLLM_RECIPE, "--gpus-per-node", "2", "--", "--max_steps", "1", env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert [line.split(" task(s)")[0] for line in calls if line.startswith("srun")] == ["srun 3"]
    launches = sorted(line for line in calls if line.startswith("rank="))
    assert [line.split()[0] for line in launches] == ["rank=0", "rank=1", "rank=2"]
    assert option(launches[0].split(" args=", 1)[1].split(), "--main_process_ip") == "localhost"
    assert not (tmp_path / "vllm-started").exists() and "vLLM server ready" not in result.stdout


def test_a_failed_training_step_is_the_job_status_and_the_server_is_stopped(fake_cluster):
    tmp_path, env, port = fake_cluster
    _tool(tmp_path / "bin", "vllm", FAKE_VLLM_HEALTHY.format(python=sys.executable))
    env.update(VLLM_BIN=str(tmp_path / "bin" / "vllm"), FAKE_TRAIN_STATUS="3")
    result = run(RECIPE, env=env, timeout=120)
    assert result.returncode == 3 and "training exited with status 3" in result.stdout
    time.sleep(0.5)
    assert not answers(port)


def test_a_server_that_dies_stops_the_job_with_its_log(fake_cluster):
    tmp_path, env, _ = fake_cluster
    _tool(tmp_path / "bin", "vllm", '#!/usr/bin/env bash\necho "CUDA out of memory (fake)"; exit 3\n')
    env["VLLM_BIN"] = str(tmp_path / "bin" / "vllm")
    result = run(RECIPE, env=env, timeout=120)
    assert result.returncode == 1
    assert "exited before answering" in result.stderr and "CUDA out of memory (fake)" in result.stderr
    assert not any(line.startswith("rank=") for line in (tmp_path / "calls.log").read_text().splitlines())


def test_a_server_that_never_answers_times_out(fake_cluster):
    tmp_path, env, port = fake_cluster
    marker = tmp_path / "still-running"
    body = "#!/usr/bin/env bash\necho $$ > \"$FAKE_PIDFILE\"; trap 'exit 0' TERM; echo loading\n"
    body += f"while true; do touch {marker}; sleep 0.2; done\n"
    _tool(tmp_path / "bin", "vllm", body)
    env.update(VLLM_BIN=str(tmp_path / "bin" / "vllm"), VLLM_TIMEOUT="3")
    result = run(RECIPE, env=env, timeout=120)
    assert result.returncode == 1
    assert f"did not answer http://localhost:{port}/health within 3 s" in result.stderr and "loading" in result.stderr
    marker.unlink()
    time.sleep(1)
    assert not marker.exists(), "the fake vLLM server is still running after the job ended"


# ---------------------------------------------------------------------------------- time limit: stop, requeue, resume

FAKE_SCONTROL = """#!/usr/bin/env bash
# scontrol stand-in: the node names of the fake allocation; any other call is logged.
if [ "$1 $2" = "show hostnames" ]; then printf "localhost\\nfake2\\nfake3\\n"; exit 0; fi
echo "scontrol $*" >> "$FAKE_LOG"
"""

FAKE_TRAINING = """#!/usr/bin/env bash
# accelerate stand-in that trains until SIGTERM, then "saves" and exits 143 as trl-guided train does.
trap 'echo "rank=$SLURM_PROCID got TERM" >> "$FAKE_LOG"; exit 143' TERM
echo "rank=$SLURM_PROCID args=$*" >> "$FAKE_LOG"
touch "$FAKE_TRAINING_MARKER.$SLURM_PROCID"
while true; do sleep 0.1; done
"""


@pytest.mark.parametrize("srun_status", [None, "255"], ids=["srun-reports-the-tasks-143", "srun-reports-255"])
def test_the_time_limit_signal_stops_the_training_requeues_the_job_and_the_requeued_job_resumes(
    fake_cluster, srun_status
):
    """SIGUSR1 to the batch script (what `--signal=B:USR1@900` sends before the time limit) reaches every training
    task as SIGTERM; once they exit the server is stopped, the job requeues itself and exits 143 whatever srun
    reported; a requeued job (SLURM_RESTART_COUNT > 0) trains with --resume_from_checkpoint auto, a first start does
    not."""
    script_head = SCRIPT.read_text().splitlines()[:12]
    assert "#SBATCH --signal=B:USR1@900" in script_head and "#SBATCH --requeue" in script_head
    tmp_path, env, port = fake_cluster
    _tool(tmp_path / "bin", "vllm", FAKE_VLLM_HEALTHY.format(python=sys.executable))
    _tool(tmp_path / "bin", "scontrol", FAKE_SCONTROL)
    _tool(tmp_path / "venv" / "bin", "accelerate", FAKE_TRAINING)
    env.update(VLLM_BIN=str(tmp_path / "bin" / "vllm"), FAKE_TRAINING_MARKER=str(tmp_path / "training"))
    if srun_status is not None:
        env["FAKE_SRUN_STOPPED_STATUS"] = srun_status
    command = ["bash", str(SCRIPT), str(RECIPE), "--gpus-per-node", "2"]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"training.{rank}").exists() for rank in (0, 1)):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        process.send_signal(signal.SIGUSR1)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert f"training exited with status {srun_status or 143} " in stdout
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert sorted(line for line in calls if line.endswith("got TERM")) == ["rank=0 got TERM", "rank=1 got TERM"]
    assert calls[-1] == "scontrol requeue 4242", calls
    assert "requeueing job 4242" in stdout and "SIGUSR1: asking the training to save a checkpoint" in stderr
    assert "--resume_from_checkpoint" not in " ".join(calls)
    assert not answers(port), "the vLLM server is still running after the job ended"

    requeued = commands(run(RECIPE, "--dry-run", env=slurm_env("n[1-2]", 2, SLURM_RESTART_COUNT="1")))
    assert requeued["train rank 0 on n2"][-2:] == ["--resume_from_checkpoint", "auto"]


def test_scancel_stops_the_training_with_a_checkpoint_and_does_not_requeue(fake_cluster):
    tmp_path, env, port = fake_cluster
    _tool(tmp_path / "bin", "vllm", FAKE_VLLM_HEALTHY.format(python=sys.executable))
    _tool(tmp_path / "bin", "scontrol", FAKE_SCONTROL)
    _tool(tmp_path / "venv" / "bin", "accelerate", FAKE_TRAINING)
    env.update(VLLM_BIN=str(tmp_path / "bin" / "vllm"), FAKE_TRAINING_MARKER=str(tmp_path / "training"))
    command = ["bash", str(SCRIPT), str(RECIPE), "--gpus-per-node", "2"]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "training.0").exists():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    calls = (tmp_path / "calls.log").read_text()
    assert "rank=0 got TERM" in calls and "scontrol requeue" not in calls
    assert not answers(port)
