"""The ballast: a process that keeps one core busy while a batch has one run left, so a lone run sees the load of a
partner, as the paired ones do. Only numpy: it starts at once."""

from __future__ import annotations

import numpy as np


def ballast() -> None:
    """One thread of matrix products until terminated: the load of a run."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((256, 256)), rng.standard_normal((256, 256))
    while True:
        a = np.tanh(a @ b)
