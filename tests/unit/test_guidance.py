"""Pure guidance logic: the punctuation cut, prefix/guidance clipping, segment budgets and loss weights."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_guided.guidance import (
    DEFAULT_PUNCTUATION,
    BranchRule,
    Segments,
    TokenSignals,
    _mark_pattern,
    branch_advantages,
    clip_guidance,
    cut_at_last_punctuation,
    cut_at_random,
    cut_before_max_entropy,
    cut_before_min_logprob,
    draw_lengths,
    loss_weights,
    low_prob_mask,
    prefix_advantages,
    prefix_copies,
    prefix_source_rows,
    prefix_window,
    share_prefix,
    treerl_prefix_advantages,
)
from trl_guided.tiny_models import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _kept(tokenizer, text, punctuation=None):
    ids = _ids(tokenizer, text)
    return tokenizer.decode(ids[: cut_at_last_punctuation(ids, tokenizer, punctuation)])


def test_last_mark_wins(tokenizer):
    assert _kept(tokenizer, "First, add. Then check! Then write") == "First, add. Then check!"
    assert _kept(tokenizer, "a, b, c") == "a, b,"


def test_no_mark_and_empty_input(tokenizer):
    assert cut_at_last_punctuation(_ids(tokenizer, "the cat sat on the mat"), tokenizer) == 0
    assert cut_at_last_punctuation([], tokenizer) == 0


def test_newline_is_a_mark(tokenizer):
    assert _kept(tokenizer, "Step 1: read the problem\nStep 2: solve") == "Step 1: read the problem\n"


@pytest.mark.parametrize("merged", [".\n", "),", '?"'])
def test_tokens_merging_a_mark_with_other_characters_count(tokenizer, merged):
    # Build a token that is exactly `merged`, as BPE vocabularies of real models have.
    extended = build_tiny_tokenizer()
    extended.add_tokens([merged])
    token = extended.convert_tokens_to_ids(merged)
    ids = _ids(extended, "Then it slept") + [token] + _ids(extended, " the dog")
    keep = cut_at_last_punctuation(ids, extended)
    assert keep == len(ids) - len(_ids(extended, " the dog"))
    assert extended.decode(ids[:keep]).endswith(merged)


def test_eos_stops_the_cut(tokenizer):
    ids = _ids(tokenizer, "Yes, it is") + [tokenizer.eos_token_id] + _ids(tokenizer, ". More.")
    assert tokenizer.decode(ids[: cut_at_last_punctuation(ids, tokenizer)]) == "Yes,"


def test_custom_and_multi_character_marks(tokenizer):
    # This vocabulary merges "; " into one token: the kept text may end in whitespace after the mark.
    assert _kept(tokenizer, "wait... then; go", punctuation=[";"]).rstrip(" ") == "wait... then;"
    assert _kept(tokenizer, "wait... then go", punctuation=["..."]) == "wait..."


text_alphabet = st.sampled_from(list("abc xyz.,!?;\n\"')(0123"))


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=text_alphabet, max_size=40), extra=st.lists(st.integers(0, 319), max_size=6))
def test_property_kept_text_ends_in_a_mark_and_is_maximal(text, extra):
    tokenizer = _PROPERTY_TOKENIZER
    ids = _ids(tokenizer, text) + extra
    keep = cut_at_last_punctuation(ids, tokenizer)
    assert 0 <= keep <= len(ids)
    pattern = _mark_pattern(DEFAULT_PUNCTUATION)
    specials = set(tokenizer.all_special_ids)
    first_special = next((i for i, t in enumerate(ids) if t in specials), len(ids))
    assert keep <= first_special
    if keep:
        assert pattern.search(tokenizer.decode(ids[:keep]))
    # No longer cut before the first special token would also end in a mark.
    for longer in range(keep + 1, first_special + 1):
        assert not pattern.search(tokenizer.decode(ids[:longer]))


_PROPERTY_TOKENIZER = build_tiny_tokenizer()


@settings(max_examples=200, deadline=None)
@given(
    ids=st.lists(st.integers(0, 319), max_size=30),
    punctuation=st.lists(st.text(alphabet=st.characters(), min_size=1, max_size=3), min_size=1, max_size=4),
)
def test_property_any_token_ids_and_any_marks(ids, punctuation):
    """Any token ids (specials and partial UTF-8 bytes included) and any list of marks: the cut keeps a prefix before
    the first special token whose text ends in one of the marks (or nothing), and nothing raises."""
    tokenizer = _PROPERTY_TOKENIZER
    keep = cut_at_last_punctuation(ids, tokenizer, punctuation)
    specials = set(tokenizer.all_special_ids)
    assert 0 <= keep <= next((i for i, t in enumerate(ids) if t in specials), len(ids))
    if keep:
        assert _mark_pattern(punctuation).search(tokenizer.decode(ids[:keep]))


def prefix_candidate(sample, drawn_length, eos_token_ids, cut) -> tuple[list[int], bool]:
    """The prefix a phase-1 sample yields, as `GuidedSampler.sample_prefixes` takes it: the window before EOS, cut."""
    window, hit_eos = prefix_window(sample, drawn_length, eos_token_ids)
    return window[: cut(window)], hit_eos


def test_prefix_candidate_stops_before_eos_and_cuts(tokenizer):
    eos = tokenizer.eos_token_id
    cut = lambda ids: cut_at_last_punctuation(ids, tokenizer)  # noqa: E731
    sample = _ids(tokenizer, "Yes, it is. And") + [eos] + _ids(tokenizer, " more.")
    prefix, hit = prefix_candidate(sample, 100, [eos], cut)
    assert hit and tokenizer.decode(prefix).rstrip(" ") == "Yes, it is."
    prefix, hit = prefix_candidate(sample, 3, [eos], cut)  # drawn length ends before EOS
    assert not hit and eos not in prefix and len(prefix) <= 3
    prefix, hit = prefix_candidate(_ids(tokenizer, "no marks here") + [eos], 100, [eos], cut)
    assert hit and prefix == []


def test_clip_guidance_keeps_eos():
    assert clip_guidance([5, 6, 7, 8], 3, [9]) == ([5, 6, 7], False)
    assert clip_guidance([5, 9, 7, 8], 3, [9]) == ([5, 9], True)
    assert clip_guidance([5, 6, 7, 9], 3, [9]) == ([5, 6, 7], False)


@settings(max_examples=300, deadline=None)
@given(
    max_completion=st.integers(4, 300),
    guide=st.tuples(st.integers(1, 20), st.integers(0, 20)),
    prefix_fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_budgets_never_exceed_max_completion_length(max_completion, guide, prefix_fraction, seed):
    min_guide, max_guide = guide[0], guide[0] + guide[1]
    room = max_completion - max_guide - 1  # what GuidedGRPOConfig leaves for the prefix
    if room < 1:
        return
    prefix_max = max(1, int(room * prefix_fraction))
    rng = random.Random(seed)
    for prefix_drawn, guide_len in zip(
        draw_lengths(rng, 20, 1, prefix_max), draw_lengths(rng, 20, min_guide, max_guide), strict=True
    ):
        assert 1 <= prefix_drawn <= prefix_max and min_guide <= guide_len <= max_guide
        prefix_len = rng.randint(0, prefix_drawn)  # the cut keeps at most the drawn length
        postfix_budget = max_completion - prefix_len - guide_len
        assert postfix_budget >= 1
        assert prefix_len + guide_len + postfix_budget <= max_completion


def test_loss_weights_per_scope():
    segments = Segments(prefix=[2, 0], guidance=[3, 2], postfix=[2, 4])
    guidance = loss_weights(segments, 8, "guidance")
    assert guidance.tolist() == [[0, 0, 1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
    completion = loss_weights(segments, 8, "completion")
    assert completion.tolist() == [[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0, 0]]
    decayed = loss_weights(segments, 8, "guidance_postfix", postfix_decay=0.5, postfix_min_weight=0.0)
    expected = torch.tensor([[0, 0, 1, 1, 1, 0.5, 0.25, 0], [1, 1, 0.5, 0.25, 0.125, 0.0625, 0, 0]])
    assert torch.allclose(decayed, expected)
    floored = loss_weights(segments, 8, "guidance_postfix", postfix_decay=0.5, postfix_min_weight=0.2)
    assert torch.allclose(floored[1, 2:6], torch.tensor([0.5, 0.25, 0.2, 0.2]))
    with pytest.raises(ValueError, match="guidance_loss_scope"):
        loss_weights(segments, 8, "postfix")


# ------------------------------------------------------------------------------------------ branch-point strategies


def _signals(entropies=(), logprobs=()):
    return TokenSignals(entropies=list(entropies), logprobs=list(logprobs))


def test_entropy_keeps_the_tokens_before_the_most_uncertain_one():
    ids = [11, 12, 13, 14, 15]
    assert cut_before_max_entropy(ids, _signals([0.1, 0.5, 2.0, 0.3, 0.4])) == 2
    assert cut_before_max_entropy(ids, _signals([0.1, 0.9, 0.2, 0.9, 0.9])) == 1  # ties: the earliest
    assert cut_before_max_entropy(ids, _signals([0.7] * 5)) == 1  # all equal: the first eligible position
    assert cut_before_max_entropy(ids, _signals([0.7] * 5), min_prefix=3) == 3


def test_a_spike_at_position_zero_is_skipped_by_the_minimum_prefix():
    ids, spike = [11, 12, 13, 14], _signals([9.0, 0.1, 0.3, 0.2])
    assert cut_before_max_entropy(ids, spike, min_prefix=0) == 0  # would make the group plain GRPO
    assert cut_before_max_entropy(ids, spike, min_prefix=1) == 2
    assert cut_before_max_entropy(ids, spike, min_prefix=4) == 0  # no eligible position: no branch point


def test_low_prob_keeps_the_tokens_before_the_least_likely_one():
    ids = [11, 12, 13, 14, 15]
    assert cut_before_min_logprob(ids, _signals(logprobs=[-9.0, -0.5, -3.0, -0.1, -3.0])) == 2  # ties, min prefix
    assert cut_before_min_logprob(ids, _signals(logprobs=[-1.0] * 5), min_prefix=2) == 2
    assert cut_before_min_logprob(ids, _signals(logprobs=[-9.0, -0.5, -3.0, -0.1, -3.0]), min_prefix=0) == 0


def test_random_draws_every_eligible_position_uniformly():
    rng = random.Random(0)
    draws = [cut_at_random(list(range(6)), rng, min_prefix=2) for _ in range(4000)]
    counts = [draws.count(i) for i in range(6)]
    assert counts[:2] == [0, 0] and all(900 < c < 1100 for c in counts[2:]), counts
    assert cut_at_random([7], rng, min_prefix=1) == 0


@pytest.mark.parametrize("strategy", ["punctuation", "entropy", "low_prob", "random"])
def test_every_strategy_handles_an_empty_sample(tokenizer, strategy):
    assert BranchRule(strategy).cut([], tokenizer, _signals(), random.Random(0)) == 0


def test_eos_inside_the_window_bounds_the_choice(tokenizer):
    eos = tokenizer.eos_token_id
    sample = [21, 22, 23, eos, 24, 25]
    signals = _signals([0.1, 0.2, 0.8, 0.0, 5.0, 6.0], [-0.1, -2.0, -0.3, -0.1, -9.0, -9.0])
    for strategy, expected in (("entropy", 2), ("low_prob", 1)):
        rule = BranchRule(strategy)
        prefix, hit_eos = prefix_candidate(sample, 6, [eos], lambda w, r=rule: r.cut(w, tokenizer, signals))
        assert hit_eos and prefix == sample[:expected]
    window, hit_eos = prefix_window(sample, 2, [eos])  # the drawn length ends before EOS
    assert window == [21, 22] and not hit_eos


def test_snap_moves_the_cut_back_to_punctuation_within_the_window(tokenizer):
    ids = _ids(tokenizer, "Yes, it is a big red dog")
    comma = len(_ids(tokenizer, "Yes,"))
    entropies = [0.0] * len(ids)
    entropies[comma + 3] = 4.0
    signals = _signals(entropies)
    assert BranchRule("entropy").cut(ids, tokenizer, signals) == comma + 3
    assert BranchRule("entropy", snap_window=3).cut(ids, tokenizer, signals) == comma
    assert BranchRule("entropy", snap_window=2).cut(ids, tokenizer, signals) == comma + 3  # too far: stays
    assert BranchRule("entropy", snap_window=3, min_prefix=comma + 1).cut(ids, tokenizer, signals) == comma + 3


def test_punctuation_respects_the_minimum_prefix(tokenizer):
    ids = _ids(tokenizer, "Yes, it is")
    comma = len(_ids(tokenizer, "Yes,"))
    assert BranchRule("punctuation").cut(ids, tokenizer) == comma
    assert BranchRule("punctuation", min_prefix=comma + 1).cut(ids, tokenizer) == 0


# ------------------------------------------------------------------------------------------------ tree advantages

# Two groups of G = 4 with K = 2 branch sets of 2 (rows 0-1 | 2-3 and 4-5 | 6-7); row 4 is unscorable.
REWARDS = torch.tensor([1.0, 0.0, 1.0, 1.0, float("nan"), 2.0, 0.0, 4.0])


def test_branch_advantages_on_a_hand_computed_table():
    unscaled = branch_advantages(REWARDS, 2, "none")
    assert unscaled.tolist() == [0.5, -0.5, 0.0, 0.0, 0.0, 0.0, -2.0, 2.0]
    scaled = branch_advantages(REWARDS, 2, "group")
    s = 2**0.5 / 2  # unbiased std of {0, 1}
    expected = [0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0, 0, 0, 0, -2 / (2 * 2**0.5 + 1e-4), 2 / (2 * 2**0.5 + 1e-4)]
    torch.testing.assert_close(scaled, torch.tensor(expected))


def test_prefix_advantages_on_a_hand_computed_table():
    unscaled = prefix_advantages(REWARDS, 4, 2, "none")
    # Group 0: sets average 0.5 and 1.0 against 0.75; group 1: 2.0 and 2.0 against 2.0 (NaN left out).
    assert unscaled.tolist() == [-0.25, -0.25, 0.25, 0.25, 0.0, 0.0, 0.0, 0.0]
    scaled = prefix_advantages(REWARDS, 4, 2, "group")
    torch.testing.assert_close(scaled[:4], torch.tensor([-0.25, -0.25, 0.25, 0.25]) / (0.5 + 1e-4))
    # K = G / 1 set per group: a prefix has the group's mean, so its advantage is 0.
    assert prefix_advantages(REWARDS[:4], 4, 4, "group").tolist() == [0.0] * 4


def test_treerl_weights_on_a_hand_computed_tree_of_two_prefixes():
    # Group 0 of REWARDS: prefix A -> leaves {1, 0}, prefix B -> leaves {1, 1}. Root value 0.75, V(A) = 0.5,
    # V(B) = 1. A prefix's parent is the root, so global = local = V(prefix) - V(root), and each prefix has 2 leaves:
    # A: (-0.25 - 0.25) / sqrt(2), B: (0.25 + 0.25) / sqrt(2). Leaves: global + local = (r - 0.75) + (r - V(prefix)).
    rewards = REWARDS[:4]
    prefix = treerl_prefix_advantages(rewards, 4, 2, "none")
    a, b = -0.5 / math.sqrt(2), 0.5 / math.sqrt(2)
    torch.testing.assert_close(prefix, torch.tensor([a, a, b, b]))
    leaves = rewards - rewards.mean() + branch_advantages(rewards, 2, "none")
    torch.testing.assert_close(leaves, torch.tensor([0.75, -1.25, 0.25, 0.25]))
    # Every leaf row carries its prefix's tokens: node A weighs 2 * a = -0.5 * sqrt(2) in all, not 2 * (-0.5).
    assert prefix[:2].sum().item() == pytest.approx(-0.5 * math.sqrt(2))
    # Scaled as TRL's group advantage: divided by the group's std (0.5) like the group term.
    torch.testing.assert_close(treerl_prefix_advantages(rewards, 4, 2, "group"), prefix / (0.5 + 1e-4))


P = 0.9


def _logps(*probabilities):
    return torch.tensor(probabilities, dtype=torch.float64).log().unsqueeze(0)


def test_low_prob_mask_keeps_exactly_the_tokens_below_the_threshold():
    # Below, at (a tie: not below), above the threshold; then padding, which is never trained even when unlikely.
    logps = torch.cat([_logps(0.5, P, 0.95, 0.1), _logps(0.89999, 0.90001, 0.2, 0.3)])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    assert low_prob_mask(logps, mask, P).tolist() == [[True, False, False, True], [True, False, True, False]]


@pytest.mark.parametrize(
    ("probability", "expected"), [(0.3, True), (P, False), (0.99, False)], ids=["all_below", "all_equal", "all_above"]
)
def test_low_prob_mask_when_every_token_is_alike(probability, expected):
    logps = _logps(*[probability] * 5)
    assert low_prob_mask(logps, torch.ones(1, 5), P).tolist() == [[expected] * 5]


def test_low_prob_mask_on_eos_an_empty_completion_and_nan():
    # Row 0 ends in an unlikely EOS (a completion token like any other), then padding. Row 1 is an empty completion.
    logps = torch.cat([_logps(0.99, 0.4, 1.0), _logps(0.1, 0.1, 0.1)])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert low_prob_mask(logps, mask, P).tolist() == [[False, True, False], [False, False, False]]
    assert not low_prob_mask(torch.full((1, 2), float("nan")), torch.ones(1, 2), P).any()
    # Threshold 1: every token that was not certain.
    assert low_prob_mask(_logps(0.999, 1.0), torch.ones(1, 2), 1.0).tolist() == [[True, False]]


def _tree_batch():
    """Rows 0-3: one prompt; rows 0, 2, 3 share the 2-token prefix [5, 6], row 1 is a second branch set's [5, 7]
    (K = 2); row 4 another prompt with the same prefix ids; row 5 has no prefix; row 6 repeats row 0's prefix but its
    completion was masked out (truncated)."""
    prompt_ids = torch.tensor([[0, 1, 2]] * 4 + [[0, 1, 3], [0, 1, 2], [0, 1, 2]])
    prompt_mask = torch.ones_like(prompt_ids)
    completion_ids = torch.tensor(
        [[5, 6, 8, 9], [5, 7, 8, 9], [5, 6, 9, 9], [5, 6, 4, 0], [5, 6, 8, 9], [5, 6, 8, 9], [5, 6, 8, 9]]
    )
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[3, 3] = 0
    completion_mask[6] = 0
    prefix = torch.tensor([2, 2, 2, 2, 2, 0, 2])
    return prompt_ids, prompt_mask, completion_ids, completion_mask, prefix


def test_prefix_sources_name_one_row_per_tree_node():
    prompt_ids, prompt_mask, completion_ids, completion_mask, prefix = _tree_batch()
    sources = prefix_source_rows(prompt_ids, prompt_mask, completion_ids, completion_mask, prefix)
    assert sources.tolist() == [0, 1, 0, 0, 4, 5, 6]
    copies = prefix_copies(sources, prefix, 4)
    assert copies.nonzero().tolist() == [[2, 0], [2, 1], [3, 0], [3, 1]]
    # A row's prefix columns take its source row's values (one decision per node); other columns are its own.
    values = torch.arange(28.0).view(7, 4)
    shared = share_prefix(values, sources, prefix)
    assert shared[2].tolist() == [0.0, 1.0, 10.0, 11.0] and shared[3].tolist() == [0.0, 1.0, 14.0, 15.0]
    assert torch.equal(shared[[0, 1, 4, 5, 6]], values[[0, 1, 4, 5, 6]])
