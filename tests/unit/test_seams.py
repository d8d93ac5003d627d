"""The trainer's helpers built from plain values, without a trainer: the loss-scope table, `LossFocus`,
`RolloutBackend`'s token budgets, `ModelBackend` (the trainerless generation backend) and `StopOnSignal`'s refusal."""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from trl_guided import GuidedGRPOConfig
from trl_guided.backends import ModelBackend, RolloutBackend, TRLGeneration, cut_after_eos
from trl_guided.guidance import LOSS_SCOPES, Segments, loss_weights
from trl_guided.loss_focus import LossFocus
from trl_guided.preemption import StopOnSignal

SEGMENTS = Segments(prefix=[2, 0], guidance=[3, 2], postfix=[2, 4])
WIDTH = 8


# ---------------------------------------------------------------------------------------------- the scope table


def test_the_configs_scopes_are_the_tables(tmp_path):
    help_text = GuidedGRPOConfig.__dataclass_fields__["guidance_loss_scope"].metadata["help"]
    assert all(name in help_text for name in LOSS_SCOPES)
    for name in LOSS_SCOPES:
        assert GuidedGRPOConfig(output_dir=str(tmp_path), guidance_loss_scope=name).guidance_loss_scope == name
    with pytest.raises(ValueError, match="guidance_loss_scope='postfix' is unknown"):
        GuidedGRPOConfig(output_dir=str(tmp_path), guidance_loss_scope="postfix")


@pytest.mark.parametrize("name", list(LOSS_SCOPES))
def test_each_scopes_flags_say_what_its_weights_train(tmp_path, name):
    scope = LOSS_SCOPES[name]
    weights = loss_weights(SEGMENTS, WIDTH, name, postfix_decay=0.5)
    columns = torch.arange(WIDTH).unsqueeze(0)
    prefix_end = torch.tensor(SEGMENTS.prefix).unsqueeze(1)
    guidance_end = torch.tensor(SEGMENTS.guidance_end).unsqueeze(1)
    in_guidance = (columns >= prefix_end) & (columns < guidance_end)
    assert bool((weights[in_guidance] == 1).all())  # every scope trains the guidance tokens at full weight
    assert scope.trains_prefix == bool((weights[columns < prefix_end] > 0).all())
    assert scope.ends_at_guidance == bool((weights[columns >= guidance_end] == 0).all())
    assert scope.fractional == bool(((weights > 0) & (weights < 1)).any())
    # The config's TreeRL check reads the same entry: TreeRL needs the prefix tokens trained.
    treerl = dict(tree_advantage="treerl", num_prefixes_per_group=2, num_generations=4)
    treerl.update(per_device_train_batch_size=4, multi_objective_aggregation="sum_then_normalize")
    if scope.trains_prefix:
        GuidedGRPOConfig(output_dir=str(tmp_path), guidance_loss_scope=name, **treerl)
    else:
        with pytest.raises(ValueError, match="does not train"):
            GuidedGRPOConfig(output_dir=str(tmp_path), guidance_loss_scope=name, **treerl)


# ---------------------------------------------------------------------------------------------------- LossFocus


def scored_batch():
    """A TRL-like scored batch of the two rows of SEGMENTS (completion mask up to each row's end)."""
    ends = torch.tensor(SEGMENTS.guidance_end) + torch.tensor(SEGMENTS.postfix)
    return {
        "prompt_ids": torch.tensor([[1, 2], [3, 4]]),
        "prompt_mask": torch.ones(2, 2, dtype=torch.long),
        "completion_ids": torch.arange(2 * WIDTH).view(2, WIDTH) + 10,
        "completion_mask": (torch.arange(WIDTH).unsqueeze(0) < ends.unsqueeze(1)).long(),
        "advantages": torch.tensor([1.0, -2.0]),
    }


def test_loss_focus_from_plain_values_narrows_a_batch_to_the_guidance():
    logged = []
    focus = LossFocus(scope="guidance", log_metric=lambda name, value: logged.append((name, value)))
    batch = focus.apply(scored_batch(), SEGMENTS)
    keep = max(SEGMENTS.guidance_end)  # the columns after the last guidance token are dropped
    assert batch["completion_ids"].size(1) == batch["tool_mask"].size(1) == keep
    assert batch["tool_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["num_items_in_batch"].item() == 5 and batch["advantages"].tolist() == [1.0, -2.0]
    assert logged == [("guidance/trained_tokens", 2.5)]
    assert batch["guidance_completion_tokens"].tolist() == [7, 6]  # counted before the columns were dropped
    padded = LossFocus(scope="guidance", pad_to_multiple_of=4).apply(scored_batch(), SEGMENTS)
    assert padded["completion_ids"].size(1) == 8


def test_loss_focus_weighs_the_postfix_through_the_advantages():
    batch = LossFocus(scope="guidance_postfix", postfix_decay=0.5).apply(scored_batch(), SEGMENTS)
    weights = loss_weights(SEGMENTS, WIDTH, "guidance_postfix", postfix_decay=0.5)
    # The weights are rescaled to average 1 over the trained tokens (dapo: of the whole batch; `weighted_mean`).
    mask = (weights > 0).float() * scored_batch()["completion_mask"]
    mean_weight = (weights * mask).sum() / mask.sum()
    torch.testing.assert_close(batch["advantages"], torch.tensor([[1.0], [-2.0]]) * weights / mean_weight)
    assert batch["tool_mask"].tolist() == (weights > 0).long().tolist()


def test_loss_focus_probability_mask_scores_only_without_old_logps():
    calls = []
    logps = torch.full((2, WIDTH), math.log(0.95))
    logps[0, 3] = logps[1, 4] = math.log(0.5)

    def score(input_ids, attention_mask, logits_to_keep):
        calls.append((tuple(input_ids.shape), logits_to_keep))
        return logps

    focus = LossFocus(scope="low_prob", loss_prob_threshold=0.9, score=score)
    batch = focus.apply(scored_batch(), SEGMENTS)
    assert calls == [((2, 2 + WIDTH), WIDTH)]  # prompt + completion, scored once
    assert batch["tool_mask"].nonzero().tolist() == [[0, 3], [1, 4]]
    with_old = {**scored_batch(), "old_per_token_logps": torch.full((2, WIDTH), math.log(0.5))}
    assert focus.apply(with_old, SEGMENTS)["tool_mask"].sum().item() == 13  # every completion token, no forward
    assert len(calls) == 1
    with pytest.raises(ValueError, match="guidance_loss_scope='postfix' is unknown"):
        LossFocus(scope="postfix")


# ------------------------------------------------------------------------------------------------------ backends


def fake_accelerator():
    state = SimpleNamespace(deepspeed_plugin=None)
    return SimpleNamespace(num_processes=1, device=torch.device("cpu"), state=state, autocast=contextlib.nullcontext)


def test_rollout_backend_sets_each_phases_budget_on_trls_objects_without_a_trainer():
    generation_config, generation_kwargs, seen = GenerationConfig(max_new_tokens=99), {"max_new_tokens": 99}, []

    def plain_generate(prompts, num_generations):
        seen.append((generation_config.max_new_tokens, generation_config.min_new_tokens, dict(generation_kwargs)))
        return [[7] * generation_config.max_new_tokens for _ in prompts], None

    backend = RolloutBackend(
        plain_generate=plain_generate,
        trl=TRLGeneration(generation_config=generation_config, generation_kwargs=generation_kwargs),
        model=lambda: None,
        accelerator=fake_accelerator(),
        args=SimpleNamespace(ds3_gather_for_generation=True),
        tokenizer=SimpleNamespace(eos_token_id=0, pad_token_id=0),
    )
    assert backend.branches_in_one_call and not backend.is_server_collective() and backend.any_process(True)
    ids, logps = backend.generate([[1, 2], [1, 2]], 2, 5, min_new_tokens=2)
    assert seen == [(5, 2, {"max_new_tokens": 5})] and ids == [[7] * 5] * 2 and logps is None
    assert generation_config.max_new_tokens == 99 and generation_config.min_new_tokens is None  # restored
    assert generation_kwargs == {"max_new_tokens": 99}
    assert backend.generate([], 1, 4) == ([], None)  # one process with nothing to do: a throw-away row, cut off


def test_model_backend_samples_and_scores_without_a_trainer(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    eos = [tokenizer.eos_token_id]
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, pad_token_id=tokenizer.pad_token_id)
    backend = ModelBackend(model, tokenizer, config, eos)
    prompts = [ids for ids in [[5, 6, 7, 8], [9, 10]] for _ in range(3)]

    def sample(shared):
        torch.manual_seed(1)
        return backend.generate(prompts, 3, 6, shared_prompts=shared)

    (plain, logps), (shared, _) = sample(False), sample(True)
    assert shared == plain and logps is None  # the shared prefill is exact
    assert all(len(row) <= 6 and eos[0] not in row[:-1] for row in plain)
    assert backend.generate([], 3, 6) == ([], None) and backend.token_signals([], []) == []
    signals = backend.token_signals([[5, 6, 7], [8, 9]], [[10, 11, 12], [13]])
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama)
    for prompt, sample_ids, got in zip([[5, 6, 7], [8, 9]], [[10, 11, 12], [13]], signals, strict=True):
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + sample_ids])).logits[0, len(prompt) - 1 : -1] / 0.7
        p = torch.softmax(logits.double(), dim=-1)
        entropy = -(p * p.log()).sum(-1)
        torch.testing.assert_close(torch.tensor(got.entropies, dtype=torch.double), entropy, rtol=1e-4, atol=1e-5)
        logprob = p.log()[torch.arange(len(sample_ids)), torch.tensor(sample_ids)]
        torch.testing.assert_close(torch.tensor(got.logprobs, dtype=torch.double), logprob, rtol=1e-4, atol=1e-5)


def test_cut_after_eos_keeps_the_first_eos():
    assert cut_after_eos([4, 2, 5, 2], [2, 3]) == [4, 2]
    assert cut_after_eos([4, 5], [2]) == [4, 5]


# -------------------------------------------------------------------------------------------------- StopOnSignal


def test_stop_on_signal_refuses_without_transformers_jit_callback():
    with pytest.raises(RuntimeError, match="Set enable_jit_checkpoint: false"):
        StopOnSignal([], fake_accelerator())


def test_model_backend_records_the_scoring_forwards_signals_while_generating(tiny_llama):
    """`ModelBackend.generate_scored` (guided evaluation) reads the branch-point signals off generation: the same as
    its scoring forward up to float rounding, for rows that end early (EOS) too."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, pad_token_id=tokenizer.pad_token_id)
    backend = ModelBackend(model, tokenizer, config, [tokenizer.eos_token_id])
    prompts = [[5, 6, 7, 8], [9, 10], [11]]
    torch.manual_seed(2)
    samples, logps, recorded = backend.generate_scored(prompts, 1, 9)
    assert logps is None and backend.generate_scored([], 1, 9) == ([], None, [])
    for sample, got, expected in zip(samples, recorded, backend.token_signals(prompts, samples), strict=True):
        assert len(got.entropies) == len(got.logprobs) == len(sample)
        torch.testing.assert_close(torch.tensor(got.entropies), torch.tensor(expected.entropies), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(expected.logprobs), rtol=1e-4, atol=1e-5)
