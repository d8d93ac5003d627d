"""Pure logic of guided sampling: where a shared prefix is cut, how long each segment is, which tokens the loss trains.

Nothing here touches a model or a trainer, so every rule is unit-testable on token lists and a tokenizer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

DEFAULT_PUNCTUATION = ("\n", ".", ",", "!", "?")
# Characters that may follow the mark in a kept prefix: BPE merges marks with closing quotes/brackets and whitespace
# (`".\n"`, `"),"`, `"?\""`), and such a token still ends a sentence or clause.
CLOSERS = "\"')]}\u00bb\u201d\u2019 \t\r\n"
LOSS_SCOPES = ("guidance", "guidance_postfix", "completion")


def _mark_pattern(marks: Sequence[str]) -> re.Pattern:
    alternatives = "|".join(re.escape(m) for m in sorted(marks, key=len, reverse=True))
    return re.compile(f"(?:{alternatives})[{re.escape(CLOSERS)}]*\\Z")


def cut_at_last_punctuation(token_ids: Sequence[int], tokenizer, punctuation: Sequence[str] | None = None) -> int:
    """How many of `token_ids` to keep so the kept text ends right after the last punctuation mark (0 if none).

    Works on decoded text, so a token that merges a mark with other characters counts; the kept text ends in a mark,
    optionally followed by closing quotes, brackets or whitespace (see `CLOSERS`). Tokens from the first special token
    (EOS, pad, ...) on are never kept.
    """
    marks = tuple(punctuation or DEFAULT_PUNCTUATION)
    ids = list(token_ids)
    special = set(tokenizer.all_special_ids)
    for i, token in enumerate(ids):
        if token in special:
            ids = ids[:i]
            break
    pattern = _mark_pattern(marks)
    mark_chars = set("".join(marks))
    for keep in range(len(ids), 0, -1):
        piece = tokenizer.decode(ids[keep - 1 : keep])
        # Only a token carrying part of a mark, only closers, or a partial UTF-8 byte can end a match: skip the full
        # decode for the rest (most tokens).
        if not (mark_chars.intersection(piece) or not piece.strip(CLOSERS) or "\ufffd" in piece):
            continue
        if pattern.search(tokenizer.decode(ids[:keep])):
            return keep
    return 0


# Strategy table for `GuidedGRPOConfig.branch_point`: name -> cut(token_ids, tokenizer, punctuation) -> tokens kept.
BRANCH_POINTS: dict[str, Callable[..., int]] = {"punctuation": cut_at_last_punctuation}


def draw_lengths(rng: random.Random, count: int, low: int, high: int) -> list[int]:
    """`count` integers drawn uniformly from [low, high]."""
    return [rng.randint(low, high) for _ in range(count)]


def first_eos(token_ids: Sequence[int], eos_token_ids: Sequence[int]) -> int | None:
    """Index of the first EOS token, or None."""
    eos = set(eos_token_ids)
    return next((i for i, token in enumerate(token_ids) if token in eos), None)


def prefix_candidate(
    sample: Sequence[int], drawn_length: int, eos_token_ids: Sequence[int], cut: Callable[[Sequence[int]], int]
) -> tuple[list[int], bool]:
    """The prefix a phase-1 sample yields: its first `drawn_length` tokens, stopped before EOS, cut by `cut`.

    Returns (prefix token ids, whether the sample hit EOS inside the drawn length).
    """
    window = list(sample[:drawn_length])
    eos_at = first_eos(window, eos_token_ids)
    if eos_at is not None:
        window = window[:eos_at]
    return window[: cut(window)], eos_at is not None


def clip_guidance(sample: Sequence[int], length: int, eos_token_ids: Sequence[int]) -> tuple[list[int], bool]:
    """A phase-2 sample kept to `length` tokens, or up to and including its EOS. Returns (ids, ended with EOS)."""
    eos_at = first_eos(sample[:length], eos_token_ids)
    if eos_at is not None:
        return list(sample[: eos_at + 1]), True
    return list(sample[:length]), False


@dataclass
class Segments:
    """Token lengths of the three segments of every completion row, in row order."""

    prefix: list[int]
    guidance: list[int]
    postfix: list[int]

    def __len__(self) -> int:
        return len(self.prefix)

    @property
    def guidance_end(self) -> list[int]:
        return [p + g for p, g in zip(self.prefix, self.guidance, strict=True)]

    def guide_end_of(self, row: int) -> int:
        return self.prefix[row] + self.guidance[row]


def loss_weights(
    segments: Segments, width: int, scope: str, postfix_decay: float = 0.9, postfix_min_weight: float = 0.0
) -> torch.Tensor:
    """(rows, width) float weights of completion tokens for the loss, by `scope` (see `GuidedGRPOConfig`)."""
    if scope not in LOSS_SCOPES:
        raise ValueError(f"Unknown guidance_loss_scope {scope!r}; choose one of {list(LOSS_SCOPES)}.")
    position = torch.arange(width).unsqueeze(0)
    prefix = torch.tensor(segments.prefix).unsqueeze(1)
    guide_end = prefix + torch.tensor(segments.guidance).unsqueeze(1)
    end = guide_end + torch.tensor(segments.postfix).unsqueeze(1)
    in_guidance = ((position >= prefix) & (position < guide_end)).float()
    if scope == "guidance":
        return in_guidance
    if scope == "completion":
        return (position < end).float()
    steps_after = (position - guide_end).clamp(min=0).float()
    postfix_weight = torch.clamp(postfix_decay ** (steps_after + 1), min=postfix_min_weight)
    in_postfix = ((position >= guide_end) & (position < end)).float()
    return in_guidance + in_postfix * postfix_weight
