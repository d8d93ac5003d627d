"""How a guided batch's loss focuses: TRL's scored batch restricted to the trained tokens of `guidance_loss_scope`.

`GuidedGRPOTrainer._generate_and_score_completions` hands each scored batch here (with the rollout's segments): binary
masks go into TRL's `tool_mask` slot, fractional weights become (B, T) advantages, the postfix columns are dropped in
a scope that ends at the guidance, the probability-masked scope's mask comes from the sampling-time log-probs, and
`tree_advantage` / `prefix_advantage_weight` rewrite the advantages. What each scope trains is its entry in
`trl_guided.guidance.LOSS_SCOPES`, the masks and weights the pure functions there; this module applies them to a
batch. `LossFocus` holds the values and callables it uses (the trainer wires them: `GuidedGRPOTrainer._loss_focus_of`).
TRL 1.16 relied on: `_compute_loss` multiplies `tool_mask` into the loss, its normaliser, KL and entropy, and accepts
2-D advantages; the batch keys below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .guidance import (
    LossScope,
    Segments,
    branch_advantages,
    loss_scope,
    loss_weights,
    low_prob_mask,
    prefix_advantages,
    prefix_columns,
    prefix_source_rows,
    share_prefix,
    treerl_prefix_advantages,
)

# Tensors of TRL's scored batch that have one column per completion token.
_COMPLETION_COLUMNS = (
    "completion_ids",
    "completion_mask",
    "old_per_token_logps",
    "ref_per_token_logps",
    "sampling_per_token_logps",
    "importance_sampling_ratio",
    "tool_mask",
    "advantages",  # (B, T) once fractional weights are folded in
)
# Tensors with one column per prompt + completion token.
_SEQUENCE_COLUMNS = ("token_type_ids", "mm_token_type_ids")


@dataclass
class LossFocus:
    """The loss-focus rewrite of scored batches, from the guided settings and the few trainer values it uses.

    `score(input_ids, attention_mask, logits_to_keep)` is a no-grad forward of the current policy at the sampling
    temperature, returning (B, logits_to_keep) log-probs (the trainer's own scoring forward; used by the probability
    mask when TRL computed no old log-probs). `group_size()` is TRL's `num_generations` of the current mode (train or
    eval). `gather` is the processes' all-gather (identity on one process) and `process_index` this one's place in it.
    `log_metric(name, value)` logs a value for the current step.
    """

    scope: str = "guidance_postfix"
    postfix_decay: float = 0.9
    postfix_min_weight: float = 0.0
    loss_prob_threshold: float = 0.9
    normalization: str = "trained"  # `guidance_loss_normalization`
    tree_advantage: str = "group"
    prefix_advantage_weight: float = 0.0
    num_prefixes_per_group: int = 1
    # TRL's settings of the trainer
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    reward_weights: torch.Tensor | None = None  # None: every reward function weighs 1
    pad_to_multiple_of: int | None = None
    group_size: Callable[[], int] = lambda: 1
    score: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor
    process_index: int = 0
    log_metric: Callable[[str, float], None] = lambda name, value: None

    rule: LossScope = field(init=False)  # what `scope` trains: its `LOSS_SCOPES` entry

    def __post_init__(self):
        self.rule = loss_scope(self.scope)

    def tree_advantages(self, output: dict[str, Any], rewards_per_func: torch.Tensor) -> torch.Tensor | None:
        """Apply `tree_advantage` to `output["advantages"]`; return each row's prefix advantage (None: untrained).

        Rows of a group are laid out branch set by branch set (see `GuidedSampler`), in the same order in the rewards
        TRL gathered from all processes, of which this process holds the contiguous slice TRL keeps.
        """
        if self.tree_advantage == "group" and self.prefix_advantage_weight == 0:
            return None
        group_size = self.group_size()
        set_size = group_size // self.num_prefixes_per_group
        device = rewards_per_func.device
        weights = self.reward_weights
        weights = torch.ones(rewards_per_func.size(1)) if weights is None else weights
        rewards = (rewards_per_func * weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan  # unscorable rows, as TRL marks them
        rows = output["advantages"].size(0)
        local = slice(self.process_index * rows, (self.process_index + 1) * rows)
        advantages = output["advantages"]
        if self.tree_advantage != "group":
            branch = branch_advantages(rewards, set_size, self.scale_rewards)[local].to(advantages)
            output["advantages"] = branch if self.tree_advantage == "branch" else advantages + branch
        if self.tree_advantage == "treerl":  # leaves: global + local as "group+branch"; prefix nodes: TreeRL's weight
            return treerl_prefix_advantages(rewards, group_size, set_size, self.scale_rewards)[local].to(advantages)
        if self.prefix_advantage_weight == 0:
            return None
        prefix = prefix_advantages(rewards, group_size, set_size, self.scale_rewards)[local]
        return self.prefix_advantage_weight * prefix.to(advantages)

    def apply(
        self, output: dict[str, Any], segments: Segments, prefix_advantage: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """Restrict TRL's scored batch to the trained tokens of `scope` (and the prefix tokens, with their own
        advantage, when `prefix_advantage` is given)."""
        scope = self.rule
        completion_mask = output["completion_mask"]
        completion_tokens = completion_mask.sum(dim=1)  # per row, before any column is dropped
        width = completion_mask.size(1)
        weights = loss_weights(segments, width, self.scope, self.postfix_decay, self.postfix_min_weight)
        weights = weights.to(completion_mask.device)
        if scope.ends_at_guidance:  # nothing after the last guidance token is trained: drop those columns
            keep = self._columns_to_keep(segments, width)
            output = drop_columns_after(output, keep, width)
            weights = weights[:, :keep]
        prefix_lengths = torch.tensor(segments.prefix, device=weights.device)
        if scope.probability_mask:
            weights = weights * self.low_prob_tokens(output, prefix_lengths).to(weights.dtype)
        trained = (weights > 0).to(completion_mask.dtype)
        if "tool_mask" in output:
            trained = trained * output["tool_mask"]
        output["tool_mask"] = trained
        if scope.fractional:
            output["advantages"] = output["advantages"].unsqueeze(1) * weights
        if prefix_advantage is not None:
            in_prefix = prefix_columns(prefix_lengths, weights.size(1))
            advantages = output["advantages"]
            if advantages.dim() == 1:
                advantages = advantages.unsqueeze(1) * weights
            output["advantages"] = torch.where(in_prefix, prefix_advantage.unsqueeze(1), advantages)
            if not scope.probability_mask:  # a probability mask trains only the prefix's low-probability tokens
                trained = torch.maximum(trained, in_prefix.to(trained.dtype))
            output["tool_mask"] = trained
            weights = torch.where(in_prefix, torch.ones_like(weights), weights)  # prefix tokens: their own advantage
        loss_mask = output["completion_mask"] * trained
        if scope.fractional:
            output = self.weighted_mean(output, weights, loss_mask)
        output["num_items_in_batch"] = self.gather(loss_mask.sum()).sum()
        if self.normalization == "completion":
            output = self.normalize_by_completion(output, loss_mask.sum(dim=1), completion_tokens)
        self.log_metric("guidance/trained_tokens", self.gather(loss_mask.sum(dim=1).float()).mean().item())
        # Per row, for the loss-time view (`_loss_view_of`): the micro-batches TRL shuffles out of this batch still
        # know where each row's shared prefix ends and how many completion tokens it had before columns were dropped.
        output["guidance_prefix_tokens"] = prefix_lengths
        output["guidance_completion_tokens"] = completion_tokens
        return output

    def weighted_mean(self, output: dict[str, Any], weights: torch.Tensor, loss_mask: torch.Tensor) -> dict[str, Any]:
        """Rescale a fractional scope's weights (folded into the (B, T) advantages) to average 1 over the tokens its
        loss type's normaliser counts, so the policy-gradient term is the weighted mean of its token terms while the
        KL and entropy terms keep plain GRPO's per-token mean over the trained tokens: `beta` and the entropy
        coefficient mean the same in every scope, and scaling every weight by a constant changes nothing.

        `grpo`/`sapo` normalise per row; `bnpo` per micro-batch (the weight sums travel with the rows and
        `micro_batch` rescales at loss time); the others over the generation batch of every process.
        """
        weights = weights.to(output["advantages"].dtype)
        weight_sums = (weights * loss_mask).sum(dim=1)
        counts = loss_mask.sum(dim=1).to(weight_sums.dtype)
        if self.loss_type == "bnpo":
            output["guidance_weight_sums"] = weight_sums
            return output
        if self.loss_type in ("grpo", "sapo"):
            scale = torch.where(weight_sums > 0, counts / weight_sums.clamp(min=1e-30), torch.ones_like(counts))
        else:
            total = self.gather(weight_sums.sum()).sum()
            scale = self.gather(counts.sum()).sum() / total if total > 0 else torch.ones((), dtype=counts.dtype)
            scale = scale.to(counts.device).expand_as(counts)
        output["advantages"] = output["advantages"] * scale.unsqueeze(1)
        return output

    def micro_batch(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The loss-time part of `weighted_mean` for `bnpo` (its normaliser is the micro-batch's trained tokens)."""
        weight_sums = inputs.get("guidance_weight_sums")
        if weight_sums is None or weight_sums.sum() <= 0:
            return inputs
        mask = inputs["completion_mask"] * inputs["tool_mask"]
        return {**inputs, "advantages": inputs["advantages"] * (mask.sum() / weight_sums.sum())}

    def _columns_to_keep(self, segments: Segments, width: int) -> int:
        """Completion columns up to the batch's last guidance token, rounded up to `pad_to_multiple_of`."""
        keep = max(max(segments.guidance_end), 1)
        if self.pad_to_multiple_of:
            keep = -(-keep // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return min(keep, width)

    def low_prob_tokens(self, output: dict[str, Any], prefix_lengths: torch.Tensor) -> torch.Tensor:
        """The probability-masked scope (`low_prob`): the completion tokens whose probability under the sampling-time
        policy was below `loss_prob_threshold`, one decision per shared-prefix token (taken from the first row holding
        it).

        The probabilities are the trainer's own forward of the weights that sampled (`sampling_time_logps`), never
        the backend's sampling log-probs: the mask is fixed when the batch is scored (so `num_iterations` > 1 trains
        the same tokens every iteration, and `num_items_in_batch` counts them) and the same on every backend.
        """
        logps = self.sampling_time_logps(output)
        completion_mask = output["completion_mask"]
        sources = prefix_source_rows(
            output["prompt_ids"], output["prompt_mask"], output["completion_ids"], completion_mask, prefix_lengths
        )
        logps = share_prefix(logps, sources, prefix_lengths)
        return low_prob_mask(logps, completion_mask, self.loss_prob_threshold)

    def sampling_time_logps(self, output: dict[str, Any]) -> torch.Tensor:
        """(B, T) log-probs of the completion tokens under the policy that sampled them, at the sampling temperature:
        TRL's `old_per_token_logps` when it computed them; otherwise the policy is still the sampling one (TRL's
        on-policy case) and one no-grad forward (`score`) scores the batch, the same call TRL makes for old log-probs.
        """
        old = output.get("old_per_token_logps")
        if old is not None:
            return old
        if self.score is None:
            raise ValueError("LossFocus needs `score` for the probability mask when the batch has no old log-probs")
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        with torch.no_grad():
            return self.score(input_ids, attention_mask, output["completion_ids"].size(1))

    def normalize_by_completion(
        self, output: dict[str, Any], trained_tokens: torch.Tensor, completion_tokens: torch.Tensor
    ) -> dict[str, Any]:
        """Divide the policy loss by every completion token, as plain GRPO would, instead of by the trained ones.

        TRL's token-count normalisers see the narrowed mask: `dapo`/`cispo`/`vespo` divide by `num_items_in_batch`
        (replaced here), `grpo`/`sapo` by each row's mask sum and `bnpo` by the batch's (the advantages are scaled by
        trained / completion tokens instead; TRL's per-token loss is linear in them). `dr_grpo` and `luspo` count no
        tokens, so both settings are the same there.
        """
        if self.loss_type in ("dapo", "cispo", "vespo"):
            output["num_items_in_batch"] = self.gather(completion_tokens.sum()).sum()
        elif self.loss_type in ("grpo", "sapo", "bnpo"):
            if self.loss_type == "bnpo":
                scale = trained_tokens.sum() / completion_tokens.sum().clamp(min=1)
                scale = scale.expand_as(trained_tokens)
            else:
                scale = trained_tokens / completion_tokens.clamp(min=1)
            advantages = output["advantages"]
            scale = scale.to(advantages.dtype)
            output["advantages"] = advantages * (scale if advantages.dim() == 1 else scale.unsqueeze(1))
        return output


def drop_columns_after(output: dict[str, Any], keep: int, width: int) -> dict[str, Any]:
    """The scored batch with only its first `keep` of `width` completion columns (before the loss forward)."""
    for key in _COMPLETION_COLUMNS:
        value = output.get(key)
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.size(1) == width:
            output[key] = value[:, :keep]
    for key in _SEQUENCE_COLUMNS:
        if key in output:
            output[key] = output[key][:, : output[key].size(1) - (width - keep)]
    return output


def trained_token_totals(
    inputs: dict[str, Any], entropy_mask: torch.Tensor | None, logps: torch.Tensor
) -> torch.Tensor:
    """(trained tokens, completion tokens, summed probability of the trained tokens) of a micro-batch: the tokens
    that carry the policy loss (scope, probability and entropy masks together), their probability under the
    sampling-time policy (TRL's old log-probs, else `logps`, the loss forward's own)."""
    mask = inputs["completion_mask"].float()
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"]
    if entropy_mask is not None:
        mask = mask * entropy_mask
    old = inputs.get("old_per_token_logps")
    logps = (old if old is not None else logps).float()
    return torch.stack([mask.sum(), inputs["guidance_completion_tokens"].sum().float(), (logps.exp() * mask).sum()])
