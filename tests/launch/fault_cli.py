"""`trl-guided train` with a fault point, for tests/launch/test_faults.py: the real CLI in this process, and a marker
file plus a long sleep at the chosen place so the test can `kill -9` the process there.

    python fault_cli.py MARKER step:3 -- train --config RECIPE ...   # during step 3 (after its rollout started)
    python fault_cli.py MARKER save:3 -- train --config RECIPE ...   # while checkpoint-3 is written (weights on disk,
                                                                       trainer_state.json not yet)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from trl_guided import cli
from trl_guided.trainer import GuidedGRPOTrainer


def stall(marker: Path) -> None:
    marker.write_text("reached")
    time.sleep(600)  # the test kills the process here


def main() -> None:
    marker, fault = Path(sys.argv[1]), sys.argv[2]
    kind, step = fault.split(":")
    argv = sys.argv[sys.argv.index("--") + 1 :]
    if kind == "step":
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
