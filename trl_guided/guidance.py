"""Pure logic of guided sampling: where a shared prefix is cut, how long each segment is, which tokens the loss trains.

Nothing here touches a model or a trainer, so every rule is unit-testable on token lists and a tokenizer.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

DEFAULT_PUNCTUATION = ("\n", ".", ",", "!", "?")
# Characters that may follow the mark in a kept prefix: BPE merges marks with closing quotes/brackets and whitespace
# (`".\n"`, `"),"`, `"?\""`), and such a token still ends a sentence or clause.
CLOSERS = "\"')]}\u00bb\u201d\u2019 \t\r\n"


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


@dataclass(frozen=True)
class TokenSignals:
    """The policy's view of a phase-1 sample, one value per sampled token `i`: the entropy of the distribution token
    `i` was drawn from (after temperature, before top-k/top-p) and the log-prob of token `i` under it."""

    entropies: Sequence[float] = ()
    logprobs: Sequence[float] = ()


def _first_extreme(values: Sequence[float], start: int, end: int, largest: bool) -> int:
    """Index in [start, end) of the largest (or smallest) value; ties go to the earliest. -1 if the range is empty."""
    best = -1
    for i in range(start, end):
        if best < 0 or (values[i] > values[best] if largest else values[i] < values[best]):
            best = i
    return best


def cut_before_max_entropy(token_ids: Sequence[int], signals: TokenSignals, min_prefix: int = 1) -> int:
    """Keep the tokens before the highest-entropy position (from `min_prefix` on), so the most uncertain token is the
    first guidance token. Ties go to the earliest position; 0 (no branch point) when no position is eligible."""
    return max(_first_extreme(signals.entropies, min_prefix, len(token_ids), largest=True), 0)


def cut_before_min_logprob(token_ids: Sequence[int], signals: TokenSignals, min_prefix: int = 1) -> int:
    """Keep the tokens before the lowest-probability sampled token (SPO's cutpoint), from `min_prefix` on. Ties go to
    the earliest position; 0 when no position is eligible."""
    return max(_first_extreme(signals.logprobs, min_prefix, len(token_ids), largest=False), 0)


def cut_at_random(token_ids: Sequence[int], rng: random.Random, min_prefix: int = 1) -> int:
    """Keep the tokens before a uniformly drawn position in [min_prefix, len(token_ids)); 0 when that is empty."""
    return rng.randrange(min_prefix, len(token_ids)) if min_prefix < len(token_ids) else 0


def snap_to_punctuation(
    token_ids: Sequence[int], keep: int, tokenizer, punctuation: Sequence[str] | None, window: int, min_prefix: int = 1
) -> int:
    """Move a cut back to the last punctuation boundary at or before it when one lies within `window` tokens (and
    keeps at least `min_prefix`, at least 1, tokens); otherwise leave it."""
    boundary = cut_at_last_punctuation(token_ids[:keep], tokenizer, punctuation)
    return boundary if boundary >= max(min_prefix, 1) and keep - boundary <= window else keep


@dataclass(frozen=True)
class BranchRule:
    """Where a phase-1 sample is cut: `strategy` (a `BRANCH_POINTS` name) and its settings."""

    strategy: str = "punctuation"
    punctuation: Sequence[str] | None = None
    min_prefix: int = 1
    snap_window: int | None = None  # None: no snapping to punctuation

    @property
    def needs_signals(self) -> bool:
        """Whether the cut reads the policy's entropies / log-probs of the sample (recorded while generating, or one
        scoring forward)."""
        return self.strategy in ("entropy", "low_prob")

    def cut(self, token_ids: Sequence[int], tokenizer, signals: TokenSignals | None = None, rng=None) -> int:
        """How many of `token_ids` (a phase-1 sample, stopped before EOS and limited to the drawn length) to keep."""
        if self.strategy == "punctuation":
            keep = cut_at_last_punctuation(token_ids, tokenizer, self.punctuation)
            return keep if keep >= self.min_prefix else 0
        keep = BRANCH_POINTS[self.strategy](token_ids, signals if self.needs_signals else rng, self.min_prefix)
        if self.snap_window is not None and keep:
            keep = snap_to_punctuation(token_ids, keep, tokenizer, self.punctuation, self.snap_window, self.min_prefix)
        return keep


def representable_marks(tokenizer, punctuation: Sequence[str] | None = None) -> list[str]:
    """The marks the tokenizer can write: encoded and decoded back without an unknown token. None of them: every
    punctuation cut keeps nothing."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    found = []
    for mark in punctuation or DEFAULT_PUNCTUATION:
        ids = tokenizer.encode(mark, add_special_tokens=False)
        if ids and unknown not in ids and mark in tokenizer.decode(ids):
            found.append(mark)
    return found


# Strategy table for `GuidedGRPOConfig.branch_point`: name -> the cut (see `BranchRule.cut` for how each is called).
BRANCH_POINTS: dict[str, Callable[..., int]] = {
    "punctuation": cut_at_last_punctuation,
    "entropy": cut_before_max_entropy,
    "low_prob": cut_before_min_logprob,
    "random": cut_at_random,
}


def draw_lengths(rng: random.Random, count: int, low: int, high: int) -> list[int]:
    """`count` integers drawn uniformly from [low, high]."""
    return [rng.randint(low, high) for _ in range(count)]


def first_eos(token_ids: Sequence[int], eos_token_ids: Sequence[int]) -> int | None:
    """Index of the first EOS token, or None."""
    eos = set(eos_token_ids)
    return next((i for i, token in enumerate(token_ids) if token in eos), None)


def prefix_window(sample: Sequence[int], drawn_length: int, eos_token_ids: Sequence[int]) -> tuple[list[int], bool]:
    """The part of a phase-1 sample a branch point may be chosen in: its first `drawn_length` tokens, stopped before
    EOS. Returns (window ids, whether the sample hit EOS inside the drawn length)."""
    window = list(sample[:drawn_length])
    eos_at = first_eos(window, eos_token_ids)
    return (window if eos_at is None else window[:eos_at]), eos_at is not None


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


@dataclass(frozen=True)
class Columns:
    """(rows, width) positions of a batch's completion columns and where each row's segments end."""

    position: torch.Tensor  # (1, width)
    prefix_end: torch.Tensor  # (rows, 1)
    guidance_end: torch.Tensor  # (rows, 1)
    end: torch.Tensor  # (rows, 1): after the postfix

    @classmethod
    def of(cls, segments: Segments, width: int) -> Columns:
        prefix = torch.tensor(segments.prefix).unsqueeze(1)
        guide_end = prefix + torch.tensor(segments.guidance).unsqueeze(1)
        end = guide_end + torch.tensor(segments.postfix).unsqueeze(1)
        return cls(torch.arange(width).unsqueeze(0), prefix, guide_end, end)

    @property
    def in_guidance(self) -> torch.Tensor:
        return ((self.position >= self.prefix_end) & (self.position < self.guidance_end)).float()

    @property
    def in_completion(self) -> torch.Tensor:
        return (self.position < self.end).float()

    def decaying_postfix(self, decay: float, floor: float) -> torch.Tensor:
        """The guidance at 1 and postfix token k after it at max(decay**(k+1), floor)."""
        steps_after = (self.position - self.guidance_end).clamp(min=0).float()
        in_postfix = ((self.position >= self.guidance_end) & (self.position < self.end)).float()
        return self.in_guidance + in_postfix * torch.clamp(decay ** (steps_after + 1), min=floor)


@dataclass(frozen=True)
class LossScope:
    """What one `guidance_loss_scope` trains (see `LOSS_SCOPES`)."""

    # (columns, postfix_decay, postfix_min_weight) -> (rows, width) float weight of each completion token
    weights: Callable[[Columns, float, float], torch.Tensor]
    # Nothing after the last guidance token is trained: those columns can be dropped before the loss forward.
    ends_at_guidance: bool = False
    # Weights between 0 and 1: they travel as (B, T) advantages (a binary scope needs only the mask).
    fractional: bool = False
    # Only tokens whose sampling probability was below `loss_prob_threshold` are trained (SPO's mask), in the
    # shared prefix too.
    probability_mask: bool = False
    # The shared prefix tokens are among the trained ones (TreeRL's prefix advantage needs them).
    trains_prefix: bool = False


# Scope table for `GuidedGRPOConfig.guidance_loss_scope`: name -> what it trains (`loss_weights`, and
# `trl_guided.loss_focus.LossFocus` for the rest of the rewrite).
LOSS_SCOPES: dict[str, LossScope] = {
    "guidance": LossScope(lambda columns, decay, floor: columns.in_guidance, ends_at_guidance=True),
    "guidance_postfix": LossScope(
        lambda columns, decay, floor: columns.decaying_postfix(decay, floor), fractional=True
    ),
    "completion": LossScope(lambda columns, decay, floor: columns.in_completion, trains_prefix=True),
    "low_prob": LossScope(
        lambda columns, decay, floor: columns.in_completion, probability_mask=True, trains_prefix=True
    ),
}


def loss_scope(name: str) -> LossScope:
    """The `LOSS_SCOPES` entry of `name`; ValueError naming the choices when there is none."""
    if name not in LOSS_SCOPES:
        raise ValueError(f"guidance_loss_scope={name!r} is unknown; choose one of {list(LOSS_SCOPES)}.")
    return LOSS_SCOPES[name]


def loss_weights(
    segments: Segments, width: int, scope: str, postfix_decay: float = 0.9, postfix_min_weight: float = 0.0
) -> torch.Tensor:
    """(rows, width) float weights of completion tokens for the loss, by `scope` (see `LOSS_SCOPES`).

    `"low_prob"` gives the whole completion here; `low_prob_mask` then keeps its low-probability tokens.
    """
    return loss_scope(scope).weights(Columns.of(segments, width), postfix_decay, postfix_min_weight)


def low_prob_mask(sampling_logps: torch.Tensor, completion_mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """SPO's probability mask: (rows, width) bool, True for the completion tokens whose sampling probability was
    strictly below `threshold`. Compared in the log domain in float64 (`logp < log(threshold)`), so a token exactly at
    the threshold is not trained; a NaN log-prob is never trained; padding (mask 0) never is."""
    below = sampling_logps.double() < math.log(threshold)
    return below & completion_mask.bool()


def prefix_columns(prefix_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, width) bool: the columns of each row's shared prefix."""
    position = torch.arange(width, device=prefix_lengths.device).unsqueeze(0)
    return position < prefix_lengths.unsqueeze(1)


def prefix_source_rows(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    prefix_lengths: torch.Tensor,
) -> torch.Tensor:
    """(rows,) for every row, the first row of the batch with the same prompt and the same shared prefix (itself when
    it is the first, has no prefix, or has no completion token left, e.g. masked as truncated). Rows with one source
    hold one node of the rollout tree in their prefix columns: the same tokens in the same context, so one value
    (probability, entropy, mask decision) per column."""
    first: dict[tuple, int] = {}
    sources = []
    live = (completion_mask.sum(dim=1) > 0).tolist()
    for row, length in enumerate(prefix_lengths.tolist()):
        if not (length and live[row]):
            sources.append(row)
            continue
        prompt = tuple(prompt_ids[row][prompt_mask[row].bool()].tolist())
        key = (prompt, tuple(completion_ids[row, :length].tolist()))
        sources.append(first.setdefault(key, row))
    return torch.tensor(sources, dtype=torch.long, device=completion_ids.device)


def share_prefix(values: torch.Tensor, sources: torch.Tensor, prefix_lengths: torch.Tensor) -> torch.Tensor:
    """`values` (rows, width) with each row's prefix columns taken from its source row (see `prefix_source_rows`)."""
    in_prefix = prefix_columns(prefix_lengths, values.size(1)).to(values.device)
    return torch.where(in_prefix, values[sources], values)


def prefix_copies(sources: torch.Tensor, prefix_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, width) bool: prefix columns of rows that are not their node's source row (the repeats of a shared
    prefix token, which a batch statistic must count once)."""
    repeated = sources != torch.arange(sources.numel(), device=sources.device)
    return prefix_columns(prefix_lengths, width) & repeated.unsqueeze(1)


# `GuidedGRPOConfig.tree_advantage`: how a row's advantage is built when a group holds K branch sets.
TREE_ADVANTAGES = ("group", "branch", "group+branch", "treerl")


def _nanstd(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Unbiased standard deviation ignoring NaN (TRL's `nanstd`), along `dim`."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=dim)
    variance = torch.nanmean((values - mean) ** 2, dim=dim) * count / (count - 1).clamp(min=1)
    return variance.sqrt()


def _spread(rewards: torch.Tensor, unit: int, scale: str) -> torch.Tensor:
    """Per-row divisor of a centred reward, by TRL's `scale_rewards`: std within runs of `unit` rows ("group"), of
    the whole batch ("batch"), or none."""
    if scale == "none":
        return torch.ones_like(rewards)
    if scale == "batch":
        return (_nanstd(rewards, 0) + 1e-4).expand_as(rewards)
    return (_nanstd(rewards.view(-1, unit), 1) + 1e-4).repeat_interleave(unit)


def branch_advantages(rewards: torch.Tensor, set_size: int, scale: str = "group") -> torch.Tensor:
    """TreeRL's local advantage: each reward against the mean of its branch set (runs of `set_size` rows), divided as
    TRL's `scale_rewards` says (the set's std for "group"). Unscorable rows (NaN) get 0 and are left out of the means.
    """
    set_means = torch.nanmean(rewards.view(-1, set_size), dim=1).repeat_interleave(set_size)
    return torch.nan_to_num((rewards - set_means) / _spread(rewards, set_size, scale), nan=0.0)


def prefix_advantages(rewards: torch.Tensor, group_size: int, set_size: int, scale: str = "group") -> torch.Tensor:
    """Per row, the advantage of its branch set's prefix: the set's mean reward against the group's, divided by the
    group's std (for `scale="group"`), i.e. the mean of TRL's group advantages over the set."""
    set_means = torch.nanmean(rewards.view(-1, set_size), dim=1).repeat_interleave(set_size)
    group_means = torch.nanmean(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size)
    return torch.nan_to_num((set_means - group_means) / _spread(rewards, group_size, scale), nan=0.0)


def treerl_prefix_advantages(
    rewards: torch.Tensor, group_size: int, set_size: int, scale: str = "group"
) -> torch.Tensor:
    """Per row, TreeRL's advantage of its shared prefix node: (global + local) / sqrt(leaves below the node).

    In the two-level tree (prompt -> K prefixes -> `set_size` branches each) a prefix's parent is the root, so its
    global and local advantages are both its set's mean reward against the group's (`prefix_advantages`), and its
    leaves are the `set_size` branches. Every branch row carries the prefix tokens, so the node's total weight is
    `set_size / sqrt(set_size) = sqrt(set_size)` times its advantage instead of `set_size` times."""
    return 2 * prefix_advantages(rewards, group_size, set_size, scale) / math.sqrt(set_size)
