"""GuidedGRPOTrainer: TRL's GRPOTrainer with three-phase guided sampling and a guidance-focused loss.

Two narrow overrides, both calling the parent:
- `_generate_single_turn` samples prefix -> guidance -> postfix through the parent's own backend dispatch
  (transformers, vLLM colocate, vLLM server) and hands TRL the whole completion, so rewards see the full text;
- `_generate_and_score_completions` post-processes TRL's scored batch: the trained tokens travel in TRL's `tool_mask`
  slot (fractional weights as (B, T) advantages), and in the `guidance` scope every column after the last guidance
  token is dropped, so the loss forward and backward never see the postfix.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers import DynamicCache
from trl import GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp, unwrap_model_for_generation
from trl.trainer.utils import (
    create_model_from_path,
    disable_dropout_in_model,
    get_config_model_id,
    pad,
    use_adapter,
)

from .config import GuidedGRPOConfig
from .guidance import BRANCH_POINTS, Segments, clip_guidance, draw_lengths, loss_weights, prefix_candidate
from .models import resolve_model_path
from .ot import banded_sinkhorn_with_stats
from .shared_prefix import shared_prefix_logps

logger = logging.getLogger(__name__)

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


class GuidedGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose rollouts branch from a shared prefix per prompt group (see `GuidedGRPOConfig`)."""

    _tag_names = ["trl", "grpo", "trl-guided", "guided-grpo"]
    _name = "Guided GRPO"

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: GuidedGRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
    ):
        if isinstance(model, str):
            model = resolve_model_path(model)
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = GuidedGRPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-GuidedGRPO")
        if not isinstance(args, GuidedGRPOConfig):
            raise TypeError(
                f"GuidedGRPOTrainer needs a GuidedGRPOConfig, got {type(args).__name__}. Build the config with "
                "trl_guided.GuidedGRPOConfig (it accepts every GRPOConfig field)."
            )
        if args.guidance:
            owners = {"tools": tools, "rollout_func": rollout_func, "environment_factory": environment_factory}
            unsupported = [name for name, value in owners.items() if value]
            if unsupported:
                raise ValueError(
                    f"Guided sampling cannot be combined with {', '.join(unsupported)}: those own the rollout "
                    "(multi-turn or custom generation), guidance needs single-turn three-phase sampling. Set "
                    "guidance=False in the config to train them with plain GRPO."
                )
        super().__init__(
            model,
            reward_funcs,
            args,
            train_dataset,
            eval_dataset,
            processing_class,
            reward_processing_classes,
            callbacks,
            optimizers,
            quantization_config,
            peft_config,
            tools,
            rollout_func,
            environment_factory,
        )
        self._guidance_rng = random.Random(args.seed + self.accelerator.process_index)
        self._branch_cut = BRANCH_POINTS[args.branch_point]
        self._segments: Segments | None = None
        self._ot_ref_model = self._build_ot_reference() if args.ot_coef > 0 else None
        if args.ot_coef > 0 and args.ot_reference == "old" and args.old_policy_is_current:
            logger.warning(
                "ot_reference='old' with these settings compares the policy with itself: TRL only keeps an old policy "
                "when gradient_accumulation_steps is not a multiple of steps_per_generation * num_iterations (or with "
                "vLLM importance sampling). The plain OT cost is then only entropic blur and the debiased one is 0. "
                "For a real constraint use ot_reference='ref' or num_iterations > 1; ot_debiased=True at least "
                "turns the blur into an exact 0."
            )

    # ---------------------------------------------------------------------------------------------------- generation

    def _guided(self) -> bool:
        return self.args.guidance and (self.model.training or self.args.eval_guidance)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if not self._guided():
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        if images is not None or multimodal_fields:
            raise ValueError(
                "Guided sampling supports text-only prompts; this batch has images or multimodal inputs. Set "
                "guidance=False (or eval_guidance=False for evaluation) to train a vision-language model."
            )
        with self._rollout_session():
            return self._generate_guided(prompt_ids, num_generations)

    def _generate_guided(self, prompt_ids: list[list[int]], num_generations: int):
        args, rng, eos = self.args, self._guidance_rng, self.eos_token_ids
        group_prompts = [list(ids) for ids in prompt_ids[::num_generations]]
        num_groups = len(group_prompts)
        cut = functools.partial(self._branch_cut, tokenizer=self._tokenizer, punctuation=args.punctuation)

        # Phase 1: one prefix per group, resampled when EOS came inside the drawn length.
        drawn = draw_lengths(rng, num_groups, args.prefix_min_tokens, args.prefix_max_tokens)
        prefixes: list[list[int]] = [[] for _ in range(num_groups)]
        prefix_logps: list[list[float] | None] = [None] * num_groups
        pending, retries = list(range(num_groups)), 0
        for attempt in range(args.prefix_eos_retries + 1):
            samples, logps = self._generate_phase(
                [group_prompts[i] for i in pending], 1, max((drawn[i] for i in pending), default=1)
            )
            retry = []
            for sample, sample_logps, group in zip(samples, _rows(logps, len(samples)), pending, strict=True):
                prefix, hit_eos = prefix_candidate(sample, drawn[group], eos, cut)
                if hit_eos and attempt < args.prefix_eos_retries:
                    retry.append(group)
                    continue
                prefixes[group] = prefix
                prefix_logps[group] = None if sample_logps is None else list(sample_logps[: len(prefix)])
            retries += len(retry)
            pending = retry
            if not self._any_process(bool(pending)):
                break

        # Phase 2: G guidance continuations of each group's prompt + prefix. Phase 3: every chain that has not ended
        # is completed within what is left of max_completion_length.
        guide_lengths = draw_lengths(rng, num_groups, args.min_guide_tokens, args.max_guide_tokens)
        rows = range(num_groups * num_generations)
        group_of = [row // num_generations for row in rows]
        branch_prompts = [group_prompts[g] + prefixes[g] for g in group_of]
        budgets = [self.max_completion_length - len(prefixes[g]) for g in group_of]
        postfixes: list[list[int]] = [[] for _ in rows]
        postfix_logps: list[list[float]] = [[] for _ in rows]
        if self._branches_in_one_call():
            # transformers: a chain goes on in the same generate call with its KV cache, so the guidance and postfix
            # of a branch are one sample split at the drawn guidance length (the same distribution as two calls).
            samples, guide_logps = self._generate_phase(
                branch_prompts, num_generations, max(budgets), args.min_guide_tokens, shared_prompts=True
            )
            guides, ended = _clip_all(samples, [guide_lengths[g] for g in group_of], eos)
            for row in rows:
                if not ended[row]:
                    postfixes[row] = list(samples[row][len(guides[row]) : budgets[row]])
        else:
            samples, guide_logps = self._generate_phase(
                branch_prompts, num_generations, max(guide_lengths), args.min_guide_tokens
            )
            guides, ended = _clip_all(samples, [guide_lengths[g] for g in group_of], eos)
            budgets = [budgets[r] - len(guides[r]) for r in rows]
            todo = [r for r in rows if not ended[r]]
            samples, post_logps = self._generate_phase(
                [branch_prompts[r] + guides[r] for r in todo], 1, max((budgets[r] for r in todo), default=1)
            )
            for row, sample, sample_logps in zip(todo, samples, _rows(post_logps, len(samples)), strict=True):
                postfixes[row] = list(sample[: budgets[row]])
                if sample_logps is not None:
                    postfix_logps[row] = list(sample_logps[: budgets[row]])

        completions = [prefixes[g] + guides[r] + postfixes[r] for r, g in enumerate(group_of)]
        logprobs = None
        if guide_logps is not None and all(lp is not None for lp in prefix_logps):
            # vLLM samples the first min_guide_tokens with the stop tokens masked (min_tokens) and reports log-probs of
            # that renormalised distribution, log p - log(1 - P(stop)), not the policy's; TRL's importance-sampling
            # ratio would shrink by (1 - P(stop)) per such token. None is "unknown" to TRL: ratio 1, left out of its
            # mismatch metrics (as on the transformers backend, which has no sampling log-probs at all).
            held = [min(args.min_guide_tokens, len(guide)) for guide in guides]
            logprobs = [
                prefix_logps[g] + [None] * held[r] + list(guide_logps[r][held[r] : len(guides[r])]) + postfix_logps[r]
                for r, g in enumerate(group_of)
            ]
        self._segments = Segments(
            prefix=[len(prefixes[g]) for g in group_of],
            guidance=[len(guide) for guide in guides],
            postfix=[len(postfix) for postfix in postfixes],
        )
        self._log_guidance(self._segments, [len(p) == 0 for p in prefixes], retries, completions)
        return completions, logprobs

    def _generate_phase(
        self,
        prompts: list[list[int]],
        num_generations: int,
        max_new_tokens: int,
        min_new_tokens: int = 0,
        shared_prompts: bool = False,
    ):
        """One batched call of the parent's backend with `max_new_tokens` (and EOS held back for `min_new_tokens`).

        `shared_prompts` (transformers backend): the prompts come in runs of `num_generations` identical ones, whose
        key/value cache is computed once per run and repeated, instead of once per row.

        Every process makes every call, because a call may be a collective: a ZeRO-3 parameter gather (a process with
        nothing to do sends a throw-away 1-token row), or a vLLM server request, which needs equal-sized lists and one
        token budget on all processes (short lists are padded, the budget is the largest; rows are cut to their own
        budget afterwards).
        """
        count = len(prompts)
        if self._phase_is_server_collective():
            sizes = self.accelerator.gather(torch.tensor([[count, max_new_tokens]], device=self.accelerator.device))
            target, max_new_tokens = int(sizes[:, 0].max()), int(sizes[:, 1].max())
            if target == 0:
                return [], None
            filler = prompts[:num_generations] if prompts else [[self._tokenizer.eos_token_id]] * num_generations
            prompts = prompts + filler * ((target - count) // num_generations)
        elif not prompts:
            prompts, num_generations, max_new_tokens = [[self._tokenizer.eos_token_id]], 1, 1
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._token_budget(max_new_tokens, min(min_new_tokens, max_new_tokens)))
            if shared_prompts and count and num_generations > 1 and self._branches_in_one_call():
                stack.enter_context(self._generate_from_shared_cache(prompts, num_generations))
            ids, logps = super()._generate_single_turn(prompts, None, {}, num_generations)
        return ids[:count], None if logps is None else logps[:count]

    def _branches_in_one_call(self) -> bool:
        """The transformers backend (no cache survives between generate calls; vLLM has prefix caching)."""
        return not self.use_vllm and not self.use_transformers_continuous_batching

    @contextlib.contextmanager
    def _generate_from_shared_cache(self, prompts: list[list[int]], num_generations: int):
        """Prefill each run of `num_generations` identical prompts once; the next generate call starts from it.

        The cache is laid out exactly as the parent pads the prompts (left padding, `pad_to_multiple_of`, positions
        from the attention mask), covers all but the last prompt column, and is repeated `num_generations` times.
        """
        unique = [torch.tensor(ids) for ids in prompts[::num_generations]]
        padding = dict(padding_side="left", pad_to_multiple_of=self.pad_to_multiple_of)
        input_ids = pad(unique, padding_value=self._tokenizer.pad_token_id, **padding).to(self.accelerator.device)
        mask = pad([torch.ones_like(ids) for ids in unique], padding_value=0, **padding).to(self.accelerator.device)
        if input_ids.size(1) < 2:
            yield
            return
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as model,
            torch.no_grad(),
        ):
            cache = DynamicCache(config=model.config)
            model(
                input_ids=input_ids[:, :-1],
                attention_mask=mask[:, :-1],
                position_ids=positions[:, :-1],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        cache.batch_repeat_interleave(num_generations)
        generate = model.generate

        def generate_from_cache(*args, **kwargs):
            kwargs.setdefault("past_key_values", cache)
            return generate(*args, **kwargs)

        model.generate = generate_from_cache  # an instance attribute: the parent's next generate call takes it
        try:
            yield
        finally:
            del model.generate

    def _phase_is_server_collective(self) -> bool:
        return bool(self.use_vllm and self.vllm_mode == "server" and self.accelerator.num_processes > 1)

    @contextlib.contextmanager
    def _token_budget(self, max_new_tokens: int, min_new_tokens: int = 0):
        """Temporarily set the token budget of whichever generation backend is active.

        The minimum goes through each backend's own parameter (vLLM `min_tokens`, transformers `min_new_tokens`), so
        EOS is held back inside the sampler rather than resampled afterwards.
        """
        vllm_generation = getattr(self, "vllm_generation", None) if self.use_vllm else None
        settings = []
        if vllm_generation is not None:
            settings.append((vllm_generation, "max_completion_length", max_new_tokens))
            settings.append((vllm_generation.generation_kwargs, "min_tokens", min_new_tokens or None))
        if getattr(self, "generation_config", None) is not None:
            settings.append((self.generation_config, "max_new_tokens", max_new_tokens))
            settings.append((self.generation_config, "min_new_tokens", min_new_tokens or None))
        if isinstance(getattr(self, "generation_kwargs", None), dict):
            settings.append((self.generation_kwargs, "max_new_tokens", max_new_tokens))
        with contextlib.ExitStack() as stack:
            for target, name, value in settings:
                stack.enter_context(_temporarily(target, name, value))
            yield

    @contextlib.contextmanager
    def _rollout_session(self):
        """Keep the generation backend ready across the three phases of one rollout.

        - ZeRO-3 on the transformers backend: TRL gathers the sharded parameters around each generate call; here they
          are gathered once for the rollout and the phase calls are told not to gather again.
        - vLLM colocate with sleep mode: TRL's engine sleeps (level 2, weights dropped) after every generate call and
          reloads the weights on the next one; here it wakes and syncs once, stays awake for the three phases, then
          sleeps.
        """
        vllm_generation = getattr(self, "vllm_generation", None) if self.use_vllm else None
        with contextlib.ExitStack() as stack:
            if vllm_generation is not None and self.vllm_mode == "colocate" and vllm_generation.enable_sleep_mode:
                if vllm_generation._llm_weights_sleeping:
                    vllm_generation.sync_weights()  # wakes the weights and pushes the current policy
                    self._last_loaded_step = self.state.global_step
                vllm_generation.llm.wake_up(tags=["kv_cache"])
                stack.callback(_put_to_sleep, vllm_generation)
                stack.enter_context(_temporarily(vllm_generation, "enable_sleep_mode", False))
            elif not self.use_vllm and self._dist.is_zero3 and self.args.ds3_gather_for_generation:
                stack.enter_context(
                    unwrap_model_for_generation(
                        self.model_wrapped,
                        self.accelerator,
                        gather_deepspeed3_params=True,
                        gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
                    )
                )
                stack.enter_context(_temporarily(self.args, "ds3_gather_for_generation", False))
            yield

    def _any_process(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        flags = self.accelerator.gather(torch.tensor([int(flag)], device=self.accelerator.device))
        return bool(flags.any().item())

    def _log_guidance(self, segments: Segments, empty_prefix: list[bool], retries: int, completions: list) -> None:
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        local = torch.tensor(
            [
                sum(segments.prefix) / len(segments),
                sum(segments.guidance) / len(segments),
                sum(segments.postfix) / len(segments),
                sum(empty_prefix) / len(empty_prefix),
                retries / len(empty_prefix),
            ],
            device=device,
        )
        means = self.accelerator.gather(local.unsqueeze(0)).mean(dim=0).tolist()
        names = ("prefix_length", "guide_length", "postfix_length", "empty_prefix_ratio", "prefix_retries")
        for name, value in zip(names, means, strict=True):
            self._metrics[mode][f"guidance/{name}"].append(value)
        if self.log_completions:
            decode = functools.partial(self._tokenizer.decode, skip_special_tokens=True)
            starts = [0] * len(segments)
            for column, lengths in (("prefix", segments.prefix), ("guidance", segments.guidance)):
                ends = [s + n for s, n in zip(starts, lengths, strict=True)]
                texts = [decode(c[s:e]) for c, s, e in zip(completions, starts, ends, strict=True)]
                self._log_completion_extra(column, texts)
                starts = ends
            self._log_completion_extra("postfix", [decode(c[s:]) for c, s in zip(completions, starts, strict=True)])

    # ---------------------------------------------------------------------------------------------------- loss focus

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self._segments = None
        output = super()._generate_and_score_completions(inputs)
        segments, self._segments = self._segments, None
        if output.get("ref_per_token_logps") is not None:
            # Text quality for free: TRL scored every completion token under the reference model for the KL term.
            self._log_nll("quality/ref_nll", output["ref_per_token_logps"], output["completion_mask"])
        if segments is not None:
            output = self._focus_loss(output, segments)
        if self.args.ot_coef > 0:
            output = self._attach_ot_reference(output)
        return output

    def _focus_loss(self, output: dict[str, Any], segments: Segments) -> dict[str, Any]:
        """Restrict TRL's scored batch to the trained tokens of `guidance_loss_scope`."""
        args = self.args
        completion_mask = output["completion_mask"]
        completion_tokens = completion_mask.sum(dim=1)  # per row, before any column is dropped
        width = completion_mask.size(1)
        weights = loss_weights(
            segments, width, args.guidance_loss_scope, args.postfix_decay, args.postfix_min_weight
        ).to(completion_mask.device)
        if args.guidance_loss_scope == "guidance":
            # Nothing after the last guidance token is trained: drop those columns before the loss forward.
            keep = max(max(segments.guidance_end), 1)
            if self.pad_to_multiple_of:
                keep = -(-keep // self.pad_to_multiple_of) * self.pad_to_multiple_of
            keep = min(keep, width)
            for key in _COMPLETION_COLUMNS:
                value = output.get(key)
                if isinstance(value, torch.Tensor) and value.dim() == 2 and value.size(1) == width:
                    output[key] = value[:, :keep]
            for key in _SEQUENCE_COLUMNS:
                if key in output:
                    output[key] = output[key][:, : output[key].size(1) - (width - keep)]
            weights = weights[:, :keep]
        trained = (weights > 0).to(completion_mask.dtype)
        if "tool_mask" in output:
            trained = trained * output["tool_mask"]
        output["tool_mask"] = trained
        if args.guidance_loss_scope == "guidance_postfix":
            output["advantages"] = output["advantages"].unsqueeze(1) * weights
        loss_mask = output["completion_mask"] * trained
        output["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        if args.guidance_loss_normalization == "completion":
            output = self._normalize_by_completion(output, loss_mask.sum(dim=1), completion_tokens)
        mode = "train" if self.model.training else "eval"
        trained_per_row = self.accelerator.gather(loss_mask.sum(dim=1).float())
        self._metrics[mode]["guidance/trained_tokens"].append(trained_per_row.mean().item())
        return output

    def _normalize_by_completion(
        self, output: dict[str, Any], trained_tokens: torch.Tensor, completion_tokens: torch.Tensor
    ) -> dict[str, Any]:
        """Divide the policy loss by every completion token, as plain GRPO would, instead of by the trained ones.

        TRL's token-count normalisers see the narrowed mask: `dapo`/`cispo`/`vespo` divide by `num_items_in_batch`
        (replaced here), `grpo`/`sapo` by each row's mask sum and `bnpo` by the batch's (the advantages are scaled by
        trained / completion tokens instead; TRL's per-token loss is linear in them). `dr_grpo` and `luspo` count no
        tokens, so both settings are the same there.
        """
        loss_type = self.loss_type
        if loss_type in ("dapo", "cispo", "vespo"):
            output["num_items_in_batch"] = self.accelerator.gather(completion_tokens.sum()).sum()
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

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal_inputs,
    ):
        if not self._shares_prefix(model, compute_aux_loss, multimodal_inputs):
            result = super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size,
                compute_entropy,
                compute_aux_loss,
                **multimodal_inputs,
            )
        else:
            logps, entropies = shared_prefix_logps(
                model, input_ids, attention_mask, logits_to_keep, compute_entropy, self.accelerator.autocast()
            )
            result = (logps, entropies, None)
        if torch.is_grad_enabled() and self.model.training:  # the loss forward (old/ref log-probs run without grad)
            self._log_nll("quality/policy_nll", result[0].detach(), attention_mask[:, -logits_to_keep:])
        return result

    def _log_nll(self, name: str, per_token_logps: torch.Tensor, mask: torch.Tensor) -> None:
        """Mean negative log-likelihood per completion token over all processes: a cheap text-quality signal.

        Only tokens in `mask` count: with `mask_truncated_completions` TRL zeroes truncated rows (and scores them with
        their completion masked out), so the mean covers the completed rows; NaN (left out of the log) if none.
        """
        mask = mask.to(per_token_logps.dtype)
        totals = self.accelerator.reduce(
            torch.stack([-(per_token_logps * mask).sum(), mask.sum()]).float(), reduction="sum"
        )
        mode = "train" if self.model.training else "eval"
        value = (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")
        self._metrics[mode][name].append(value)

    def _shares_prefix(self, model, compute_aux_loss: bool, multimodal_inputs: dict) -> bool:
        """Whether the shared-prefix forward applies (it needs a KV cache, text only, and no per-forward OT hook)."""
        args = self.args
        if not (args.guidance and args.shared_prefix_loss) or args.ot_coef > 0 or compute_aux_loss:
            return False
        if any(value is not None for value in multimodal_inputs.values()):
            return False
        unwrapped = self.accelerator.unwrap_model(model)
        checkpointing = getattr(unwrapped, "is_activation_checkpointing", None)  # transformers >= 5.x name
        if checkpointing is None:
            checkpointing = getattr(unwrapped, "is_gradient_checkpointing", False)
        return not checkpointing  # checkpointed layers drop the KV cache the shared prefix lives in

    # ---------------------------------------------------------------------------------------- optimal transport

    def _build_ot_reference(self):
        """The frozen model whose hidden states OT compares against, when TRL does not build one (beta == 0)."""
        args = self.args
        if args.ot_reference == "old" or self.ref_model is not None or is_peft_model(self.model):
            return None
        kwargs = dict(args.model_init_kwargs or {})
        if args.distributed_state.distributed_type in ("MULTI_GPU", "MULTI_CPU", "DEEPSPEED"):
            kwargs["device_map"] = None
        kwargs.setdefault("dtype", self.model.dtype)
        kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        reference = create_model_from_path(get_config_model_id(self.model.config), **kwargs)
        reference.requires_grad_(False)
        if args.disable_dropout:
            disable_dropout_in_model(reference)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(reference, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(reference, self.accelerator)
        return self.accelerator.prepare_model(reference, evaluation_mode=True)

    @staticmethod
    def _backbone(model):
        """The decoder stack whose output is the last hidden state (LoRA layers, if any, live inside it)."""
        while hasattr(model, "module") and not hasattr(model, "get_decoder"):  # DDP / DeepSpeed wrappers
            model = model.module
        if is_peft_model(model):
            model = model.get_base_model()
        return model.get_decoder()

    def _ot_reference_states(self, output: dict[str, Any]) -> torch.Tensor:
        """(B, C, H) reference hidden states of the completion tokens, without gradient."""
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        width = output["completion_ids"].size(1)
        frozen = self.ref_model if self.ref_model is not None else self._ot_ref_model
        if self.args.ot_reference == "old":
            model, context = self.model, contextlib.nullcontext()
        elif frozen is not None:
            model, context = frozen, contextlib.nullcontext()
        else:  # PEFT: the base model with the adapter disabled (or TRL's "ref" adapter when re-training one)
            unwrapped = self.accelerator.unwrap_model(self.model)
            model = self.model
            context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        batch_size = (
            self.args.per_device_train_batch_size if self.model.training else self.args.per_device_eval_batch_size
        )
        chunks = []
        with torch.no_grad(), context:
            backbone = self._backbone(model)
            for start in range(0, input_ids.size(0), batch_size):
                out = backbone(
                    input_ids=input_ids[start : start + batch_size],
                    attention_mask=attention_mask[start : start + batch_size],
                )
                chunks.append(out.last_hidden_state[:, -width:])
        states = torch.cat(chunks)
        return states.cpu() if self.args.ot_reference_on_cpu else states

    def _attach_ot_reference(self, output: dict[str, Any]) -> dict[str, Any]:
        # Old policy == current policy: the current states, detached, are the reference; no forward needed.
        if not (self.args.ot_reference == "old" and self.args.old_policy_is_current):
            output["ot_reference_states"] = self._ot_reference_states(output)
        return output

    @contextlib.contextmanager
    def _capture_hidden_states(self, model):
        """Collect the backbone's last hidden state of every forward inside the block (gradients flow)."""
        captured: list[torch.Tensor] = []

        def hook(module, args, output):
            captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

        handle = self._backbone(model).register_forward_hook(hook)
        try:
            yield captured
        finally:
            handle.remove()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.ot_coef <= 0:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        reference = inputs.get("ot_reference_states")  # kept: num_iterations > 1 reuses these inputs
        with self._capture_hidden_states(model) as captured:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        width = inputs["completion_ids"].size(1)
        current = torch.cat(captured)[:, -width:]
        reference = current.detach() if reference is None else reference.to(current.device)
        mask = inputs["completion_mask"] * inputs["tool_mask"] if "tool_mask" in inputs else inputs["completion_mask"]
        args = self.args
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
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss = loss + args.ot_coef * penalty / accumulation

        def rows_mean(values: torch.Tensor) -> float:
            totals = self.accelerator.reduce(
                torch.stack([(values.detach() * has_tokens).sum(), has_tokens.sum().float()]), reduction="sum"
            )
            return (totals[0] / totals[1].clamp(min=1)).item()

        self._metrics[mode]["ot/cost"].append(rows_mean(result.cost))
        self._metrics[mode]["ot/penalty"].append(self.accelerator.gather(penalty.detach()).mean().item())
        self._metrics[mode]["ot/marginal_error"].append(rows_mean(result.marginal_error))
        return loss


@contextlib.contextmanager
def _temporarily(target: Any, name: str, value: Any):
    """Set an attribute (or a dict key) for the duration of the block; restore it (or remove it) afterwards."""
    is_dict = isinstance(target, dict)
    missing = object()
    saved = target.get(name, missing) if is_dict else getattr(target, name, missing)
    if is_dict:
        if value is None:
            target.pop(name, None)
        else:
            target[name] = value
    else:
        setattr(target, name, value)
    try:
        yield
    finally:
        if is_dict:
            target.pop(name, None)
            if saved is not missing:
                target[name] = saved
        elif saved is missing:
            delattr(target, name)
        else:
            setattr(target, name, saved)


def _put_to_sleep(vllm_generation) -> None:
    vllm_generation.llm.sleep(level=2)
    vllm_generation._llm_weights_sleeping = True


def _clip_all(samples: list, lengths: list[int], eos: list[int]) -> tuple[list[list[int]], list[bool]]:
    clipped = [clip_guidance(sample, length, eos) for sample, length in zip(samples, lengths, strict=True)]
    return [ids for ids, _ in clipped], [ended for _, ended in clipped]


def _rows(logps: list | None, count: int) -> list:
    """Per-row log-probs, or a None per row when the backend returns none (the transformers path)."""
    return [None] * count if logps is None else logps
