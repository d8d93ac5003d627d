"""Stop for a signal at a step boundary, with a checkpoint that resumes exactly (`enable_jit_checkpoint: true`).

transformers 5's `enable_jit_checkpoint` installs a SIGTERM handler that raises a flag (after a 3 s wait) and a
`JITCheckpointCallback` that saves as soon as one of its events sees the flag. Three of its choices break an exact
resume or a multi-process run:

- it also saves from `on_pre_optimizer_step` and `on_step_begin`: a save inside step N+1 is labelled
  `checkpoint-N` (the weights and optimizer of step N) but carries the RNG, sampler and generation-buffer state of
  step N+1's rollout, so the resumed run samples step N+1 differently;
- from `on_step_end` it saves before the Trainer logs the step, so step N's metrics are missing from the checkpoint's
  log history and from every resumed run;
- each process acts on its own flag, so a rank that got the signal first saves and stops while the others go on into
  the next step's collectives and hang.

`StopOnSignal` keeps transformers' handler and flag and takes the decision over: at every step end all processes
agree (a max over the process group) whether any of them was signalled; if so the Trainer logs the step and writes a
regular checkpoint of it (the same files a `save_steps` save writes, so resuming from it is as exact as from those),
and training stops. The save is marked in progress with transformers' `checkpoint-is-incomplete.txt` until it is
done. A second signal during the save only raises the flag again; the save goes on.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_jit_checkpoint import JITCheckpointCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpoints import INCOMPLETE_MARKER

logger = logging.getLogger(__name__)


class StopOnSignal(TrainerCallback):
    """Ends training at the first step boundary after SIGTERM reached any process, with a checkpoint of that step."""

    def __init__(self, callbacks: list[TrainerCallback], accelerator):
        """`callbacks`: the Trainer's (transformers' `JITCheckpointCallback` among them); `accelerator`: the processes
        that agree on a stop."""
        jit = next((cb for cb in callbacks if isinstance(cb, JITCheckpointCallback)), None)
        if jit is None or jit.jit_manager is None:
            raise RuntimeError(
                "enable_jit_checkpoint is set but transformers installed no JITCheckpointCallback with a SIGTERM "
                "handler; this transformers version changed it. Set enable_jit_checkpoint: false (SIGTERM then ends "
                "the run at once; resume from the last save_steps checkpoint)."
            )
        self._accelerator = accelerator
        self._manager = jit.jit_manager  # transformers' SIGTERM handler and its `is_checkpoint_requested` flag
        jit.jit_manager = None  # its own saves happen mid-step and before the step's log; this callback decides
        self.checkpoint: str | None = None  # set when a signal stopped training: the checkpoint written for it

    def _requested_on_any_process(self) -> bool:
        # A collective on every step end of every process (they all run the same steps), so all stop together.
        flag = torch.tensor(float(self._manager.is_checkpoint_requested), device=self._accelerator.device)
        return self._accelerator.reduce(flag, reduction="sum").item() > 0

    def on_step_end(self, args, state, control, **kwargs):
        if not self._requested_on_any_process() or state.global_step >= state.max_steps:
            return  # at max_steps the run ends anyway, with its final save
        self._manager.is_checkpoint_requested = False
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"  # the Trainer's save folder
        if args.should_save:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / INCOMPLETE_MARKER).write_text(f"Saving step {state.global_step} after a stop signal.\n")
        logger.warning("Stop signal: saving %s and stopping after step %d", folder, state.global_step)
        self.checkpoint = str(folder)
        control.should_log = True  # the steps since the last log would otherwise never be logged
        control.should_save = True
        control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        if self.checkpoint is not None and args.should_save:
            (Path(self.checkpoint) / INCOMPLETE_MARKER).unlink(missing_ok=True)

    def on_train_end(self, args, state, control, **kwargs):
        # After a stop the handler stays: a late signal must not kill the process before every rank is done.
        if self.checkpoint is None and self._manager._original_sigterm_handler is not None:
            signal.signal(signal.SIGTERM, self._manager._original_sigterm_handler)
