"""Which tokens carry the loss beyond the segment scopes: the `low_prob` scope (SPO's probability mask), TRL's
`top_entropy_quantile` on guided rollouts (a shared prefix token counted once), TreeRL's prefix weights, and the
`guidance/trained_fraction` / `guidance/trained_prob` metrics."""

from __future__ import annotations

import math

import pytest
import torch

from trl_guided.guidance import low_prob_mask, prefix_source_rows, share_prefix
from trl_guided.trainer import _LossView

from .common import (
    FIXED_ADVANTAGES,
    G,
    group_batch,
    guided_trainer,
    hidden_and_embedding_grads,
    losses,
    scored_batch,
    trainer_for,
)


def sampling_probabilities(trainer, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability and entropy of every completion token under the policy, from a plain forward (no fused head, no
    shared prefix): softmax of the logits at the sampling temperature."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    width = batch["completion_ids"].size(1)
    with torch.no_grad():
        logits = trainer.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -width - 1 : -1]
    logps = torch.log_softmax(logits.float() / trainer.temperature, dim=-1)
    token_logps = logps.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    entropy = -(logps.exp() * logps).sum(-1)
    return token_logps.exp(), entropy


# ------------------------------------------------------------------------------------------- TRL's entropy quantile


def _entropy_mask(trainer, entropies, mask, prefix_lengths, quantile=0.2):
    prompt_ids = torch.zeros(entropies.size(0), 1, dtype=torch.long)
    completion_ids = torch.zeros_like(entropies, dtype=torch.long)  # every row: the same prompt and prefix ids
    sources = prefix_source_rows(prompt_ids, torch.ones_like(prompt_ids), completion_ids, mask, prefix_lengths)
    trainer._current_loss_view = _LossView(prefix_lengths=prefix_lengths, sources=sources)
    try:
        return trainer.get_high_entropy_mask(entropies, mask, 1 - quantile)
    finally:
        trainer._current_loss_view = None


def test_entropy_quantile_counts_a_shared_prefix_token_once(tiny_llama, tmp_path):
    trainer = trainer_for(tiny_llama, tmp_path, guidance_loss_scope="completion", top_entropy_quantile=0.2)
    # G rows share a 2-token prefix of entropy 5; each row has 3 tokens of its own. Counted once, the 14 values put
    # the 80 % quantile at 3.24 (between 3.2 and 3.3), so 3.3 is trained with the prefix. Counted G times (TRL on
    # its own), the 8 copies of 5 fill the top 20 % and the threshold is 5: only the prefix would be trained.
    own = torch.tensor([[1.0, 2.0, 3.0], [1.1, 2.1, 3.1], [1.2, 2.2, 3.2], [1.3, 2.3, 3.3]])
    entropies = torch.cat([torch.full((G, 2), 5.0), own], dim=1)
    mask = torch.ones(G, 5, dtype=torch.long)
    prefix = torch.full((G,), 2)
    expected = torch.zeros(G, 5, dtype=torch.bool)
    expected[:, :2] = True
    expected[3, 4] = True
    assert torch.equal(_entropy_mask(trainer, entropies, mask, prefix), expected)
    assert torch.equal(trainer.get_high_entropy_mask(entropies, mask, 0.8), expected.logical_and(expected[0]))
    # Ties: all equal entropies all reach the threshold (TRL's `>=`); padding and an empty completion never do.
    mask[1] = 0
    mask[2, 3:] = 0
    tied = _entropy_mask(trainer, torch.ones(G, 5), mask, prefix)
    assert torch.equal(tied, mask.bool())
    # The guidance scope's mask already leaves the prefix out: the same decision as TRL's own.
    guidance_mask = torch.ones(G, 5, dtype=torch.long)
    guidance_mask[:, :2] = 0
    own_only = _entropy_mask(trainer, entropies, guidance_mask, prefix)
    assert torch.equal(own_only, trainer.get_high_entropy_mask(entropies, guidance_mask, 0.8))
    assert own_only.sum() == 3  # 20 % of 12 tokens, rounded up by the interpolated quantile


def test_entropy_quantile_on_a_guided_batch_with_the_shared_prefix_forward(tiny_llama, tmp_path):
    trainer = trainer_for(
        tiny_llama, tmp_path, guidance_loss_scope="completion", top_entropy_quantile=0.2, shared_prefix_loss=True
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._generate_and_score_completions(group_batch(trainer, groups=1))
    decided = {}
    entropy_mask = trainer.get_high_entropy_mask

    def keep(entropies, mask, threshold):
        decided["mask"] = entropy_mask(entropies, mask, threshold)
        return decided["mask"]

    trainer.get_high_entropy_mask = keep
    trainer.compute_loss(trainer.model, batch)
    prefix = batch["guidance_prefix_tokens"]
    assert prefix.min() > 0, "this seed should give a shared prefix"
    _, entropy = sampling_probabilities(trainer, batch)
    mask = (batch["completion_mask"] * batch["tool_mask"]).bool()
    counted = mask.clone()
    counted[1:, : int(prefix[0])] = False  # one group: row 0 holds the prefix, the other rows repeat it
    threshold = torch.quantile(entropy[counted], 0.8)
    expected = share_prefix(entropy >= threshold, torch.zeros(G, dtype=torch.long), prefix) & mask
    close = (entropy - threshold).abs() < 1e-4  # the fused/shared forward rounds differently from this one
    assert torch.equal(decided["mask"][~close], expected[~close])
    assert decided["mask"][:, : int(prefix[0])].all(dim=0).eq(decided["mask"][0, : int(prefix[0])]).all()
    fraction = decided["mask"].sum() / batch["guidance_completion_tokens"].sum()
    assert 0.1 < fraction < 0.5


# ------------------------------------------------------------------------------------------- the low_prob scope


def test_low_prob_mask_comes_from_the_sampling_time_policy(tiny_llama, tmp_path):
    # num_iterations = 2: TRL keeps the sampling-time log-probs as `old_per_token_logps`, and the mask reads them
    # (not a backend's own sampling log-probs, which a vLLM rollout would bring).
    trainer = trainer_for(tiny_llama, tmp_path, guidance_loss_scope="low_prob", num_iterations=2)
    captured = {}
    focus = trainer._focus_loss

    def capture(output, segments, *rest):
        captured["raw"], captured["segments"] = dict(output), segments
        return focus(output, segments, *rest)

    trainer._focus_loss = capture
    trainer.model.train()
    trainer._generate_and_score_completions(group_batch(trainer))
    raw, segments = captured["raw"], captured["segments"]
    old = raw["old_per_token_logps"]
    assert old is not None
    live = raw["completion_mask"].bool()
    threshold = float(old[live].exp().median())  # a threshold that splits the tokens
    trainer._loss_focus.loss_prob_threshold = threshold  # `loss_prob_threshold`, as the trainer wires it
    raw["sampling_per_token_logps"] = torch.zeros_like(old)  # probability 1 everywhere: would train nothing
    batch = trainer._focus_loss(dict(raw), segments)
    prefix = torch.tensor(segments.prefix)
    sources = prefix_source_rows(raw["prompt_ids"], raw["prompt_mask"], raw["completion_ids"], live, prefix)
    expected = low_prob_mask(share_prefix(old, sources, prefix), live, threshold)
    trained = (batch["completion_mask"] * batch["tool_mask"]).bool()
    assert torch.equal(trained, expected)
    assert 0 < trained.sum() < live.sum()
    assert batch["num_items_in_batch"] == trained.sum()
    # A shared prefix token has one decision in every row of its branch set.
    for row in range(trained.size(0)):
        source = int(sources[row])
        assert torch.equal(trained[row, : segments.prefix[row]], trained[source, : segments.prefix[row]])


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"])
def test_low_prob_scope_with_every_loss_type(tiny_llama, tmp_path, loss_type):
    trainer = trainer_for(
        tiny_llama, tmp_path, loss_type=loss_type, guidance_loss_scope="low_prob", loss_prob_threshold=0.05
    )
    trainer.train()
    assert math.isfinite(losses(trainer)[0])
    logged = trainer.state.log_history[0]
    assert 0 < logged["guidance/trained_fraction"] <= 1
    assert logged["guidance/trained_prob"] < 0.05


@pytest.mark.slow
def test_low_prob_gradient_reaches_exactly_the_unlikely_tokens_on_the_embedded_model(embedded, tmp_path):
    trainer = guided_trainer(embedded, tmp_path, guidance_loss_scope="low_prob", shared_prefix_loss=False)
    batch, raw, segments = scored_batch(trainer)
    assert max(segments.prefix) > 0, "this seed should give a shared prefix; pick another seed"
    probability, _ = sampling_probabilities(trainer, raw)
    live = raw["completion_mask"].bool()
    trained = (batch["completion_mask"] * batch["tool_mask"]).bool()
    near = (probability - 0.9).abs() < 1e-4  # the fused head rounds differently from this forward
    assert torch.equal(trained[~near], ((probability < 0.9) & live)[~near])
    assert 0 < trained.sum() < live.sum(), "SmolLM2 is sure of some tokens and unsure of others"
    for row in range(trained.size(0)):  # the shared prefix: one decision per token in every row
        assert torch.equal(trained[row, : segments.prefix[row]], trained[0, : segments.prefix[row]])
    hidden, _ = hidden_and_embedding_grads(trainer, batch)
    prompt_width = batch["prompt_ids"].size(1)
    predicted_at = hidden[:, prompt_width - 1 : prompt_width - 1 + trained.size(1)]
    assert torch.all(predicted_at[trained] > 0), "a trained token received no gradient"
    assert torch.all(predicted_at[~trained] == 0), "a likely or padding token received gradient"
    assert torch.all(FIXED_ADVANTAGES != 0)


# ------------------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    "overrides",
    [
        dict(guidance_loss_scope="guidance"),
        dict(guidance_loss_scope="guidance_postfix"),
        dict(guidance_loss_scope="completion", top_entropy_quantile=0.2),
        dict(guidance_loss_scope="low_prob", loss_prob_threshold=0.05, shared_prefix_loss=False),
        dict(guidance_loss_scope="low_prob", loss_prob_threshold=0.05, num_iterations=2, max_steps=2),
    ],
    ids=["guidance", "guidance_postfix", "completion_top20", "low_prob", "low_prob_two_iterations"],
)
def test_trained_fraction_and_probability_are_logged_for_every_scope(tiny_llama, tmp_path, overrides):
    trainer = trainer_for(tiny_llama, tmp_path, **overrides)
    trainer.train()
    assert all(math.isfinite(x) for x in losses(trainer))
    logged = trainer.state.log_history[0]
    fraction, probability = logged["guidance/trained_fraction"], logged["guidance/trained_prob"]
    assert 0 < fraction <= 1 and 0 < probability < 1
    if "top_entropy_quantile" in overrides:
        assert fraction == pytest.approx(0.2, abs=0.1)
    elif "loss_prob_threshold" in overrides:  # the tiny random model is unsure of nearly every token
        assert probability < overrides["loss_prob_threshold"]
    else:
        assert fraction < 1
