"""How a guided batch's loss focuses: TRL's scored batch restricted to the trained tokens of `guidance_loss_scope`.

`GuidedGRPOTrainer._generate_and_score_completions` hands each scored batch here (with the rollout's segments): binary
masks go into TRL's `tool_mask` slot, fractional weights become (B, T) advantages, the postfix columns are dropped in
the `guidance` scope, the `low_prob` scope's mask comes from the sampling-time log-probs, and `tree_advantage` /
`prefix_advantage_weight` rewrite the advantages. The masks and weights themselves are the pure functions of
`trl_guided.guidance`; this module applies them to the trainer's batch, as `trl_guided.backends` does for rollouts.
TRL 1.16 relied on: `_compute_loss` multiplies `tool_mask` into the loss, its normaliser, KL and entropy, and accepts
2-D advantages; `GRPOTrainer.num_generations(_eval)`, `.scale_rewards`, `.reward_weights`, `.pad_to_multiple_of`,
`.loss_type`, `._metrics`, `._get_per_token_logps_and_entropies`.
"""

from __future__ import annotations

from typing import Any

import torch

from .guidance import (
    Segments,
    branch_advantages,
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
)
# Tensors with one column per prompt + completion token.
_SEQUENCE_COLUMNS = ("token_type_ids", "mm_token_type_ids")


class LossFocus:
    """The loss-focus rewrite of one `GuidedGRPOTrainer`'s scored batches."""

    def __init__(self, trainer):
        self.trainer = trainer

    def tree_advantages(self, output: dict[str, Any], rewards_per_func: torch.Tensor) -> torch.Tensor | None:
        """Apply `tree_advantage` to `output["advantages"]`; return each row's prefix advantage (None: untrained).

        Rows of a group are laid out branch set by branch set (see `GuidedSampler`), in the same order in the rewards
        TRL gathered from all processes, of which this process holds the contiguous slice TRL keeps.
        """
        trainer = self.trainer
        args = trainer.args
        if args.tree_advantage == "group" and args.prefix_advantage_weight == 0:
            return None
        group_size = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
        set_size = group_size // args.num_prefixes_per_group
        device = rewards_per_func.device
        rewards = (rewards_per_func * trainer.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan  # unscorable rows, as TRL marks them
        rows = output["advantages"].size(0)
        local = slice(trainer.accelerator.process_index * rows, (trainer.accelerator.process_index + 1) * rows)
        advantages = output["advantages"]
        if args.tree_advantage != "group":
            branch = branch_advantages(rewards, set_size, trainer.scale_rewards)[local].to(advantages)
            output["advantages"] = branch if args.tree_advantage == "branch" else advantages + branch
        if args.tree_advantage == "treerl":  # leaves: global + local as "group+branch"; prefix nodes: TreeRL's weight
            return treerl_prefix_advantages(rewards, group_size, set_size, trainer.scale_rewards)[local].to(advantages)
        if args.prefix_advantage_weight == 0:
            return None
        prefix = prefix_advantages(rewards, group_size, set_size, trainer.scale_rewards)[local]
        return args.prefix_advantage_weight * prefix.to(advantages)

    def apply(
        self, output: dict[str, Any], segments: Segments, prefix_advantage: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """Restrict TRL's scored batch to the trained tokens of `guidance_loss_scope` (and the prefix tokens, with
        their own advantage, when `prefix_advantage` is given)."""
        trainer = self.trainer
        args = trainer.args
        completion_mask = output["completion_mask"]
        completion_tokens = completion_mask.sum(dim=1)  # per row, before any column is dropped
        width = completion_mask.size(1)
        weights = loss_weights(
            segments, width, args.guidance_loss_scope, args.postfix_decay, args.postfix_min_weight
        ).to(completion_mask.device)
        if args.guidance_loss_scope == "guidance":
            # Nothing after the last guidance token is trained: drop those columns before the loss forward.
            keep = max(max(segments.guidance_end), 1)
            if trainer.pad_to_multiple_of:
                keep = -(-keep // trainer.pad_to_multiple_of) * trainer.pad_to_multiple_of
            keep = min(keep, width)
            for key in _COMPLETION_COLUMNS:
                value = output.get(key)
                if isinstance(value, torch.Tensor) and value.dim() == 2 and value.size(1) == width:
                    output[key] = value[:, :keep]
            for key in _SEQUENCE_COLUMNS:
                if key in output:
                    output[key] = output[key][:, : output[key].size(1) - (width - keep)]
            weights = weights[:, :keep]
        prefix_lengths = torch.tensor(segments.prefix, device=weights.device)
        if args.guidance_loss_scope == "low_prob":
            weights = weights * self.low_prob_tokens(output, prefix_lengths).to(weights.dtype)
        trained = (weights > 0).to(completion_mask.dtype)
        if "tool_mask" in output:
            trained = trained * output["tool_mask"]
        output["tool_mask"] = trained
        if args.guidance_loss_scope == "guidance_postfix":
            output["advantages"] = output["advantages"].unsqueeze(1) * weights
        if prefix_advantage is not None:
            in_prefix = prefix_columns(prefix_lengths, weights.size(1))
            advantages = output["advantages"]
            if advantages.dim() == 1:
                advantages = advantages.unsqueeze(1) * weights
            output["advantages"] = torch.where(in_prefix, prefix_advantage.unsqueeze(1), advantages)
            if args.guidance_loss_scope != "low_prob":  # low_prob trains only the prefix's low-probability tokens
                trained = torch.maximum(trained, in_prefix.to(trained.dtype))
            output["tool_mask"] = trained
        loss_mask = output["completion_mask"] * trained
        output["num_items_in_batch"] = trainer.accelerator.gather(loss_mask.sum()).sum()
        if args.guidance_loss_normalization == "completion":
            output = self.normalize_by_completion(output, loss_mask.sum(dim=1), completion_tokens)
        mode = "train" if trainer.model.training else "eval"
        trained_per_row = trainer.accelerator.gather(loss_mask.sum(dim=1).float())
        trainer._metrics[mode]["guidance/trained_tokens"].append(trained_per_row.mean().item())
        # Per row, for the loss-time view (`_loss_view_of`): the micro-batches TRL shuffles out of this batch still
        # know where each row's shared prefix ends and how many completion tokens it had before columns were dropped.
        output["guidance_prefix_tokens"] = prefix_lengths
        output["guidance_completion_tokens"] = completion_tokens
        return output

    def low_prob_tokens(self, output: dict[str, Any], prefix_lengths: torch.Tensor) -> torch.Tensor:
        """`guidance_loss_scope="low_prob"`: the completion tokens whose probability under the sampling-time policy
        was below `loss_prob_threshold`, one decision per shared-prefix token (taken from the first row holding it).

        The probabilities are the trainer's own forward of the weights that sampled (`_sampling_time_logps`), never
        the backend's sampling log-probs: the mask is fixed when the batch is scored (so `num_iterations` > 1 trains
        the same tokens every iteration, and `num_items_in_batch` counts them) and the same on every backend.
        """
        trainer = self.trainer
        logps = self.sampling_time_logps(output)
        completion_mask = output["completion_mask"]
        sources = prefix_source_rows(
            output["prompt_ids"], output["prompt_mask"], output["completion_ids"], completion_mask, prefix_lengths
        )
        logps = share_prefix(logps, sources, prefix_lengths)
        return low_prob_mask(logps, completion_mask, trainer.args.loss_prob_threshold)

    def sampling_time_logps(self, output: dict[str, Any]) -> torch.Tensor:
        """(B, T) log-probs of the completion tokens under the policy that sampled them, at the sampling temperature:
        TRL's `old_per_token_logps` when it computed them; otherwise the policy is still the sampling one (TRL's
        on-policy case) and one no-grad forward scores the batch, the same call TRL makes for old log-probs."""
        trainer = self.trainer
        old = output.get("old_per_token_logps")
        if old is not None:
            return old
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        batch_size = (
            trainer.args.per_device_train_batch_size
            if trainer.model.training
            else trainer.args.per_device_eval_batch_size
        )
        with torch.no_grad():
            logps, _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, input_ids, attention_mask, output["completion_ids"].size(1), batch_size
            )
        return logps

    def normalize_by_completion(
        self, output: dict[str, Any], trained_tokens: torch.Tensor, completion_tokens: torch.Tensor
    ) -> dict[str, Any]:
        """Divide the policy loss by every completion token, as plain GRPO would, instead of by the trained ones.

        TRL's token-count normalisers see the narrowed mask: `dapo`/`cispo`/`vespo` divide by `num_items_in_batch`
        (replaced here), `grpo`/`sapo` by each row's mask sum and `bnpo` by the batch's (the advantages are scaled by
        trained / completion tokens instead; TRL's per-token loss is linear in them). `dr_grpo` and `luspo` count no
        tokens, so both settings are the same there.
        """
        trainer = self.trainer
        loss_type = trainer.loss_type
        if loss_type in ("dapo", "cispo", "vespo"):
            output["num_items_in_batch"] = trainer.accelerator.gather(completion_tokens.sum()).sum()
        elif loss_type in ("grpo", "sapo", "bnpo"):
            if loss_type == "bnpo":
                scale = trained_tokens.sum() / completion_tokens.sum().clamp(min=1)
                scale = scale.expand_as(trained_tokens)
            else:
                scale = trained_tokens / completion_tokens.clamp(min=1)
            advantages = output["advantages"]
            scale = scale.to(advantages.dtype)
            output["advantages"] = advantages * (scale if advantages.dim() == 1 else scale.unsqueeze(1))
        return output
