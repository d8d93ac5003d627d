"""Non-finite values in a training step: an infinite reward read as "no reward", a NaN/inf loss turned into a
zero-gradient step, each counted (`guidance/nonfinite_<kind>`) and warned about once.

`NonFiniteGuard` is a mixin of `GuidedGRPOTrainer` placed before `trl.GRPOTrainer`; it uses the host's `_log_metric`,
`_warn_once`, `reward_func_names` and `state`. TRL 1.16 relied on: `_calculate_rewards` returning the (N, F) gathered
reward matrix with NaN for None, and giving a completion without any reward advantage 0.
"""

from __future__ import annotations

import torch


class NonFiniteGuard:
    """The non-finite handling of `GuidedGRPOTrainer` (a mixin before `trl.GRPOTrainer`)."""

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # Override: TRL already gives a completion whose reward functions all returned None (NaN) advantage 0, but an
        # infinite reward turns every advantage of its group into NaN. Infinite values become "no reward" (NaN) here,
        # and rows left without any reward are counted.
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        infinite = torch.isinf(rewards_per_func)
        if infinite.any():
            names = [self.reward_func_names[i] for i in infinite.any(dim=0).nonzero().flatten().tolist()]
            rows = int(infinite.any(dim=1).sum())
            self._warn_nonfinite(
                "rewards", f"reward function(s) {', '.join(names)} returned inf for {rows} completion(s): read as None"
            )
            rewards_per_func = rewards_per_func.masked_fill(infinite, float("nan"))
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        if unscorable.any():
            self._count_nonfinite(
                "rewards",
                f"{int(unscorable.sum())} completion(s) got no finite reward from any reward function; their "
                "advantage is 0 (TRL)",
                value=unscorable.float().mean().item(),
            )
        return rewards_per_func

    def _finite_or_zero(self, model, loss: torch.Tensor) -> torch.Tensor:
        """The loss, or, when it is NaN/inf, a zero that still reaches every trainable parameter (every process
        takes part in the backward and the gradient all-reduce; the gradients are 0, so no NaN reaches the weights)."""
        if torch.isfinite(loss).all():
            return loss
        self._count_nonfinite("loss", "the loss is not finite (NaN/inf); this step's gradient is set to zero")
        return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0

    def _count_nonfinite(self, kind: str, message: str, value: float = 1.0) -> None:
        """Log `guidance/nonfinite_<kind>` (only on steps where it happens) and warn once per kind."""
        self._log_metric(f"guidance/nonfinite_{kind}", value)
        self._warn_nonfinite(kind, message)

    def _warn_nonfinite(self, kind: str, message: str) -> None:
        step = self.state.global_step
        self._warn_once(
            f"nonfinite_{kind}", f"Non-finite {kind} at step {step}: {message} (guidance/nonfinite_{kind})."
        )
