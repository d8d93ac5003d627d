"""Shared-prefix loss forward (the idea of Prefix Grouper, arXiv 2506.05433).

The G rows of a prompt group repeat the same prompt + prefix. Instead of running every row over the whole sequence,
the shared columns are encoded once per group (with gradient) into a key/value cache, the cache is repeated for the
G rows, and only the columns after the shared part run per row. Positions, attention and log-probs are those of the
plain forward, so the outputs and gradients are the same up to float rounding (tested against the plain forward).

Works on any causal LM patched with TRL's fused LM head (`model(..., shift_labels=..., fused_lm_head=True)` returns
per-token log-probs and entropies). Not usable with gradient checkpointing: checkpointed layers drop the cache.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from transformers import DynamicCache, PretrainedConfig

from .backends import unwrap


def _common_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor) -> int:
    """How many leading columns (ids and mask) all `rows` share."""
    same = (input_ids[rows] == input_ids[rows[:1]]) & (attention_mask[rows] == attention_mask[rows[:1]])
    return int(same.all(dim=0).int().cumprod(dim=0).sum())


def _split_by_prefix(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor, shared: int
) -> list[tuple[torch.Tensor, int]]:
    """Split rows sharing `shared` columns by their next column while that encodes fewer columns in all.

    Encoding a subset once costs its shared columns; each row then runs the rest. Splitting into C subsets that
    share s_c >= shared columns saves sum((n_c - 1) * (s_c - shared)) per-row columns and costs (C - 1) * shared.
    """
    if shared >= input_ids.size(1):
        return [(rows, shared)]
    column = torch.stack([input_ids[rows, shared], attention_mask[rows, shared].to(input_ids.dtype)], dim=1)
    _, subset_of_row = torch.unique(column, dim=0, return_inverse=True)
    subsets = [rows[subset_of_row == s] for s in range(int(subset_of_row.max()) + 1)]
    parts = [(subset, _common_length(input_ids, attention_mask, subset)) for subset in subsets]
    saving = sum((subset.numel() - 1) * (length - shared) for subset, length in parts)
    if saving <= (len(parts) - 1) * shared:
        return [(rows, shared)]
    pieces = []
    for subset, length in parts:
        if subset.numel() > 1:
            pieces += _split_by_prefix(input_ids, attention_mask, subset, length)
        else:
            pieces.append((subset, length))
    return pieces


def shared_prefix_groups(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int, nested: bool = False
) -> tuple[list[tuple[torch.Tensor, int]], torch.Tensor]:
    """Rows that share their prompt, with the number of leading columns they all share; and the unshared rows.

    Returns ([(row indices, shared column count), ...] for groups of two or more rows, indices of single rows). Rows
    are grouped by identical prompt columns (ids and mask); the shared count is the longest common prefix of the
    group's ids and masks, so it covers the guided prefix (and any guidance tokens that happen to agree).
    `nested` (K > 1 prefixes per group): a group is further split into the rows sharing a longer prefix (its branch
    sets) whenever that encodes fewer columns in all.
    """
    keys = torch.cat([input_ids[:, :prompt_width], attention_mask[:, :prompt_width].to(input_ids.dtype)], dim=1)
    _, group_of_row, counts = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
    groups, singles = [], []
    for group in range(counts.numel()):
        rows = (group_of_row == group).nonzero().squeeze(1)
        parts = [(rows, _common_length(input_ids, attention_mask, rows))]
        if nested and rows.numel() > 1:
            parts = _split_by_prefix(input_ids, attention_mask, *parts[0])
        for part_rows, shared in parts:
            if part_rows.numel() == 1 or shared < 2:  # nothing to share (the last shared column always runs per row)
                singles.append(part_rows)
            else:
                groups.append((part_rows, shared))
    single_rows = torch.cat(singles) if singles else input_ids.new_zeros(0)
    return groups, single_rows


def _next_token_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, first_scored: int) -> torch.Tensor:
    """Labels aligned with positions (no shift inside the model): position j is scored on token j + 1."""
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :first_scored] = -100
    return torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), -100)], dim=1)


def shared_prefix_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    compute_entropy: bool = False,
    autocast: AbstractContextManager | None = None,
    nested: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropies) of the last `logits_to_keep` columns, the shared prefix encoded once.

    Same contract as the plain fused forward over `input_ids` (left-padded prompt, then `logits_to_keep` completion
    columns): returns (B, logits_to_keep) tensors, zeros where the mask is 0. `nested`: see `shared_prefix_groups`.
    """
    batch, width = input_ids.shape
    prompt_width = width - logits_to_keep
    labels = _next_token_labels(input_ids, attention_mask, prompt_width)
    pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    groups, singles = shared_prefix_groups(input_ids, attention_mask, prompt_width, nested)

    with autocast or nullcontext():
        if singles.numel():
            out = model(
                input_ids=input_ids[singles],
                attention_mask=attention_mask[singles],
                shift_labels=labels[singles],
                fused_lm_head=True,
            )
            pieces.append((singles, out.log_probs, out.entropy))
        for rows, shared in groups:
            # The last shared column runs with the rows: its next-token label is the first one that may differ.
            cached = shared - 1
            cache = DynamicCache(config=_config_of(model))
            head = model(
                input_ids=input_ids[rows[:1], :cached],
                attention_mask=attention_mask[rows[:1], :cached],
                shift_labels=labels[rows[:1], :cached],
                past_key_values=cache,
                fused_lm_head=True,
            )
            cache.batch_repeat_interleave(rows.numel())
            tail = model(
                input_ids=input_ids[rows, cached:],
                attention_mask=attention_mask[rows],
                shift_labels=labels[rows, cached:],
                past_key_values=cache,
                fused_lm_head=True,
            )
            joined_logps = torch.cat([head.log_probs.expand(rows.numel(), -1), tail.log_probs], dim=1)
            joined_entropy = None
            if compute_entropy:
                joined_entropy = torch.cat([head.entropy.expand(rows.numel(), -1), tail.entropy], dim=1)
            pieces.append((rows, joined_logps, joined_entropy))

    # Position j scores token j + 1, so completion column c (token prompt_width + c) sits at position prompt_width+c-1.
    scored = slice(prompt_width - 1, width - 1)
    dtype = pieces[0][1].dtype
    logps = torch.zeros((batch, logits_to_keep), dtype=dtype, device=input_ids.device)
    entropies = torch.zeros_like(logps) if compute_entropy else None
    for rows, piece_logps, piece_entropy in pieces:
        logps = logps.index_put((rows,), piece_logps[:, scored].to(dtype))
        if compute_entropy:
            entropies = entropies.index_put((rows,), piece_entropy[:, scored].to(dtype))
    return logps, entropies


def _config_of(model: torch.nn.Module) -> PretrainedConfig:
    return unwrap(model).config
