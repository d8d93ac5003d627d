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

from .common import G, scored_batch, trainer_for

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


@pytest.mark.parametrize(
    "overrides",
    [dict(beta=0.04), dict(top_entropy_quantile=0.5), dict(loss_type="bnpo", entropy_coef=0.01)],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_savings_fall_back_where_they_would_not_be_exact(tiny_llama, tmp_path, overrides):
    with_savings, skipped, trainer = trained_weights(tiny_llama, tmp_path, True, **overrides)
    without, _, _ = trained_weights(tiny_llama, tmp_path, False, **overrides)
    assert "skip_zero_advantage_rows" in trainer._savings.refusals  # (the layout stays exact with KL alone)
    assert not any(skipped)
    for name, value in with_savings.items():
        torch.testing.assert_close(value, without[name], rtol=1e-5, atol=1e-6, msg=name)


def test_training_moves_the_weights_at_all(tiny_llama, tmp_path):
    """The weight comparison above means something: the same run with an untouched model differs."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 - only this test loads the untrained weights

    trained, _, _ = trained_weights(tiny_llama, tmp_path, True)
    start = dict(AutoModelForCausalLM.from_pretrained(tiny_llama).named_parameters())
    assert max((trained[name] - start[name]).abs().max() for name in trained) > 1e-4


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_scaling_every_loss_weight_leaves_loss_and_gradient_unchanged(tiny_llama, tmp_path, monkeypatch, loss_type):
    """At beta > 0 the policy-gradient term of the fractional scope is the weighted mean of its token terms while
    the KL term keeps its per-token mean: multiplying every loss weight by a constant changes neither."""
    trainer = trainer_for(
        tiny_llama, tmp_path, guidance_loss_scope="guidance_postfix", postfix_decay=0.7, beta=0.04, loss_type=loss_type
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    _, raw, segments = scored_batch(trainer)  # advantages FIXED_ADVANTAGES: every row trains
    assert raw["ref_per_token_logps"] is not None, "no KL term: the test would not test the scale"
    original = loss_focus_module.loss_weights
    results = []
    for factor in (1.0, 3.0):
        monkeypatch.setattr(loss_focus_module, "loss_weights", lambda *a, f=factor, **k: f * original(*a, **k))
        batch = trainer._focus_loss(dict(raw), segments)
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
        results.append((loss.detach(), grads))
    (loss_1, grads_1), (loss_3, grads_3) = results
    assert grads_1.abs().max() > 0
    torch.testing.assert_close(loss_3, loss_1, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads_3, grads_1, rtol=1e-4, atol=1e-7)


def test_weighted_mean_averages_the_weights_to_one_over_the_normalisers_tokens():
    weights = torch.tensor([[1.0, 0.5, 0.25, 0.0], [1.0, 1.0, 0.0, 0.0]])
    mask = (weights > 0).float()
    for loss_type, expected in (("grpo", torch.tensor([3 / 1.75, 1.0])), ("dapo", torch.tensor([5 / 3.75] * 2))):
        focus = loss_focus_module.LossFocus(loss_type=loss_type)
        output = focus.weighted_mean({"advantages": weights.clone()}, weights, mask)
        torch.testing.assert_close(output["advantages"], weights * expected.unsqueeze(1))
    bnpo = loss_focus_module.LossFocus(loss_type="bnpo")
    output = bnpo.weighted_mean({"advantages": weights.clone()}, weights, mask)
    output.update(completion_mask=torch.ones(2, 4), tool_mask=mask)
    torch.testing.assert_close(bnpo.micro_batch(output)["advantages"], weights * 5 / 3.75)


def batch_of(advantages, lengths, prompts):
    """A scored batch: right-padded completions of `lengths`, one prompt id per row from `prompts`."""
    rows, width = len(lengths), max(lengths) + 2
    completion_mask = (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()
    return {
        "prompt_ids": torch.tensor(prompts).unsqueeze(1),
        "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
        "completion_ids": torch.arange(rows * width).view(rows, width),
        "completion_mask": completion_mask,
        "advantages": torch.tensor(advantages),
        "num_items_in_batch": torch.tensor(float(completion_mask.sum())),
        "texts": [f"row {i}" for i in range(rows)],
    }


def test_normaliser_scale_keeps_each_loss_types_denominator():
    batch = batch_of([0.0, 1.0, 0.0, -1.0], [3, 5, 2, 4], [7, 7, 7, 7])
    kept = torch.tensor([1, 3])
    for loss_type in ("grpo", "sapo", "luspo", "dr_grpo"):
        assert normaliser_scale(loss_type, batch, kept) == 0.5
    for loss_type in ("dapo", "cispo", "vespo"):
        assert normaliser_scale(loss_type, batch, kept) == 1.0
    assert normaliser_scale("bnpo", batch, kept) == pytest.approx(9 / 14)
    with pytest.raises(ValueError, match="Unknown loss type"):
        normaliser_scale("ppo", batch, kept)


def test_rows_to_keep_tops_up_to_the_busiest_process_and_never_runs_empty():
    batch = batch_of([0.0, 1.0, 0.0, 0.0], [3, 5, 1, 4], [7, 7, 7, 7])
    trains = training_rows(batch)
    assert rows_to_keep(batch, trains, lambda t: t).tolist() == [1]
    busiest = lambda t: torch.cat([t, t.new_tensor([3])])  # noqa: E731 - another process keeps 3 rows
    assert rows_to_keep(batch, trains, busiest).tolist() == [0, 1, 2]  # the shortest zero rows fill up
    idle = batch_of([0.0] * 4, [3, 5, 1, 4], [7, 7, 7, 7])
    assert rows_to_keep(idle, training_rows(idle), lambda t: t).tolist() == [2]
    weighted = dict(batch, advantages=torch.zeros(4, 7), tool_mask=torch.ones(4, 7))
    weighted["advantages"][0, 6] = 1.0  # beyond row 0's completion: masked, so the row does not train
    assert not training_rows(weighted).any()


def test_select_rows_and_trim_keep_rows_lists_and_scalars_aligned():
    batch = batch_of([0.0, 1.0, 0.0, -1.0], [3, 5, 2, 4], [7, 7, 8, 8])
    picked = select_rows(batch, torch.tensor([1, 3]))
    assert picked["texts"] == ["row 1", "row 3"] and picked["num_items_in_batch"] is batch["num_items_in_batch"]
    trimmed = trim_right_padding(dict(picked, advantages=torch.ones(2, 7)))
    assert trimmed["completion_ids"].size(1) == 5 and trimmed["advantages"].shape == (2, 5)
    assert torch.equal(trimmed["completion_ids"], picked["completion_ids"][:, :5])
    assert trim_right_padding(picked, pad_to_multiple_of=4)["completion_mask"].size(1) == 7  # 8 > 7: nothing to drop


def test_layout_keeps_groups_together_training_groups_first():
    # Rows as TRL's shuffle leaves them: groups 5 (trains), 6 (advantage 0) and 9 (trains) interleaved.
    batch = batch_of([0.0, 1.0, 0.5, 0.0, -1.0, 0.0], [2, 3, 6, 4, 5, 1], [6, 5, 9, 6, 5, 9])
    batch["advantages"][5] = -0.5
    micro_batches = [select_rows(batch, torch.arange(i, i + 2)) for i in (0, 2, 4)]
    order = grouped_order(batch)
    assert batch["prompt_ids"][order].flatten().tolist() == [9, 9, 5, 5, 6, 6]  # longest training group first
    laid_out = StepSavings().layout(micro_batches)
    assert [b["prompt_ids"].flatten().tolist() for b in laid_out] == [[9, 9], [5, 5], [6, 6]]
    assert sorted(t for b in laid_out for t in b["texts"]) == sorted(batch["texts"])
    assert StepSavings(loss_type="bnpo").layout(micro_batches) is micro_batches


def test_refusals_name_the_settings_that_are_not_exact():
    assert StepSavings().refusals == {}
    savings = StepSavings(beta=0.04, top_entropy_quantile=0.2, ot=True, loss_type="bnpo")
    assert "beta > 0" in savings.refusals["skip_zero_advantage_rows"]
    assert "top_entropy_quantile" in savings.refusals["group_micro_batches"]
    assert "bnpo" in savings.refusals["group_micro_batches"] and "OT" in savings.refusals["trim_loss_padding"]
    assert not savings.active("skip_zero_advantage_rows") and not StepSavings(trim_loss_padding=False).active(
        "trim_loss_padding"
    )
    uneven = StepSavings(gradient_accumulation_steps=2, steps_per_generation=4)
    assert "steps_per_generation" in uneven.refusals["group_micro_batches"]


def test_plain_grpo_shares_the_prompt_except_under_multi_process_zero3(tiny_llama, tmp_path, monkeypatch):
    trainer = trainer_for(tiny_llama, tmp_path, guidance=False)
    assert trainer._shares_prefix(trainer.model, False, {})  # guidance off: each group's prompt is encoded once
    trainer._backend.zero3 = True  # one forward per group; ZeRO-3 gathers are collectives: equal calls needed
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 2))
    assert not trainer._shares_prefix(trainer.model, False, {})
