"""The banded log-domain Sinkhorn kernel: against POT, gradients, debiasing, edge cases, memory."""

from __future__ import annotations

import functools

import numpy as np
import ot as pot
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trl_guided.ot import banded_sinkhorn, banded_sinkhorn_with_stats

OUTSIDE_BAND = 1e4  # POT has no band: a prohibitive cost outside it gives the same plan


def reference_costs(x, y, mask, window, epsilon):
    """Per-row OT cost from POT's log-domain Sinkhorn, the band imposed through the cost matrix."""
    costs = []
    for b in range(x.shape[0]):
        valid = mask[b].nonzero().flatten().numpy()
        if len(valid) == 0:
            costs.append(0.0)
            continue
        xs = torch.nn.functional.normalize(x[b, valid].double(), dim=-1).numpy()
        ys = torch.nn.functional.normalize(y[b, valid].double(), dim=-1).numpy()
        cost = 1.0 - xs @ ys.T
        outside = np.abs(valid[:, None] - valid[None, :]) > window
        banded = np.where(outside, OUTSIDE_BAND, cost)
        weights = np.full(len(valid), 1.0 / len(valid))
        plan = pot.sinkhorn(weights, weights, banded, epsilon, method="sinkhorn_log", numItermax=20000, stopThr=1e-13)
        costs.append(float((plan * np.where(outside, 0.0, cost)).sum()))
    return torch.tensor(costs, dtype=torch.float64)


CASES = [
    # (B, T, H, window, epsilon). Sinkhorn converges slowly at small epsilon (more so with zeros outside the band),
    # so the comparisons use epsilon >= 0.5, where both solvers reach convergence in a few thousand iterations.
    (1, 1, 4, 0, 0.1),
    (2, 5, 3, 1, 0.5),
    (3, 8, 6, 2, 0.5),
    (2, 12, 8, 3, 1.0),
    (4, 7, 5, 10, 0.5),  # window >= T: plain (unbanded) OT
    (2, 9, 6, 8, 1.0),  # window = T - 1: unbanded too
    (2, 16, 4, 0, 0.1),  # window 0: only the identity plan is feasible
    (1, 20, 16, 5, 0.5),
]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("batch, length, hidden, window, epsilon", CASES)
def test_matches_pot_at_convergence(batch, length, hidden, window, epsilon, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, hidden, generator=generator, dtype=torch.float64)
    y = x + 0.7 * torch.randn(batch, length, hidden, generator=generator, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=generator) > 0.3
    mask[0, 0] = True
    if batch > 2:
        mask[-1] = False  # a fully padded row
    result = banded_sinkhorn_with_stats(x, y, mask, window, epsilon, iterations=5000, tolerance=1e-11)
    expected = reference_costs(x, y, mask, window, epsilon)
    torch.testing.assert_close(result.cost, expected, rtol=1e-5, atol=1e-9)
    assert float(result.marginal_error.max()) < 1e-8


def test_window_at_least_length_equals_unbanded():
    x, y = torch.randn(2, 9, 5), torch.randn(2, 9, 5)
    mask = torch.ones(2, 9, dtype=torch.bool)
    full = banded_sinkhorn(x, y, mask, window=8, epsilon=0.1, iterations=300)
    assert torch.allclose(full, banded_sinkhorn(x, y, mask, window=100, epsilon=0.1, iterations=300))
    assert torch.allclose(full, reference_costs(x, y, mask, 100, 0.1).float(), rtol=1e-4)


def test_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    for debiased in (False, True):
        fn = functools.partial(banded_sinkhorn, mask=mask, window=2, epsilon=0.3, iterations=15, debiased=debiased)
        assert torch.autograd.gradcheck(fn, (x, y), eps=1e-6, atol=1e-6)


def test_debiased_divergence_is_zero_at_identity_and_positive_otherwise():
    torch.manual_seed(1)
    x = torch.randn(3, 10, 8)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 7:] = False
    same = banded_sinkhorn(x, x.clone(), mask, window=3, epsilon=0.1, iterations=200, debiased=True)
    assert torch.allclose(same, torch.zeros(3), atol=1e-6)
    other = banded_sinkhorn(x, torch.randn(3, 10, 8), mask, window=3, epsilon=0.1, iterations=200, debiased=True)
    assert bool((other > 1e-3).all())
    # The plain (biased) cost is not 0 at identity: entropic blur.
    assert bool((banded_sinkhorn(x, x, mask, window=3, epsilon=0.1, iterations=200) > 0).all())


@pytest.mark.parametrize(
    "length, window, epsilon, padded",
    [(1, 0, 0.1, False), (1, 4, 0.1, False), (6, 2, 1e-4, False), (6, 2, 0.1, True), (6, 30, 1e-3, True)],
)
def test_no_nan_or_inf_in_values_or_gradients(length, window, epsilon, padded):
    x = torch.randn(3, length, 4, requires_grad=True)
    y = torch.randn(3, length, 4, requires_grad=True)
    mask = torch.ones(3, length, dtype=torch.bool)
    if padded:
        mask[0] = False
        mask[2, -1] = False
    for debiased in (False, True):
        cost = banded_sinkhorn(x, y, mask, window, epsilon, iterations=40, debiased=debiased)
        assert torch.isfinite(cost).all()
        grad_x, grad_y = torch.autograd.grad(cost.sum(), (x, y))
        assert torch.isfinite(grad_x).all() and torch.isfinite(grad_y).all()
        if padded:
            assert cost[0] == 0 and grad_x[0].abs().sum() == 0


def test_low_precision_inputs_compute_in_float32():
    x, y = torch.randn(2, 6, 4).bfloat16(), torch.randn(2, 6, 4).bfloat16()
    cost = banded_sinkhorn(x, y, torch.ones(2, 6, dtype=torch.bool), window=2, epsilon=0.1)
    assert cost.dtype == torch.float32 and torch.isfinite(cost).all()


def test_tolerance_stops_early_and_reports_the_error():
    x, y = torch.randn(2, 12, 6), torch.randn(2, 12, 6)
    mask = torch.ones(2, 12, dtype=torch.bool)
    capped = banded_sinkhorn_with_stats(x, y, mask, 3, 0.5, iterations=1000, tolerance=1e-4)
    assert capped.iterations < 1000 and float(capped.marginal_error.max()) <= 1e-4
    one = banded_sinkhorn_with_stats(x, y, mask, 3, 0.05, iterations=1)
    assert one.iterations == 1 and float(one.marginal_error.max()) > 1e-4


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def _largest_allocation(length: int, window: int = 4, batch: int = 2, hidden: int = 8) -> int:
    x = torch.randn(batch, length, hidden, requires_grad=True)
    y = torch.randn(batch, length, hidden)
    mask = torch.ones(batch, length, dtype=torch.bool)
    with LargestTensor() as mode:
        banded_sinkhorn(x, y, mask, window=window, epsilon=0.1, iterations=5).sum().backward()
    return mode.largest


def test_memory_grows_linearly_in_length_at_fixed_window():
    small, large = _largest_allocation(128), _largest_allocation(1024)
    assert large <= 2 * 1024 * 8 * (2 * 4 + 1) * 2  # O(B * T * max(H, K)), with slack for padding
    assert large / small < 8 * 1.2, f"largest tensor grew {large / small:.1f}x for 8x the length"
    assert large < 2 * 1024 * 1024, "a (B, T, T) tensor was allocated"
