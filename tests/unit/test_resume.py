"""Resume is exact: a run stopped at a checkpoint and resumed gives the same steps and weights as one that never
stopped, including when the checkpoint falls inside a buffered generation batch."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from trl_guided.train import leave_process_group

from .common import trainer_for

STEPS = 6


class StopAfter(TrainerCallback):
    """Stops training after `step` (the checkpoint of that step is written first), as a crash right after it would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def train(model, output_dir, save_every, overrides, stop_after=None, resume=None):
    saving = dict(save_strategy="steps", save_steps=save_every)
    trainer = trainer_for(model, output_dir, max_steps=STEPS, learning_rate=1e-2, **saving, **overrides)
    if stop_after:
        trainer.add_callback(StopAfter(stop_after))
    trainer.train(resume_from_checkpoint=resume)
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    watched = ("loss", "reward", "rewards/reward_len/mean")
    per_step = [{k: v for k, v in e.items() if k in watched or k.startswith("guidance/")} for e in steps]
    return per_step, {name: value.clone() for name, value in trainer.model.state_dict().items()}


@pytest.mark.parametrize(
    "overrides, checkpoint_at",
    [
        ({}, 2),
        ({"num_iterations": 2}, 3),  # the checkpoint falls between the two passes over one generation batch
        ({"steps_per_generation": 2}, 3),  # ... between the two halves of a buffered generation batch
    ],
)
def test_resumed_run_continues_the_same_run(tiny_llama, tmp_path, overrides, checkpoint_at):
    full, full_weights = train(tiny_llama, tmp_path / "full", checkpoint_at, overrides)
    train(tiny_llama, tmp_path / "part", checkpoint_at, overrides, stop_after=checkpoint_at)
    checkpoint = tmp_path / "part" / f"checkpoint-{checkpoint_at}"
    resumed, resumed_weights = train(tiny_llama, tmp_path / "part", checkpoint_at, overrides, resume=str(checkpoint))
    assert len(full) == len(resumed) == STEPS
    assert resumed[checkpoint_at:] == full[checkpoint_at:]
    assert all(torch.equal(full_weights[name], resumed_weights[name]) for name in full_weights)


def test_resume_needs_the_guided_state_in_the_checkpoint(tiny_llama, tmp_path):
    """Without the sampler's generator state the resumed run draws other segment lengths: the check above can fail."""
    full, _ = train(tiny_llama, tmp_path / "full", 2, {})
    train(tiny_llama, tmp_path / "part", 2, {}, stop_after=2)
    checkpoint = tmp_path / "part" / "checkpoint-2"
    (checkpoint / "guidance_rng_state_0.json").unlink()
    resumed, _ = train(tiny_llama, tmp_path / "part", 2, {}, resume=str(checkpoint))
    assert resumed[2:] != full[2:]


def test_a_checkpoint_whose_save_was_killed_is_never_resumed(tiny_llama, tmp_path):
    """A save killed before `trainer_state.json` (written last) leaves an incomplete folder: resume takes the one
    before it, and a run with nothing complete says so in one line."""
    from trl_guided.checkpoints import last_complete_checkpoint

    train(tiny_llama, tmp_path / "run", 2, {}, stop_after=4)
    (tmp_path / "run" / "checkpoint-4" / "trainer_state.json").write_text('{"truncated": ')  # killed mid-write
    (tmp_path / "run" / "checkpoint-6").mkdir()  # killed right after creating the folder
    assert last_complete_checkpoint(tmp_path / "run") == (
        str(tmp_path / "run" / "checkpoint-2"),
        [str(tmp_path / "run" / "checkpoint-6"), str(tmp_path / "run" / "checkpoint-4")],
    )
    full, _ = train(tiny_llama, tmp_path / "full", 2, {})
    resumed, _ = train(tiny_llama, tmp_path / "run", 2, {}, resume=True)
    assert resumed[2:] == full[2:]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no complete checkpoint-N folder"):
        train(tiny_llama, tmp_path / "empty", 2, {}, resume=True)


@pytest.fixture
def sigterm_handler_restored():
    """enable_jit_checkpoint installs a SIGTERM handler that a stopped run keeps; give pytest its own back."""
    import signal

    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def test_a_stop_request_mid_step_saves_that_step_and_resumes_exactly(tiny_llama, tmp_path, sigterm_handler_restored):
    """The stop flag that transformers' SIGTERM handler raises, raised during step 3's rollout: step 3 completes, is
    logged and saved (no in-progress marker left), training stops; resuming from it continues the same run."""
    from trl_guided.checkpoints import INCOMPLETE_MARKER, is_complete

    full, full_weights = train(tiny_llama, tmp_path / "full", 100, {})
    trainer = trainer_for(
        tiny_llama, tmp_path / "part", max_steps=STEPS, learning_rate=1e-2, save_steps=100, enable_jit_checkpoint=True
    )
    generate = trainer._generate_and_score_completions

    def generate_then_signal(inputs):
        output = generate(inputs)
        if trainer.state.global_step == 2:
            trainer._stop_on_signal._manager.is_checkpoint_requested = True  # what the handler does 3 s after it
        return output

    trainer._generate_and_score_completions = generate_then_signal
    trainer.train()
    checkpoint = tmp_path / "part" / "checkpoint-3"
    assert trainer.state.global_step == 3 and trainer.stop_checkpoint == str(checkpoint)
    assert sorted(p.name for p in (tmp_path / "part").glob("checkpoint-*")) == ["checkpoint-3"]
    assert is_complete(checkpoint) and not (checkpoint / INCOMPLETE_MARKER).exists()
    resumed, resumed_weights = train(tiny_llama, tmp_path / "part", 100, {}, resume=str(checkpoint))
    assert len(resumed) == STEPS and resumed == full  # steps 1-3 from the checkpoint, 4-6 from the resumed run
    assert all(torch.equal(full_weights[name], resumed_weights[name]) for name in full_weights)
    (checkpoint / INCOMPLETE_MARKER).write_text("a save in progress")
    assert not is_complete(checkpoint)


def test_resume_auto_takes_the_newest_complete_checkpoint_or_starts(tiny_llama, tmp_path):
    """`--resume_from_checkpoint auto` (what a requeued Slurm job passes): True when output_dir has a complete
    checkpoint (the trainer then resolves it), None (a fresh start) when it has none or only incomplete ones."""
    from trl_guided.checkpoints import INCOMPLETE_MARKER
    from trl_guided.train import parse_args, resume_point

    output_dir = tmp_path / "run"
    argv = ["--model_name_or_path", tiny_llama, "--output_dir", str(output_dir), "--resume_from_checkpoint", "auto"]
    _, training_args, _ = parse_args(argv)
    assert training_args.resume_from_checkpoint == "auto" and resume_point(training_args) is None
    (output_dir / "checkpoint-2").mkdir(parents=True)
    (output_dir / "checkpoint-2" / "trainer_state.json").write_text("{}")
    assert resume_point(training_args) is True
    (output_dir / "checkpoint-2" / INCOMPLETE_MARKER).write_text("a save in progress")
    assert resume_point(training_args) is None


def test_a_finished_or_stopped_run_leaves_its_process_group(tmp_path):
    """gloo's threads, left to interpreter shutdown, aborted a finished 2-process run once (SIGABRT at exit)."""
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    assert torch.distributed.is_initialized()
    leave_process_group()
    assert not torch.distributed.is_initialized()
    leave_process_group()  # without a process group (one process, no launcher): nothing to do
