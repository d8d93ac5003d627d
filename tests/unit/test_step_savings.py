"""The exact savings of a training step (`trl_guided.step_savings`): the same steps with each saving on and off in
one process give the same weights (plain SGD, so a weight difference is the gradient difference times the rate);
the bookkeeping functions on their own; and the weighted-mean scale of a fractional scope (`LossFocus.weighted_mean`).
"""

from __future__ import annotations

import pytest
import torch

import trl_guided.loss_focus as loss_focus_module
from trl_guided.step_savings import (
    StepSavings,
    grouped_order,
    normaliser_scale,
    rows_to_keep,
    select_rows,
    training_rows,
    trim_right_padding,
)

from .common import FIXED_ADVANTAGES, G, dataset, guided_trainer, scored_batch, trainer_for

OFF = dict(skip_zero_advantage_rows=False, trim_loss_padding=False, group_micro_batches=False)


def half_constant_reward(completions, prompts, **kwargs):
    """Groups of even prompts get one reward for every row (advantage 0), odd ones a length reward."""
    rewards = []
    for prompt, completion in zip(prompts, completions, strict=True):
        number = int(prompt[-1]["content"].split()[2].rstrip(","))
        rewards.append(0.5 if number % 2 == 0 else -abs(30 - len(completion[0]["content"])) / 30)
    return rewards


def trained_weights(model_path, tmp_path, savings: bool, **overrides):
    torch.manual_seed(0)
    values = dict(
        per_device_train_batch_size=G,
        gradient_accumulation_steps=2,  # two groups a step, one micro-batch of G rows each
        max_steps=2,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
    )
    values.update(overrides)
    if not savings:
        values.update(OFF)
    trainer = trainer_for(model_path, tmp_path / ("on" if savings else "off"), reward=half_constant_reward, **values)
    trainer.train()
    skipped = [entry.get("savings/skipped_rows", 0.0) for entry in trainer.state.log_history if "loss" in entry]
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}, skipped, trainer


@pytest.mark.parametrize(
    "overrides",
    [
        dict(loss_type="dapo"),
        dict(loss_type="grpo"),
        dict(loss_type="bnpo"),
        dict(loss_type="dr_grpo"),
        dict(loss_type="dapo", guidance=False),
        dict(loss_type="grpo", guidance=False),
        dict(loss_type="dapo", guidance_loss_scope="completion"),
        dict(loss_type="grpo", num_iterations=2),
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_savings_leave_the_weights_as_they_are(tiny_llama, tmp_path, overrides):
    with_savings, skipped, trainer = trained_weights(tiny_llama, tmp_path, True, **overrides)
    without, _, _ = trained_weights(tiny_llama, tmp_path, False, **overrides)
    assert any(s > 0 for s in skipped), "no zero-advantage row was left out: the test saw no saving"
    assert "skip_zero_advantage_rows" not in trainer._savings.refusals
    for name, value in with_savings.items():
        torch.testing.assert_close(value, without[name], rtol=1e-5, atol=1e-6, msg=name)


def test_training_moves_the_weights_at_all(tiny_llama, tmp_path):
    """The weight comparison above means something: the same run with an untouched model differs."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 - only this test loads the untrained weights

    trained, _, _ = trained_weights(tiny_llama, tmp_path, True)
    start = dict(AutoModelForCausalLM.from_pretrained(tiny_llama).named_parameters())
    assert max((trained[name] - start[name]).abs().max() for name in trained) > 1e-4
