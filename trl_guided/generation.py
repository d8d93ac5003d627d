"""What a transformers `generate` call can be handed from outside, for the guided phases: defaults for its keyword
arguments (`generate_with`), a per-row token budget (`RowBudgets`, a stopping criterion) and a recorder of the
policy's signals at every sampled token (`SignalRecorder`, a forward hook). No TRL here: `trl_guided.backends` uses
them around TRL's own generate call and around a plain model's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from transformers import StoppingCriteria

from .guidance import TokenSignals


@contextlib.contextmanager
def generate_with(model: torch.nn.Module, **defaults):
    """Inside the block, `model.generate` gets `defaults` for the keyword arguments its caller (TRL) does not pass.

    An instance attribute over the class method; blocks nest, and each restores what was there before it."""
    missing = object()
    previous = vars(model).get("generate", missing)
    generate = model.generate

    def generate_with_defaults(*args, **kwargs):
        for name, value in defaults.items():
            kwargs.setdefault(name, value)
        return generate(*args, **kwargs)

    model.generate = generate_with_defaults
    try:
        yield
    finally:
        if previous is missing:
            del model.generate
        else:
            model.generate = previous


class RowBudgets(StoppingCriteria):
    """Ends each row of one `generate` call once it has generated its own budget of tokens (the caller cuts every
    row there), so the call stops when every row has ended or spent its budget instead of running to the largest.
    Rows that end go on being sampled as padding (transformers samples every row each step), so the random stream,
    and the tokens the rows keep, are those of the call without it."""

    def __init__(self, budgets: Sequence[int]):
        self.budgets = torch.tensor(list(budgets), dtype=torch.long)
        self._width_before = None  # prompt columns (the first call sees one new token)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if self._width_before is None:
            self._width_before = input_ids.size(1) - 1
        return (input_ids.size(1) - self._width_before) >= self.budgets.to(input_ids.device)


class SignalRecorder:
    """The policy's signals at every sampled token, read off the logits a transformers `generate` call computes
    anyway (a forward hook on the model), so a branch point needs no scoring forward of its own.

    Each forward of the call yields the distribution of the next token: its entropy at `temperature` is kept at once;
    the sampled token's log-prob is read on the next forward, which is fed that token (the last one from the
    returned ids). The same quantities as `score_tokens` (log-softmax of the logits at the sampling temperature,
    before top-k/top-p), up to float rounding: generation computes them with its KV cache, scoring in one forward.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature or 1.0
        self.entropies: list[torch.Tensor] = []  # per forward, (rows,)
        self.logprobs: list[torch.Tensor] = []  # per forward after the first, (rows,): the token it was fed
        self._last: torch.Tensor | None = None  # log-softmax of the latest forward, (rows, vocab)

    def __call__(self, module, args, kwargs, output) -> None:
        logps = torch.log_softmax(output.logits[:, -1, :].float() / self.temperature, dim=-1)
        if self._last is not None:
            fed = kwargs.get("input_ids", args[0] if args else None)
            self.logprobs.append(self._last.gather(1, fed[:, -1:].to(logps.device)).squeeze(1))
        self.entropies.append(-(logps.exp() * logps).sum(dim=-1))
        self._last = logps

    @contextlib.contextmanager
    def attached(self, model: torch.nn.Module):
        """Record every forward of `model` inside the block (the transformers model `generate` runs)."""
        handle = model.register_forward_hook(self, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()

    def signals(self, samples: list[list[int]]) -> list[TokenSignals]:
        """`TokenSignals` of each sampled row (its first tokens, as many as the call ran forwards for)."""
        if not samples or not self.entropies:  # no rows (a process's throw-away call), or no forward ran
            return [TokenSignals() for _ in samples]
        steps = len(self.entropies)
        entropies = torch.stack(self.entropies, dim=1).cpu()
        last = torch.tensor([sample[steps - 1] if len(sample) >= steps else 0 for sample in samples], dtype=torch.long)
        final = self._last.gather(1, last.unsqueeze(1).to(self._last.device)).squeeze(1)
        logprobs = torch.stack([*self.logprobs, final], dim=1).cpu()
        entropies, logprobs = entropies.tolist(), logprobs.tolist()
        return [
            TokenSignals(entropies=entropies[row][: len(sample)], logprobs=logprobs[row][: len(sample)])
            for row, sample in enumerate(samples)
        ]
