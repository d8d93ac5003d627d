"""`trl-guided train` with a fault point, for tests/launch/test_faults.py: the real CLI in this process, and a marker
file plus a long sleep at the chosen place so the test can `kill -9` the process there.

    python fault_cli.py MARKER step:3 -- train --config RECIPE ...   # during step 3 (after its rollout started)
    python fault_cli.py MARKER save:3 -- train --config RECIPE ...   # while checkpoint-3 is written (weights on disk,
                                                                       trainer_state.json not yet)
    python fault_cli.py MARKER term:3 -- train --config RECIPE ...   # for SIGTERM (enable_jit_checkpoint), see below

`term:N` stalls nothing for good: each process writes its pid to MARKER.step.RANK during step N (after its rollout) if
it is the main process, and to MARKER.save.RANK while its part of the stop's checkpoint is written (any process), then
waits there until transformers' SIGTERM handler has raised its flag (the test sends the signal), and goes on.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from trl_guided import cli
from trl_guided.trainer import GuidedGRPOTrainer


def stall(marker: Path) -> None:
    marker.write_text("reached")
    time.sleep(600)  # the test kills the process here


def signalled_at(marker: Path, trainer: GuidedGRPOTrainer) -> None:
    """Write this process's pid to `marker`, then wait until a SIGTERM has raised the stop flag."""
    marker.write_text(str(os.getpid()))
    manager = trainer._stop_on_signal._manager
    deadline = time.monotonic() + 120
    while not manager.is_checkpoint_requested:
        if time.monotonic() > deadline:
            raise SystemExit(f"fault_cli: no SIGTERM reached process {os.getpid()} at {marker.name}")
        time.sleep(0.05)


def stop_on_term(marker: Path, step: int) -> None:
    generate = GuidedGRPOTrainer._generate_and_score_completions
    save_rng_state = GuidedGRPOTrainer._save_rng_state

    def generate_then_wait(self, inputs):
        output = generate(self, inputs)
        if self.state.global_step + 1 == step and self.accelerator.is_main_process:
            signalled_at(marker.with_name(f"{marker.name}.step.{self.accelerator.process_index}"), self)
        return output

    def save_then_wait(self, output_dir):
        save_rng_state(self, output_dir)
        if Path(output_dir).name == f"checkpoint-{step}":
            signalled_at(marker.with_name(f"{marker.name}.save.{self.accelerator.process_index}"), self)

    GuidedGRPOTrainer._generate_and_score_completions = generate_then_wait
    GuidedGRPOTrainer._save_rng_state = save_then_wait


def main() -> None:
    marker, fault = Path(sys.argv[1]), sys.argv[2]
    kind, step = fault.split(":")
    argv = sys.argv[sys.argv.index("--") + 1 :]
    if kind == "term":
        stop_on_term(marker, int(step))
    elif kind == "step":
        generate = GuidedGRPOTrainer._generate_and_score_completions

        def generate_then_stall(self, inputs):
            output = generate(self, inputs)
            if self.state.global_step + 1 == int(step):
                stall(marker)
            return output

        GuidedGRPOTrainer._generate_and_score_completions = generate_then_stall
    else:
        save_rng_state = GuidedGRPOTrainer._save_rng_state

        def save_then_stall(self, output_dir):
            save_rng_state(self, output_dir)
            if Path(output_dir).name == f"checkpoint-{step}":
                stall(marker)

        GuidedGRPOTrainer._save_rng_state = save_then_stall
    sys.exit(cli.main(argv))


if __name__ == "__main__":
    main()
