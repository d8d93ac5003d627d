"""Reward functions by name (TRL's reward signature: `f(completions, **kwargs) -> list[float]`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable


def _text(completion) -> str:
    """A completion as plain text: conversational completions are lists of messages."""
    if isinstance(completion, list):
        return "".join(message.get("content", "") for message in completion if isinstance(message, dict))
    return completion


def length(completions, target: int = 200, **kwargs) -> list[float]:
    """The TL;DR seed's simple length reward: `-|target - characters|` (best 0 at the target)."""
    return [-float(abs(target - len(_text(c)))) for c in completions]


def smooth_length(completions, target: int = 300, tolerance: int = 30, scale: float = 0.05, **kwargs) -> list[float]:
    """The TL;DR seed's smooth length reward: 0 within `target ± tolerance` characters, else
    `-scale * sqrt(|target - characters| - tolerance)`."""
    return [-scale * math.sqrt(max(abs(target - len(_text(c))) - tolerance, 0)) for c in completions]


REWARD_FUNCS: dict[str, Callable] = {"length": length, "smooth_length": smooth_length}


def get_reward(name: str, **options) -> Callable:
    """The reward registered as `name`, with `options` bound (e.g. `target=120`); named for TRL's metrics."""
    if name not in REWARD_FUNCS:
        raise ValueError(f"Unknown reward function {name!r}. Known: {sorted(REWARD_FUNCS)}.")
    func = REWARD_FUNCS[name]
    if not options:
        return func
    bound = functools.partial(func, **options)
    bound.__name__ = name  # TRL logs rewards/<__name__>/mean
    return bound
