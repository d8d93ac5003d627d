"""The shared-prefix loss forward (Prefix Grouper): same log-probs, entropies and gradients as the plain forward."""

from __future__ import annotations

import pytest
import torch

from trl_guided.shared_prefix import shared_prefix_groups, shared_prefix_logps

from .common import group_batch, losses, trainer_for


def test_shared_prefix_loss_forward_matches_the_plain_forward(tiny_model, tmp_path, monkeypatch):
    """Prefix Grouper: same log-probs, entropies and gradients as TRL's plain forward on a real guided batch."""
    import trl_guided.trainer as trainer_module

    trainer = trainer_for(tiny_model, tmp_path, guidance_loss_scope="completion")
    batch = trainer._generate_and_score_completions(group_batch(trainer))
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    width = batch["completion_ids"].size(1)
    calls = []
    monkeypatch.setattr(
        trainer_module, "shared_prefix_logps", lambda *a, **k: calls.append(1) or shared_prefix_logps(*a, **k)
    )

    def run(shared):
        trainer.args.shared_prefix_loss = shared
        trainer.model.zero_grad()
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, width, compute_entropy=True
        )
        weights = torch.linspace(-1, 1, logps.numel()).view_as(logps)
        ((logps + entropies) * weights * batch["completion_mask"]).sum().backward()
        grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
        return logps.detach(), entropies.detach(), grads

    plain = run(False)
    assert calls == []
    shared = run(True)
    assert calls == [1]
    mask = batch["completion_mask"].bool()
    torch.testing.assert_close(shared[0][mask], plain[0][mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[1][mask], plain[1][mask], rtol=1e-5, atol=1e-5)
    assert len(shared[2]) == len(plain[2])
    for got, want in zip(shared[2], plain[2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_shared_prefix_training_step_equals_plain_step(tiny_llama, tmp_path, monkeypatch):
    import trl_guided.trainer as trainer_module

    calls = []
    monkeypatch.setattr(
        trainer_module, "shared_prefix_logps", lambda *a, **k: calls.append(1) or shared_prefix_logps(*a, **k)
    )

    def one_step(shared, **overrides):
        torch.manual_seed(0)
        trainer = trainer_for(tiny_llama, tmp_path / str(shared), shared_prefix_loss=shared, max_steps=2, **overrides)
        trainer.train()
        return losses(trainer), [p.detach().clone() for p in trainer.model.parameters()]

    one_step(True, gradient_checkpointing=True)
    assert calls == []  # checkpointed layers drop the cache: the plain forward runs
    plain_losses, plain_params = one_step(False, gradient_checkpointing=False)
    assert calls == []
    shared_losses, shared_params = one_step(True, gradient_checkpointing=False)
    assert len(calls) == 2  # one loss forward per step
    assert shared_losses == pytest.approx(plain_losses, rel=1e-4, abs=1e-6)
    for got, want in zip(shared_params, plain_params, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_shared_prefix_groups_rows_by_prompt_and_common_prefix():
    ids = torch.tensor([[0, 5, 6, 7, 8, 9], [0, 5, 6, 7, 8, 1], [3, 4, 6, 7, 2, 2], [0, 5, 6, 1, 2, 3]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]])
    groups, singles = shared_prefix_groups(ids, mask, prompt_width=3)
    assert [(rows.tolist(), shared) for rows, shared in groups] == [([0, 1, 3], 3)]
    assert singles.tolist() == [2]
    ids[3, 3:5] = ids[0, 3:5]  # the third row now also shares the first two completion tokens
    mask[3] = mask[0]
    groups, _ = shared_prefix_groups(ids, mask, prompt_width=3)
    assert [(rows.tolist(), shared) for rows, shared in groups] == [([0, 1, 3], 5)]


def test_shared_prefix_finds_the_model_config_inside_wrappers(tiny_llama):
    """A DeepSpeedEngine wraps the model in `.module` and has a `.config` of its own (its JSON config, a dict)."""
    from transformers import AutoModelForCausalLM

    from trl_guided.shared_prefix import _config_of

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)

    class EngineLike(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.config = module, {"zero_optimization": {"stage": 3}}

    assert _config_of(EngineLike(model)) is model.config
    assert _config_of(model) is model.config


def test_nested_groups_split_a_prompt_group_into_its_branch_sets():
    # One prompt (2 columns), two branch sets whose prefixes differ at the first completion column.
    ids = torch.tensor(
        [
            [1, 2, 5, 6, 7, 8, 9, 3],
            [1, 2, 5, 6, 7, 8, 4, 4],
            [1, 2, 9, 9, 9, 9, 9, 3],
            [1, 2, 9, 9, 9, 9, 1, 1],
        ]
    )
    mask = torch.ones_like(ids)
    groups, singles = shared_prefix_groups(ids, mask, prompt_width=2)
    assert [(rows.tolist(), shared) for rows, shared in groups] == [([0, 1, 2, 3], 2)]
    groups, singles = shared_prefix_groups(ids, mask, prompt_width=2, nested=True)
    assert sorted((rows.tolist(), shared) for rows, shared in groups) == [([0, 1], 6), ([2, 3], 6)]
    assert singles.numel() == 0
    # Splitting would re-encode a long shared part to save little: kept whole.
    ids[:, :6] = ids[0, :6]
    ids[2:, 6] = 4
    groups, _ = shared_prefix_groups(ids, mask, prompt_width=2, nested=True)
    assert [(rows.tolist(), shared) for rows, shared in groups] == [([0, 1, 2, 3], 6)]


def test_shared_prefix_forward_stays_exact_with_k_prefixes(tiny_llama, tmp_path):
    # Branch sets of 4 rows with prefixes of 8+ tokens: encoding each set's prefix once saves more than re-encoding
    # the prompt costs, so the nested split applies.
    trainer = trainer_for(
        tiny_llama,
        tmp_path,
        guidance_loss_scope="completion",
        branch_point="random",
        num_prefixes_per_group=2,
        num_generations=8,
        per_device_train_batch_size=8,
        max_completion_length=40,
        prefix_min_tokens=12,
        prefix_max_tokens=20,
        branch_min_prefix_tokens=8,
    )
    batch = trainer._generate_and_score_completions(group_batch(trainer))
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    width = batch["completion_ids"].size(1)
    prompt_width = input_ids.size(1) - width
    flat, _ = shared_prefix_groups(input_ids, attention_mask, prompt_width)
    nested, _ = shared_prefix_groups(input_ids, attention_mask, prompt_width, nested=True)
    assert len(nested) > len(flat), "the branch sets were not encoded separately"

    def run(shared):
        trainer.args.shared_prefix_loss = shared
        trainer.model.zero_grad()
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, width, compute_entropy=True
        )
        weights = torch.linspace(-1, 1, logps.numel()).view_as(logps)
        ((logps + entropies) * weights * batch["completion_mask"]).sum().backward()
        return logps.detach(), entropies.detach(), [p.grad.clone() for p in trainer.model.parameters()]

    plain, shared = run(False), run(True)
    mask = batch["completion_mask"].bool()
    torch.testing.assert_close(shared[0][mask], plain[0][mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[1][mask], plain[1][mask], rtol=1e-5, atol=1e-5)
    for got, want in zip(shared[2], plain[2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
