"""The three-phase guided sampler: one shared prefix per prompt group, G guidance branches, then each postfix.

It knows nothing of TRL, vLLM or DeepSpeed. It draws the segment lengths, cuts the prefixes and assembles the
completions; the tokens come from a `PhaseBackend`, which the trainer builds over its generation backends
(`trl_guided.backends.RolloutBackend`) and which anything else (an evaluation loop) can implement in a few lines.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .guidance import BRANCH_POINTS, Segments, clip_guidance, draw_lengths, prefix_candidate


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
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """`num_generations` samples per prompt (prompts come repeated, one row per sample) and their log-probs.

        `shared_prompts`: the prompts come in runs of `num_generations` identical ones (a hint for caching).
        """

    def any_process(self, flag: bool) -> bool:
        """`flag` OR-ed over all processes (every process must then make the same generate calls)."""


@dataclass
class GuidedRollout:
    """The completions of one guided rollout, row-aligned with the prompts it was given."""

    completions: list[list[int]]
    # Per-token sampling log-probs (None: unknown for that token), or None when the backend reports none.
    logprobs: list[list[float | None]] | None
    segments: Segments
    empty_prefix: list[bool]  # per group: no branch point found, so the group is plain GRPO
    prefix_retries: int  # phase-1 samples redrawn because they hit EOS inside the drawn length


class GuidedSampler:
    """Samples prefix -> guidance -> postfix for groups of `num_generations` identical prompts.

    `settings` is a `GuidedGRPOConfig` (only its guided-sampling fields and `max_completion_length` are read).
    """

    def __init__(self, settings, tokenizer, eos_token_ids: Sequence[int], rng: random.Random, backend: PhaseBackend):
        self.settings, self.tokenizer, self.rng, self.backend = settings, tokenizer, rng, backend
        self.eos = list(eos_token_ids)
        self.cut = functools.partial(
            BRANCH_POINTS[settings.branch_point], tokenizer=tokenizer, punctuation=settings.punctuation
        )

    def sample(self, prompt_ids: list[list[int]], num_generations: int) -> GuidedRollout:
        group_prompts = [list(ids) for ids in prompt_ids[::num_generations]]
        prefixes, prefix_logps, retries = self.sample_prefixes(group_prompts)
        guides, postfixes, guide_logps, postfix_logps = self.sample_branches(group_prompts, prefixes, num_generations)
        group_of = [row // num_generations for row in range(len(group_prompts) * num_generations)]
        completions = [prefixes[g] + guides[r] + postfixes[r] for r, g in enumerate(group_of)]
        return GuidedRollout(
            completions=completions,
            logprobs=self.join_logprobs(group_of, prefix_logps, guides, guide_logps, postfix_logps),
            segments=Segments(
                prefix=[len(prefixes[g]) for g in group_of],
                guidance=[len(guide) for guide in guides],
                postfix=[len(postfix) for postfix in postfixes],
            ),
            empty_prefix=[not prefix for prefix in prefixes],
            prefix_retries=retries,
        )

    def sample_prefixes(self, group_prompts: list[list[int]]):
        """Phase 1: one prefix per group, redrawn (up to `prefix_eos_retries` times) when EOS came inside its length.

        Returns (prefix ids per group, their log-probs per group or None, number of redraws).
        """
        settings = self.settings
        drawn = draw_lengths(self.rng, len(group_prompts), settings.prefix_min_tokens, settings.prefix_max_tokens)
        prefixes: list[list[int]] = [[] for _ in group_prompts]
        prefix_logps: list[list[float] | None] = [None] * len(group_prompts)
        pending, retries = list(range(len(group_prompts))), 0
        for attempt in range(settings.prefix_eos_retries + 1):
            samples, logps = self.backend.generate(
                [group_prompts[i] for i in pending], 1, max((drawn[i] for i in pending), default=1)
            )
            redraw = []
            for sample, sample_logps, group in zip(samples, _per_row(logps, len(samples)), pending, strict=True):
                prefix, hit_eos = prefix_candidate(sample, drawn[group], self.eos, self.cut)
                if hit_eos and attempt < settings.prefix_eos_retries:
                    redraw.append(group)
                    continue
                prefixes[group] = prefix
                prefix_logps[group] = None if sample_logps is None else list(sample_logps[: len(prefix)])
            retries += len(redraw)
            pending = redraw
            if not self.backend.any_process(bool(pending)):
                break
        return prefixes, prefix_logps, retries

    def sample_branches(self, group_prompts: list[list[int]], prefixes: list[list[int]], num_generations: int):
        """Phases 2 and 3: G guidance continuations of each prompt + prefix, then every chain not yet ended is
        completed within what is left of `max_completion_length`.

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
                branch_prompts, num_generations, max(budgets), settings.min_guide_tokens, shared_prompts=True
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


def _per_row(logps: list | None, count: int) -> list:
    """Per-row log-probs, or a None per row when the backend returns none (the transformers backend)."""
    return [None] * count if logps is None else logps
