"""The OT regularizer inside GuidedGRPOTrainer: references, KL, LoRA, hooks, gradients, metrics."""

from __future__ import annotations

import logging
import math

import pytest
from trl import GRPOTrainer

from trl_guided import GuidedGRPOTrainer
from trl_guided.backends import decoder_of
from trl_guided.config import GuidedGRPOConfig

from .common import G, config, dataset, group_batch, losses, reward_len


def ot_trainer(model, tmp_path, peft_config=None, **overrides):
    values = dict(ot_coef=0.5, ot_window=4, ot_epsilon=0.5, ot_iterations=20, guidance_loss_scope="completion")
    values.update(overrides)
    return GuidedGRPOTrainer(
        model=model,
        reward_funcs=reward_len,
        args=config(tmp_path, **values),
        train_dataset=dataset(),
        peft_config=peft_config,
    )


def ot_metrics(trainer):
    entry = next(e for e in trainer.state.log_history if "ot/cost" in e)
    return entry["ot/cost"], entry["ot/penalty"], entry["ot/marginal_error"]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(ot_reference="ref"),
        dict(ot_reference="ref", beta=0.05),
        dict(ot_reference="old", num_iterations=2, max_steps=2),
        dict(ot_reference="ref", ot_debiased=True, guidance_loss_scope="guidance"),
        dict(ot_reference="ref", ot_tolerance=1e-3, ot_iterations=200, ot_target=0.01),
    ],
    ids=["ref", "ref_with_kl", "old_num_iterations", "debiased_guidance_scope", "tolerance_target"],
)
def test_ot_trains_with_each_reference(tiny_llama, tmp_path, overrides):
    trainer = ot_trainer(tiny_llama, tmp_path, **overrides)
    if overrides.get("beta"):
        assert trainer.ref_model is not None and trainer._ot.model is None  # TRL's reference is reused
    elif overrides["ot_reference"] == "ref":
        assert trainer._ot.model is not None and trainer.ref_model is None  # built because beta == 0
    trainer.train()
    cost, penalty, error = ot_metrics(trainer)
    assert all(math.isfinite(v) for v in (cost, penalty, error, *losses(trainer)))
    assert penalty >= 0 and error >= 0
    if overrides.get("beta"):
        assert "kl" in trainer.state.log_history[0]


def test_old_reference_on_policy_warns_and_uses_current_states(tiny_llama, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_guided.trainer"):
        trainer = ot_trainer(tiny_llama, tmp_path, ot_reference="old", ot_debiased=True)
    assert "compares the policy with itself" in caplog.text and "ot_reference='ref'" in caplog.text
    trainer.train()
    cost, penalty, _ = ot_metrics(trainer)
    assert abs(cost) < 1e-5 and penalty < 1e-5  # debiased divergence of a policy with itself is 0


def test_ot_with_lora_uses_the_adapter_disabled_base(tiny_llama, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = ot_trainer(tiny_llama, tmp_path, peft_config=lora, max_steps=2)
    assert trainer._ot.model is None and trainer.ref_model is None
    trainer.train()
    assert all(math.isfinite(v) for v in ot_metrics(trainer))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_ot_gradient_reaches_the_policy(tiny_llama, tmp_path, monkeypatch, checkpointing):
    trainer = ot_trainer(tiny_llama, tmp_path, gradient_checkpointing=checkpointing, ot_reference="ref")
    trainer.model.train()
    inputs = trainer._generate_and_score_completions(group_batch(trainer))
    assert inputs["ot_reference_states"].shape[:2] == inputs["completion_ids"].shape
    parent = GRPOTrainer.compute_loss
    # Silence the policy-gradient term: whatever gradient remains comes from the OT penalty.
    monkeypatch.setattr(GRPOTrainer, "compute_loss", lambda self, *a, **k: parent(self, *a, **k) * 0.0)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    assert loss.item() > 0
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum().item() for g in grads) > 0


def test_hooks_are_removed_after_each_step(tiny_llama, tmp_path):
    trainer = ot_trainer(tiny_llama, tmp_path, max_steps=2)
    backbone = decoder_of(trainer.model)
    hooks_before = dict(backbone._forward_hooks)
    trainer.train()
    assert trainer.state.global_step == 2
    assert dict(backbone._forward_hooks) == hooks_before


def test_reference_states_can_live_on_cpu(tiny_llama, tmp_path):
    trainer = ot_trainer(tiny_llama, tmp_path, ot_reference_on_cpu=True)
    trainer.model.train()
    inputs = trainer._generate_and_score_completions(group_batch(trainer))
    assert inputs["ot_reference_states"].device.type == "cpu"
    trainer.train()
    assert math.isfinite(ot_metrics(trainer)[0])


def test_ot_off_adds_nothing(tiny_llama, tmp_path):
    trainer = ot_trainer(tiny_llama, tmp_path, ot_coef=0.0)
    trainer.model.train()
    inputs = trainer._generate_and_score_completions(group_batch(trainer))
    assert "ot_reference_states" not in inputs and trainer._ot is None
    trainer.train()
    assert not any(k.startswith("ot/") for e in trainer.state.log_history for k in e)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(ot_coef=-1.0), "ot_coef=-1.0"),
        (dict(ot_epsilon=0.0), "ot_epsilon=0.0"),
        (dict(ot_window=-1), "ot_window=-1"),
        (dict(ot_iterations=0), "ot_iterations=0"),
        (dict(ot_reference="initial"), "ot_reference='initial'"),
        (dict(ot_tolerance=0.0), "ot_tolerance=0.0"),
    ],
)
def test_ot_config_validation(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **overrides)
    with pytest.raises(ValueError, match=message):  # also validated when guidance is off
        GuidedGRPOConfig(output_dir=str(tmp_path), guidance=False, num_generations=G, **overrides)
