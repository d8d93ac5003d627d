"""Banded entropic optimal transport between two sequences of hidden states, in the log domain (pure torch).

Token `i` of `x` may only be transported to token `j` of `y` with `|i - j| <= window`. Everything is stored in band
form `(B, T, K)` with `K = 2 * window + 1` and `j = i + k - window`, so memory is O(B * T * K): no `(B, T, T)` tensor
is ever built, forward or backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Finite stand-in for log(0) outside the band: keeps logsumexp and its gradient finite on fully masked rows.
_NEG = -1e30
# Sinkhorn iterations per activation checkpoint (and between tolerance checks).
_CHUNK = 10


@dataclass
class SinkhornResult:
    cost: torch.Tensor  # (B,) transport cost per row
    marginal_error: torch.Tensor  # (B,) L1 error of the row marginals after the last iteration
    iterations: int
    plan: torch.Tensor | None = None  # (B, T, K) band of the transport plan (of the x-y solve), for pictures


def _band(values: torch.Tensor, window: int, fill: float) -> torch.Tensor:
    """(B, T, ...) -> (B, T, K, ...) with out[b, i, k] = values[b, i + k - window] (fill outside [0, T))."""
    pad = [0, 0] * (values.dim() - 2) + [window, window]
    padded = torch.nn.functional.pad(values, pad, value=fill)
    return padded.unfold(1, 2 * window + 1, 1).movedim(-1, 2)


def _transpose_band(band: torch.Tensor, window: int) -> torch.Tensor:
    """Band of the transposed matrix: out[b, j, k'] = band[b, j + k' - window, 2 * window - k']."""
    batch, length, width = band.shape
    padded = torch.nn.functional.pad(band, (0, 0, window, window), value=_NEG)  # (B, T + 2w, K)
    rows = torch.arange(length, device=band.device).unsqueeze(1) + torch.arange(width, device=band.device)
    cols = (2 * window - torch.arange(width, device=band.device)).expand(length, width)
    index = (rows * width + cols).reshape(1, -1).expand(batch, -1)
    return padded.reshape(batch, -1).gather(1, index).reshape(batch, length, width)


def banded_cosine_cost(x: torch.Tensor, y: torch.Tensor, window: int, block: int = 64) -> torch.Tensor:
    """(B, T, K) cost 1 - cos(x_i, y_j) for j = i + k - window (1 outside [0, T), masked later).

    Blocks of `block` rows of x are multiplied with the `block + 2 * window` rows of y around them (batched matmuls),
    and the dot products are divided by the norms afterwards, so no normalized copy of x or y is kept: memory is
    O(B * T * (H + block + window)), never (B, T, T) or (B, T, K, H).
    """
    batch, length, hidden = x.shape
    width = 2 * window + 1
    block = max(1, min(block, length))
    blocks = -(-length // block)
    padded_length = blocks * block
    x_padded = x if padded_length == length else torch.nn.functional.pad(x, (0, 0, 0, padded_length - length))
    y_padded = torch.nn.functional.pad(y, (0, 0, window, padded_length - length + window))
    y_windows = y_padded.unfold(1, block + 2 * window, block)  # (B, blocks, H, block + 2w), a view
    dots = x_padded.view(batch, blocks, block, hidden) @ y_windows  # (B, blocks, block, block + 2w)
    # Row r of a block sits at column r + window of its y window; its band is columns r .. r + 2w.
    index = torch.arange(block, device=x.device).unsqueeze(1) + torch.arange(width, device=x.device)
    band = dots.gather(-1, index.expand(batch, blocks, block, width)).reshape(batch, padded_length, width)[:, :length]
    x_norm = x.norm(dim=-1).clamp(min=1e-8)
    y_norm = _band(y.norm(dim=-1).clamp(min=1e-8), window, fill=1.0)
    return 1.0 - band / (x_norm.unsqueeze(-1) * y_norm)


def banded_sinkhorn_solve(
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    window: int,
    epsilon: float,
    iterations: int = 50,
    tolerance: float | None = None,
) -> SinkhornResult:
    """Entropic OT between the valid tokens of `x` and `y` (uniform marginals), cost 1 - cosine inside the band.

    `iterations` is the cap; with `tolerance`, iteration stops once the row-marginal L1 error of every row is below
    it (checked every 10 iterations). Gradients flow through the unrolled iterations, which are checkpointed in
    chunks of 10 so backward memory does not grow with `iterations`.
    """
    if x.shape != y.shape or x.dim() != 3 or mask.shape != x.shape[:2]:
        raise ValueError(
            f"banded_sinkhorn: x, y must be (B, T, H) and mask (B, T); got {x.shape}, {y.shape}, {mask.shape}"
        )
    if window < 0 or epsilon <= 0 or iterations < 1:
        raise ValueError(
            f"banded_sinkhorn: need window >= 0, epsilon > 0, iterations >= 1; got {window}, {epsilon}, {iterations}"
        )
    length = x.size(1)
    window = min(window, max(length - 1, 0))
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # low-precision inputs compute in fp32
    x, y = x.to(dtype), y.to(dtype)
    mask = mask.bool()
    cost = banded_cosine_cost(x, y, window)  # (B, T, K)
    valid = mask.unsqueeze(-1) & _band(mask, window, fill=False)  # (B, T, K): both tokens valid and j in [0, T)
    scaled = (-cost / epsilon).masked_fill(~valid, _NEG)  # log kernel
    scaled_t = _transpose_band(scaled, window)  # (B, T, K) indexed by (j, k')

    count = mask.sum(-1, keepdim=True).clamp(min=1).to(cost.dtype)
    log_marginal = torch.where(mask, -torch.log(count), torch.zeros_like(count))  # log(1/n) on valid tokens
    f = torch.zeros_like(log_marginal)  # potentials divided by epsilon
    g = torch.zeros_like(log_marginal)

    def run(steps: int, f: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(steps):
            f = torch.where(mask, log_marginal - torch.logsumexp(scaled + _band(g, window, _NEG), dim=-1), 0.0)
            g = torch.where(mask, log_marginal - torch.logsumexp(scaled_t + _band(f, window, _NEG), dim=-1), 0.0)
        return f, g

    done = 0
    while done < iterations:
        steps = min(_CHUNK, iterations - done)
        if torch.is_grad_enabled() and (scaled.requires_grad or scaled_t.requires_grad):
            # Keep only the (B, T) potentials between chunks; the chunk's band tensors are recomputed in backward.
            f, g = torch.utils.checkpoint.checkpoint(run, steps, f, g, use_reentrant=False)
        else:
            f, g = run(steps, f, g)
        done += steps
        if tolerance is not None and done < iterations:
            with torch.no_grad():
                error = _marginal_error(_plan(scaled, f, g, window, valid), log_marginal, mask)
            if bool((error <= tolerance).all()):
                break
    plan = _plan(scaled, f, g, window, valid)
    transport = (plan * cost.masked_fill(~valid, 0.0)).sum(dim=(1, 2))
    error = _marginal_error(plan.detach(), log_marginal, mask)
    return SinkhornResult(cost=transport, marginal_error=error, iterations=done, plan=plan)


def _plan(scaled, f, g, window, valid) -> torch.Tensor:
    """(B, T, K) transport plan exp(log K + f_i + g_j), exactly 0 outside the band and on padded tokens."""
    return (scaled + f.unsqueeze(-1) + _band(g, window, _NEG)).masked_fill(~valid, float("-inf")).exp()


def _marginal_error(plan, log_marginal, mask) -> torch.Tensor:
    """(B,) L1 distance between the plan's row sums and the uniform marginal."""
    target = torch.where(mask, log_marginal.exp(), 0.0)
    return (plan.sum(-1) - target).abs().sum(-1)


def banded_sinkhorn(
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    window: int,
    epsilon: float,
    iterations: int = 50,
    debiased: bool = False,
    tolerance: float | None = None,
) -> torch.Tensor:
    """(B,) banded entropic OT cost between `x` and `y` (B, T, H) over the valid tokens of `mask` (B, T).

    The cost is the transport plan x cost summed and divided by the number of valid tokens (a
    plan with unit mass per token; identical to the plan with uniform probability marginals used here). With
    `debiased=True` it is the Sinkhorn divergence OT(x, y) - OT(x, x) / 2 - OT(y, y) / 2, which is 0 when x == y.
    """
    return banded_sinkhorn_with_stats(x, y, mask, window, epsilon, iterations, debiased, tolerance).cost


def banded_sinkhorn_with_stats(
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    window: int,
    epsilon: float,
    iterations: int = 50,
    debiased: bool = False,
    tolerance: float | None = None,
) -> SinkhornResult:
    """`banded_sinkhorn` that also returns the final marginal error and the iterations run."""
    result = banded_sinkhorn_solve(x, y, mask, window, epsilon, iterations, tolerance)
    if not debiased:
        return result
    xx = banded_sinkhorn_solve(x, x, mask, window, epsilon, iterations, tolerance)
    yy = banded_sinkhorn_solve(y, y, mask, window, epsilon, iterations, tolerance)
    return SinkhornResult(
        cost=result.cost - 0.5 * xx.cost - 0.5 * yy.cost,
        marginal_error=torch.maximum(result.marginal_error, torch.maximum(xx.marginal_error, yy.marginal_error)),
        iterations=max(result.iterations, xx.iterations, yy.iterations),
    )
