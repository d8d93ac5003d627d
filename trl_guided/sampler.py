"""The three-phase guided sampler: one shared prefix per prompt group, G guidance branches, then each postfix.

It knows nothing of TRL, vLLM or DeepSpeed, nor of a trainer. It draws the segment lengths, cuts the prefixes and
assembles the completions; the tokens (and the policy's signals for a branch point) come from a `PhaseBackend`: the
trainer's over its generation backends (`trl_guided.backends.RolloutBackend`), or one over a plain model without a
trainer (`trl_guided.backends.ModelBackend`, the evaluation's).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .guidance import BranchRule, Segments, TokenSignals, clip_guidance, draw_lengths, prefix_window


class PhaseBackend(Protocol):
    """What the sampler needs from a generation backend."""

    # True when a branch's guidance and postfix come from one generate call that keeps the branch's KV cache (the
    # transformers backend); False when each phase is its own call (vLLM, where prefix caching shares the prompt).
    branches_in_one_call: bool

    def generate(
        self,
        prompts: list[list[int]],
        num_generations: int,
        max_new_tokens: int,
        min_new_tokens: int = 0,
        shared_prompts: bool = False,
        row_budgets: list[int] | None = None,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """`num_generations` samples per prompt (prompts come repeated, one row per sample) and their log-probs.

        `shared_prompts`: the prompts come in runs of `num_generations` identical ones (a hint for caching).
        `row_budgets`: per row, the tokens the caller keeps (a hint: a backend may stop a row there).
        """

    def generate_scored(
        self, prompts: list[list[int]], num_generations: int, max_new_tokens: int, shared_prompts: bool = False
    ) -> tuple[list[list[int]], list[list[float]] | None, list[TokenSignals] | None]:
        """`generate` (no minimum length), plus each sample's `TokenSignals` when generation computed them on the
        way (None: the backend cannot; `token_signals` then scores the samples)."""

    def any_process(self, flag: bool) -> bool:
        """`flag` OR-ed over all processes (every process must then make the same generate calls)."""

    def token_signals(self, prompts: list[list[int]], samples: list[list[int]]) -> list[TokenSignals]:
        """The policy's entropy and log-prob at every token of each sample after its prompt (a collective call)."""


@dataclass
class GuidedRollout:
    """The completions of one guided rollout, row-aligned with the prompts it was given."""

    completions: list[list[int]]
    # Per-token sampling log-probs (None: unknown for that token), or None when the backend reports none.
    logprobs: list[list[float | None]] | None
    segments: Segments
    empty_prefix: list[bool]  # per branch set: no branch point found, so its branches are plain GRPO samples
    prefix_retries: int  # phase-1 samples redrawn because they hit EOS inside the drawn length
    branch_set: list[int]  # per row: which of its group's `num_prefixes_per_group` prefixes it branches from
    branch_position: list[float]  # per branch set: tokens kept / tokens drawn
    # Per branch set whose cut read the policy's signals (else empty): entropy at the branch token, and its mean
    # over the window
    branch_entropy: list[float]
    mean_entropy: list[float]


class GuidedSampler:
    """Samples prefix -> guidance -> postfix for groups of `num_generations` identical prompts.

    A group holds `num_prefixes_per_group` (K) branch sets: K prefixes, each from its own phase-1 sample, with
    `num_generations / K` branches each. Rows are laid out set by set (row r of a group is in set r // (G / K)).
    `settings` is a `GuidedGRPOConfig` (only its guided-sampling fields and `max_completion_length` are read).
    """

    def __init__(self, settings, tokenizer, eos_token_ids: Sequence[int], rng: random.Random, backend: PhaseBackend):
        self.settings, self.tokenizer, self.rng, self.backend = settings, tokenizer, rng, backend
        self.eos = list(eos_token_ids)
        self.rule = BranchRule(
            strategy=settings.branch_point,
            punctuation=settings.punctuation,
            min_prefix=settings.branch_min_prefix_tokens,
            snap_window=settings.branch_snap_window if settings.branch_snap_to_punctuation else None,
        )

    def sample(self, prompt_ids: list[list[int]], num_generations: int) -> GuidedRollout:
        prefixes_per_group = self.settings.num_prefixes_per_group
        branches = num_generations // prefixes_per_group
        # One prompt per branch set: each group's prompt, K times in a row.
        set_prompts = [list(ids) for ids in prompt_ids[::branches]]
        prefixes, prefix_logps, retries, stats = self.sample_prefixes(set_prompts)
        guides, postfixes, guide_logps, postfix_logps = self.sample_branches(set_prompts, prefixes, branches)
        set_of = [row // branches for row in range(len(set_prompts) * branches)]
        completions = [prefixes[s] + guides[r] + postfixes[r] for r, s in enumerate(set_of)]
        return GuidedRollout(
            completions=completions,
            logprobs=self.join_logprobs(set_of, prefix_logps, guides, guide_logps, postfix_logps),
            segments=Segments(
                prefix=[len(prefixes[s]) for s in set_of],
                guidance=[len(guide) for guide in guides],
                postfix=[len(postfix) for postfix in postfixes],
            ),
            empty_prefix=[not prefix for prefix in prefixes],
            prefix_retries=retries,
            branch_set=[s % prefixes_per_group for s in set_of],
            **stats,
        )

    def sample_prefixes(self, set_prompts: list[list[int]]):
        """Phase 1: one prefix per branch set, redrawn (up to `prefix_eos_retries` times) when EOS came inside its
        drawn length, cut where `branch_point` says (reading the policy's signals at each token when the rule needs
        them: recorded while generating, or one scoring forward where the backend cannot record them).

        The first attempt samples the K sets of a group as K generations of its prompt (one prefill per group on the
        transformers backend, `n = K` on vLLM); redraws go one row per set.

        Returns (prefix ids per set, their log-probs per set or None, number of redraws, branch statistics).
        """
        settings = self.settings
        drawn = draw_lengths(self.rng, len(set_prompts), settings.prefix_min_tokens, settings.prefix_max_tokens)
        prefixes: list[list[int]] = [[] for _ in set_prompts]
        prefix_logps: list[list[float] | None] = [None] * len(set_prompts)
        stats = dict(branch_position=[0.0] * len(set_prompts), branch_entropy=[], mean_entropy=[])
        pending, retries = list(range(len(set_prompts))), 0
        for attempt in range(settings.prefix_eos_retries + 1):
            prompts = [set_prompts[i] for i in pending]
            runs = settings.num_prefixes_per_group if attempt == 0 else 1  # set_prompts: each group's prompt K times
            budget = max((drawn[i] for i in pending), default=1)
            recorded = None
            if self.rule.needs_signals:
                samples, logps, recorded = self.backend.generate_scored(prompts, runs, budget, shared_prompts=runs > 1)
            else:
                samples, logps = self.backend.generate(prompts, runs, budget, shared_prompts=runs > 1)
            redraw, final = [], []
            for row, (sample, sample_logps) in enumerate(zip(samples, _per_row(logps, len(samples)), strict=True)):
                branch_set = pending[row]
                window, hit_eos = prefix_window(sample, drawn[branch_set], self.eos)
                if hit_eos and attempt < settings.prefix_eos_retries:
                    redraw.append(branch_set)
                else:
                    final.append((branch_set, window, sample_logps, _within(recorded, row, len(window))))
            signals = [window_signals for *_, window_signals in final]
            if self.rule.needs_signals and recorded is None:  # every process scores on every attempt: a collective
                signals = self.backend.token_signals([set_prompts[s] for s, *_ in final], [w for _, w, *_ in final])
            for (branch_set, window, sample_logps, _), window_signals in zip(final, signals, strict=True):
                keep = self.rule.cut(window, self.tokenizer, window_signals, self.rng)
                prefixes[branch_set] = window[:keep]
                prefix_logps[branch_set] = None if sample_logps is None else list(sample_logps[:keep])
                stats["branch_position"][branch_set] = keep / drawn[branch_set]
                if window_signals is not None and window:
                    stats["branch_entropy"].append(window_signals.entropies[min(keep, len(window) - 1)])
                    stats["mean_entropy"].append(sum(window_signals.entropies) / len(window))
            retries += len(redraw)
            pending = redraw
            if not self.backend.any_process(bool(pending)):
                break
        return prefixes, prefix_logps, retries, stats

    def sample_branches(self, group_prompts: list[list[int]], prefixes: list[list[int]], num_generations: int):
        """Phases 2 and 3: `num_generations` guidance continuations of each prompt + prefix (one per branch set, called
        a group here), then every chain not yet ended is completed within what is left of `max_completion_length`.

        Returns (guidance ids, postfix ids, guidance log-probs or None, postfix log-probs), one entry per row.
        """
        settings, eos = self.settings, self.eos
        num_groups = len(group_prompts)
        guide_lengths = draw_lengths(self.rng, num_groups, settings.min_guide_tokens, settings.max_guide_tokens)
        rows = range(num_groups * num_generations)
        group_of = [row // num_generations for row in rows]
        row_guide_lengths = [guide_lengths[g] for g in group_of]
        branch_prompts = [group_prompts[g] + prefixes[g] for g in group_of]
        budgets = [settings.max_completion_length - len(prefixes[g]) for g in group_of]
        postfixes: list[list[int]] = [[] for _ in rows]
        postfix_logps: list[list[float]] = [[] for _ in rows]
        if self.backend.branches_in_one_call:
            # A branch goes on in the same generate call with its KV cache, so its guidance and postfix are one
            # sample split at the drawn guidance length (the same distribution as two calls).
            samples, guide_logps = self.backend.generate(
                branch_prompts,
                num_generations,
                max(budgets),
                settings.min_guide_tokens,
                shared_prompts=True,
                row_budgets=budgets,
            )
            guides, ended = clip_each(samples, row_guide_lengths, eos)
            for row in rows:
                if not ended[row]:
                    postfixes[row] = list(samples[row][len(guides[row]) : budgets[row]])
            return guides, postfixes, guide_logps, postfix_logps
        samples, guide_logps = self.backend.generate(
            branch_prompts, num_generations, max(guide_lengths), settings.min_guide_tokens
        )
        guides, ended = clip_each(samples, row_guide_lengths, eos)
        budgets = [budgets[r] - len(guides[r]) for r in rows]
        unfinished = [r for r in rows if not ended[r]]
        samples, logps = self.backend.generate(
            [branch_prompts[r] + guides[r] for r in unfinished], 1, max((budgets[r] for r in unfinished), default=1)
        )
        for row, sample, sample_logps in zip(unfinished, samples, _per_row(logps, len(samples)), strict=True):
            postfixes[row] = list(sample[: budgets[row]])
            if sample_logps is not None:
                postfix_logps[row] = list(sample_logps[: budgets[row]])
        return guides, postfixes, guide_logps, postfix_logps

    def join_logprobs(self, group_of, prefix_logps, guides, guide_logps, postfix_logps):
        """The sampling log-probs of each row's three segments, concatenated (None when the backend has none)."""
        if guide_logps is None or any(lp is None for lp in prefix_logps):
            return None
        # Backends that hold EOS back for the first min_guide_tokens (vLLM `min_tokens`) report log-probs of that
        # renormalised distribution, log p - log(1 - P(stop)), not the policy's; TRL's importance-sampling ratio would
        # shrink by (1 - P(stop)) per such token. None is "unknown" to TRL: ratio 1, left out of its mismatch metrics
        # (as on the transformers backend, which has no sampling log-probs at all).
        eos_held_back = [min(self.settings.min_guide_tokens, len(guide)) for guide in guides]
        return [
            prefix_logps[g]
            + [None] * eos_held_back[r]
            + list(guide_logps[r][eos_held_back[r] : len(guides[r])])
            + postfix_logps[r]
            for r, g in enumerate(group_of)
        ]


def clip_each(samples: list, lengths: list[int], eos: list[int]) -> tuple[list[list[int]], list[bool]]:
    """`clip_guidance` of every row: (guidance ids per row, whether each ended with EOS)."""
    clipped = [clip_guidance(sample, length, eos) for sample, length in zip(samples, lengths, strict=True)]
    return [ids for ids, _ in clipped], [ended for _, ended in clipped]


def _within(signals: list[TokenSignals] | None, row: int, length: int) -> TokenSignals | None:
    """Row `row`'s recorded signals for the first `length` tokens of its sample (its window); None if unrecorded."""
    if signals is None:
        return None
    return TokenSignals(signals[row].entropies[:length], signals[row].logprobs[:length])


def _per_row(logps: list | None, count: int) -> list:
    """Per-row log-probs, or a None per row when the backend returns none (the transformers backend)."""
    return [None] * count if logps is None else logps
