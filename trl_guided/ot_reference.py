"""The OT term's plumbing in a `GuidedGRPOTrainer`: the frozen reference model, its hidden states of a scored batch,
the policy's hidden states captured during TRL's loss forward, and the penalty of `trl_guided.ot` on the two.

`trl_guided.ot` is the pure solver; this module is the part that knows models (TRL's reference model, DeepSpeed /
FSDP preparation, PEFT adapters), as `trl_guided.backends` is for rollouts. It gets the values it uses, not the
trainer: the trainer wires `GRPOTrainer.ref_model`, `.model` and `.accelerator` (`GuidedGRPOTrainer.__init__`).
TRL 1.16 names used here: `trl.models.prepare_deepspeed`, `prepare_fsdp`; `trl.trainer.utils.create_model_from_path`,
`disable_dropout_in_model`, `get_config_model_id`, `use_adapter`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import is_peft_model
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.utils import create_model_from_path, disable_dropout_in_model, get_config_model_id, use_adapter

from .backends import decoder_of, unwrap
from .ot import banded_sinkhorn_with_stats


@contextlib.contextmanager
def capture_hidden_states(model):
    """Collect the backbone's last hidden state of every forward inside the block (gradients flow)."""
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = decoder_of(model).register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def build_reference_model(settings, policy, accelerator):
    """The frozen copy of the starting model that `ot_reference="ref"` compares against when TRL built no reference
    model (`beta` == 0); None under PEFT (the adapter-disabled base serves) or for `ot_reference="old"`. Loaded as TRL
    loads its own reference (`settings` is the `GuidedGRPOConfig`) and prepared for DeepSpeed / FSDP / DDP as the
    Trainer prepares models (its `is_deepspeed_enabled` / `is_fsdp_enabled` read the same plugins)."""
    if settings.ot_reference == "old" or is_peft_model(policy):
        return None
    kwargs = dict(settings.model_init_kwargs or {})
    if settings.distributed_state.distributed_type in ("MULTI_GPU", "MULTI_CPU", "DEEPSPEED"):
        kwargs["device_map"] = None
    kwargs.setdefault("dtype", policy.dtype)
    kwargs.setdefault("trust_remote_code", settings.trust_remote_code)
    reference = create_model_from_path(get_config_model_id(policy.config), **kwargs)
    reference.requires_grad_(False)
    if settings.disable_dropout:
        disable_dropout_in_model(reference)
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        return prepare_deepspeed(reference, accelerator)
    if getattr(accelerator.state, "fsdp_plugin", None) is not None:
        return prepare_fsdp(reference, accelerator)
    return accelerator.prepare_model(reference, evaluation_mode=True)


class OTReference:
    """The reference side of the OT term (`ot_coef` > 0): `ot_reference="ref"` compares with a frozen reference
    (TRL's `trl_reference`, else `model`, the one `build_reference_model` built; the base model with the adapter off
    under PEFT), `ot_reference="old"` with the policy that sampled the batch.

    `settings` is the `GuidedGRPOConfig` (its `ot_*` fields, `old_policy_is_current` and the per-device batch sizes),
    `policy` the trained model (its `training` flag says train or eval), `accelerator` the processes' (`reduce`,
    `gather`), `log_metric(name, value)` logs a value for the current step.
    """

    def __init__(
        self,
        settings,
        policy: torch.nn.Module,
        accelerator,
        log_metric: Callable[[str, float], None],
        trl_reference: torch.nn.Module | None = None,
        model: torch.nn.Module | None = None,
    ):
        self.settings, self.policy, self.accelerator, self.log_metric = settings, policy, accelerator, log_metric
        self.trl_reference = trl_reference
        self.model = model  # None: TRL's `ref_model`, the PEFT base, or the policy itself serves

    def attach(self, output: dict[str, Any]) -> dict[str, Any]:
        """The scored batch with `ot_reference_states` (none when the old policy is the current one: the loss then
        takes the current states, detached, as the reference, with no forward)."""
        args = self.settings
        if not (args.ot_reference == "old" and args.old_policy_is_current):
            output["ot_reference_states"] = self.states(output)
        return output

    def states(self, output: dict[str, Any]) -> torch.Tensor:
        """(B, C, H) reference hidden states of the completion tokens, without gradient."""
        args, policy = self.settings, self.policy
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        width = output["completion_ids"].size(1)
        frozen = self.trl_reference if self.trl_reference is not None else self.model
        if args.ot_reference == "old":
            model, context = policy, contextlib.nullcontext()
        elif frozen is not None:
            model, context = frozen, contextlib.nullcontext()
        else:  # PEFT: the base model with the adapter disabled (or TRL's "ref" adapter when re-training one)
            unwrapped = unwrap(policy)
            model = policy
            context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        batch_size = args.per_device_train_batch_size if policy.training else args.per_device_eval_batch_size
        chunks = []
        with torch.no_grad(), context:
            backbone = decoder_of(model)
            for start in range(0, input_ids.size(0), batch_size):
                out = backbone(
                    input_ids=input_ids[start : start + batch_size],
                    attention_mask=attention_mask[start : start + batch_size],
                )
                chunks.append(out.last_hidden_state[:, -width:])
        states = torch.cat(chunks)
        return states.cpu() if args.ot_reference_on_cpu else states

    def penalty(self, inputs: dict[str, Any], hidden_states: torch.Tensor) -> torch.Tensor:
        """The mean hinge `max(0, cost - ot_target)` over the micro-batch's rows with trained tokens, between the
        policy's captured `hidden_states` and the reference's; logs `ot/cost`, `ot/penalty`, `ot/marginal_error`."""
        args, accelerator = self.settings, self.accelerator
        width = inputs["completion_ids"].size(1)
        current = hidden_states[:, -width:]
        reference = inputs.get("ot_reference_states")  # kept in `inputs`: num_iterations > 1 reuses them
        reference = current.detach() if reference is None else reference.to(current.device)
        mask = inputs["completion_mask"] * inputs["tool_mask"] if "tool_mask" in inputs else inputs["completion_mask"]
        result = banded_sinkhorn_with_stats(
            current,
            reference,
            mask,
            window=args.ot_window,
            epsilon=args.ot_epsilon,
            iterations=args.ot_iterations,
            debiased=args.ot_debiased,
            tolerance=args.ot_tolerance,
        )
        has_tokens = mask.sum(-1) > 0
        penalty = torch.clamp(result.cost - args.ot_target, min=0.0)
        penalty = (penalty * has_tokens).sum() / has_tokens.sum().clamp(min=1)

        def rows_mean(values: torch.Tensor) -> float:
            totals = accelerator.reduce(
                torch.stack([(values.detach() * has_tokens).sum(), has_tokens.sum().float()]), reduction="sum"
            )
            return (totals[0] / totals[1].clamp(min=1)).item()

        self.log_metric("ot/cost", rows_mean(result.cost))
        self.log_metric("ot/penalty", accelerator.gather(penalty.detach()).mean().item())
        self.log_metric("ot/marginal_error", rows_mean(result.marginal_error))
        return penalty
