"""NaN and inf never reach the weights: infinite or missing rewards, a non-finite OT cost and a non-finite loss are
each injected into a real training run on a tiny model; the step is neutralised, counted and warned about, and
training goes on."""

from __future__ import annotations

import logging

import pytest
import torch
from trl import GRPOTrainer

import trl_guided.ot_reference as ot_reference_module
import trl_guided.trainer as trainer_module

from .common import G, reward_len, trainer_for


def _weights(trainer):
    return {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}


def _all_finite(weights) -> bool:
    return all(torch.isfinite(value).all() for value in weights.values())


def _logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), None, float("nan")])
def test_rewards_without_a_finite_value(tiny_llama, tmp_path, bad, caplog):
    def reward(completions, **kwargs):
        values = reward_len(completions)
        values[0] = bad  # the first completion of every step's first group
        return values

    trainer = trainer_for(tiny_llama, tmp_path, reward=reward, max_steps=2, learning_rate=1e-2)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert _all_finite(_weights(trainer))
    assert all(map(lambda v: v == v, _logged(trainer, "loss")))  # no NaN loss
    assert (
        _logged(trainer, "guidance/nonfinite_rewards") == [pytest.approx(1 / G)] * 2
    )  # one of the G completions per step
    if bad in (float("inf"), float("-inf")):
        assert "reward function(s) reward returned inf for 1 completion(s)" in caplog.text


@pytest.mark.parametrize("override", [True, False])
def test_an_infinite_reward_does_not_erase_its_group(tiny_llama, tmp_path, monkeypatch, override):
    """TRL alone turns one infinite reward into a group std of inf: every other completion of the group gets advantage
    0 (no gradient at all here); read as "no reward", the other completions keep their signal."""
    if not override:
        monkeypatch.setattr(trainer_module.GuidedGRPOTrainer, "_calculate_rewards", GRPOTrainer._calculate_rewards)

    def reward(completions, **kwargs):
        return [float("inf")] + reward_len(completions)[1:]

    trainer = trainer_for(tiny_llama, tmp_path, reward=reward, max_steps=1, learning_rate=1e-2)
    trainer.train()
    step = trainer.state.log_history[0]
    if override:
        assert step["grad_norm"] > 0 and step["reward"] < float("inf")
    else:
        assert step["grad_norm"] == 0 and step["reward"] == float("inf")


def test_a_nan_loss_becomes_a_zero_gradient_step(tiny_llama, tmp_path, monkeypatch, caplog):
    compute_loss = GRPOTrainer.compute_loss
    calls = []

    def nan_on_first_step(self, model, inputs, *args, **kwargs):
        loss = compute_loss(self, model, inputs, *args, **kwargs)
        calls.append(1)
        return loss * float("nan") if len(calls) == 1 else loss

    monkeypatch.setattr(GRPOTrainer, "compute_loss", nan_on_first_step)
    trainer = trainer_for(tiny_llama, tmp_path, max_steps=1, learning_rate=1e-2)
    start = _weights(trainer)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    after_nan_step = _weights(trainer)
    # AdamW's first step with a zero gradient moves nothing (no weight decay by default).
    assert all(torch.equal(start[name], after_nan_step[name]) for name in start)
    assert _logged(trainer, "guidance/nonfinite_loss") == [1.0]
    assert "Non-finite loss at step 0" in caplog.text

    trainer = trainer_for(tiny_llama, tmp_path / "next", max_steps=2, learning_rate=1e-2)
    calls.clear()
    trainer.train()  # the second step trains normally
    assert _all_finite(_weights(trainer))
    assert not all(torch.equal(start[name], value) for name, value in _weights(trainer).items())


def test_a_nan_ot_cost_leaves_the_ot_term_out(tiny_llama, tmp_path, monkeypatch, caplog):
    solve = ot_reference_module.banded_sinkhorn_with_stats

    def nan_cost(*args, **kwargs):
        result = solve(*args, **kwargs)
        result.cost = result.cost * float("nan")
        return result

    monkeypatch.setattr(ot_reference_module, "banded_sinkhorn_with_stats", nan_cost)
    trainer = trainer_for(tiny_llama, tmp_path, max_steps=2, learning_rate=1e-2, ot_coef=0.5, beta=0.0)
    start = _weights(trainer)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    weights = _weights(trainer)
    assert _all_finite(weights) and not all(torch.equal(start[n], weights[n]) for n in start)  # the policy trained
    assert _logged(trainer, "guidance/nonfinite_ot") == [1.0, 1.0]
    assert "the OT cost is not finite" in caplog.text
