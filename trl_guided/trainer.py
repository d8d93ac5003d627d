"""GuidedGRPOTrainer: TRL's GRPOTrainer with three-phase guided sampling and a guidance-focused loss.

The overrides of GRPOTrainer live here; the three phases are `trl_guided.sampler.GuidedSampler`, everything that
touches TRL's, vLLM's or DeepSpeed's generation internals is `trl_guided.backends.RolloutBackend`, the rewrite of a
scored batch to its trained tokens is `trl_guided.loss_focus.LossFocus`, the OT term's reference model and hidden
states are `trl_guided.ot_reference.OTReference`, and a stop signal's checkpoint is
`trl_guided.preemption.StopOnSignal`. None of them holds the trainer: each gets the values and callables it uses,
wired here (`__init__`, `_rollout_backend`, `_loss_focus_of`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import random
from dataclasses import dataclass
from typing import Any

import torch
from trl import GRPOTrainer

from .backends import RolloutBackend, TRLGeneration, unwrap
from .checkpoints import last_complete_checkpoint, load_sampler_state, save_sampler_state
from .config import GuidedGRPOConfig, vllm_training_refusal
from .guidance import (
    Segments,
    prefix_copies,
    prefix_source_rows,
    representable_marks,
    share_prefix,
)
from .locate import locate_start
from .loss_focus import LossFocus, trained_token_totals
from .nonfinite import NonFiniteGuard
from .ot_reference import OTReference, build_reference_model, capture_hidden_states
from .preemption import StopOnSignal
from .sampler import GuidedRollout, GuidedSampler
from .shared_prefix import shared_prefix_logps
from .step_savings import SAVINGS, StepSavings

logger = logging.getLogger(__name__)


@dataclass
class _LossView:
    """What TRL's `_compute_loss` decided about one micro-batch's tokens: the policy forward's log-probs, the
    high-entropy mask (`top_entropy_quantile` < 1), and where each row's shared prefix lies (see `_loss_view_of`)."""

    prefix_lengths: torch.Tensor | None = None
    sources: torch.Tensor | None = None
    logps: torch.Tensor | None = None
    entropy_mask: torch.Tensor | None = None


class GuidedGRPOTrainer(NonFiniteGuard, GRPOTrainer):
    """
    Trainer for Guided GRPO: `trl.GRPOTrainer` whose rollouts of a prompt group branch from one shared prefix, with a
    loss that focuses on the few guidance tokens where the branches diverge (see `GuidedGRPOConfig`).

    Example:

    ```python
    from datasets import Dataset
    from trl_guided import GuidedGRPOConfig, GuidedGRPOTrainer

    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "Describe the moon."}]] * 64})
    trainer = GuidedGRPOTrainer(
        model="embedded:smollm2-135m-instruct",
        reward_funcs=lambda completions, **kw: [-abs(100 - len(c[0]["content"])) / 100 for c in completions],
        args=GuidedGRPOConfig(output_dir="runs/demo", num_generations=4, max_completion_length=64),
        train_dataset=dataset,
    )
    trainer.train()
    ```

    The constructor takes `GRPOTrainer`'s parameters unchanged; `model` may also be an `embedded:<name>`, `args` must
    be a `GuidedGRPOConfig`, guidance refuses `tools`, `rollout_func` and `environment_factory` (they own the rollout).

    Overridden methods of `GRPOTrainer`, each calling the parent and post-processing. Maintenance notes: the TRL 1.16
    behaviour each relies on, checked by `tests/unit/test_trl_contract.py`:

    - `_generate_single_turn`: samples prefix -> guidance -> postfix, every phase through the parent's own backend
      dispatch, and returns the whole completion, so reward functions see the full text; unguided, TRL's own call with
      each prompt prefilled once per group on the transformers backend. Relies on: TRL calls it once
      per generation batch with each prompt repeated `num_generations` times in a row, and reads the generation budget
      from `generation_config` / `generation_kwargs` / `vllm_generation.max_completion_length` at call time.
    - `_generate_and_score_completions`: restricts TRL's scored batch to the trained tokens of `guidance_loss_scope`
      (binary mask in the `tool_mask` slot, fractional weights as (B, T) advantages, postfix columns dropped in the
      `guidance` scope; the `low_prob` scope's mask from the sampling-time log-probs), applies `tree_advantage` /
      `prefix_advantage_weight`, attaches OT reference states and, per row, the prefix length and completion tokens.
      Relies on: `_compute_loss` multiplying `tool_mask` into the loss, its normaliser, KL and entropy, and accepting
      2-D advantages; TRL summing `rewards_per_func * reward_weights` and keeping this process's contiguous slice.
    - `_get_per_token_logps_and_entropies`: the shared-prefix forward (each group's prompt + prefix encoded once).
      Relies on: the fused LM head (`fused_lm_head=True`, `shift_labels`) that TRL 1.15+ patches into scored models.
    - `compute_loss`: leaves out zero-advantage rows and right padding where exact (`trl_guided.step_savings`), adds
      the OT penalty on the backbone's last hidden states captured during the parent's forward
      (left out on a step where it is not finite), turns a non-finite loss into a zero-gradient step, and logs
      `guidance/trained_fraction` / `trained_prob`. Relies on: `_compute_loss` running exactly one policy forward per
      micro-batch.
    - `get_high_entropy_mask` (`top_entropy_quantile`): a shared prefix token counts once in the entropy quantile
      and every copy takes that decision. Relies on: `_compute_loss` calling it once per micro-batch with its mask.
    - `_calculate_rewards`: reads an infinite reward as None (no reward; `trl_guided.nonfinite`), keeps the matrix
      for the tree advantages. Relies on: its (N, F) gathered reward matrix with NaN for None.
    - `_prepare_inputs`: re-splits each new generation batch with prompt groups together where exact
      (`trl_guided.step_savings`). Relies on: `_buffered_inputs` holding the split, a new list per generation.
    - `train`, `_save_rng_state`, `_load_rng_state`: resume continues the same run (the last complete checkpoint; the
      sampler's generator and TRL's generation buffer travel in it). Relies on: Trainer writing `trainer_state.json`
      last and calling `_load_rng_state` before the first resumed step; GRPOTrainer's `_step` / `_buffered_inputs`.
    - `enable_jit_checkpoint`: transformers' SIGTERM handler stays, its `JITCheckpointCallback` is switched off and
      `trl_guided.preemption.StopOnSignal` decides instead: all processes agree at each step end whether any was
      signalled, then the step is logged, saved as a regular checkpoint (transformers' in-progress marker while it is
      written) and training stops; `stop_checkpoint` names it. transformers' own callback saves mid-step (RNG, sampler
      and generation buffer of the next rollout in a checkpoint of the previous step: the resumed run samples that
      step differently), before the step is logged, and on each process alone. Relies on: the `jit_manager` of
      `JITCheckpointCallback` and its `is_checkpoint_requested` flag; the Trainer saving after `on_step_end` when
      `control.should_save` is set.
    """

    _tag_names = ["trl", "grpo", "trl-guided", "guided-grpo"]
    _current_loss_view: _LossView | None = None  # set while `compute_loss` runs
    _name = "Guided GRPO"

    def __init__(self, model, reward_funcs=None, args: GuidedGRPOConfig | None = None, *more, **kwargs):
        # GRPOTrainer's parameters, positional or by keyword, bound by its own signature (an unknown one is a TypeError
        # there); none is restated here. The plugin reads `model`, `args` and the rollout owners.
        given = (
            inspect.signature(GRPOTrainer.__init__).bind(self, model, reward_funcs, args, *more, **kwargs).arguments
        )
        del given["self"]
        if isinstance(model, str):
            model = locate_start(model).path  # the resolver of `trl-guided train`: run folders, embedded:, paths
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = GuidedGRPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-GuidedGRPO")
        if not isinstance(args, GuidedGRPOConfig):
            raise TypeError(
                f"GuidedGRPOTrainer needs a GuidedGRPOConfig, got {type(args).__name__}. Build the config with "
                "trl_guided.GuidedGRPOConfig (it accepts every GRPOConfig field)."
            )
        if refusal := vllm_training_refusal(args):  # TRL's __init__ would start the engine, then fail at its sync
            raise ValueError(refusal)
        owners = [name for name in ("tools", "rollout_func", "environment_factory") if given.get(name)]
        if args.guidance and owners:
            raise ValueError(
                f"Guided sampling cannot be combined with {', '.join(owners)}: those own the rollout (multi-turn or "
                "custom generation), guidance needs single-turn three-phase sampling. Set guidance=False in the "
                "config to train them with plain GRPO."
            )
        super().__init__(**{**given, "model": model, "args": args})
        self._guidance_rng = random.Random(args.seed + self.accelerator.process_index)
        self._backend = self._rollout_backend()
        self._loss_focus = self._loss_focus_of(args)
        self._savings = StepSavings(
            **{name: getattr(args, name) for name in SAVINGS},
            loss_type=self.loss_type,
            beta=self.beta,
            entropy_bonus=self._entropy_bonus_enabled,
            top_entropy_quantile=self.top_entropy_quantile,
            ot=args.ot_coef > 0,
            aux_loss=self.aux_loss_enabled,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            steps_per_generation=args.steps_per_generation,
            pad_to_multiple_of=self.pad_to_multiple_of,
            gather=self.accelerator.gather,
        )
        self._sampler = GuidedSampler(args, self._tokenizer, self.eos_token_ids, self._guidance_rng, self._backend)
        self._segments: Segments | None = None  # the last rollout's segments, from generation to scoring
        self._rewards_per_func: torch.Tensor | None = None  # the last scoring's rewards (all processes), for trees
        self._ot = None
        if args.ot_coef > 0:  # a frozen reference of its own only when TRL built none (TRL's is for KL: beta > 0)
            own = None if self.ref_model is not None else build_reference_model(args, self.model, self.accelerator)
            self._ot = OTReference(args, self.model, self.accelerator, self._log_metric, self.ref_model, own)
        self._stop_on_signal = None
        if args.enable_jit_checkpoint:
            self._stop_on_signal = StopOnSignal(self.callback_handler.callbacks, self.accelerator)
            self.add_callback(self._stop_on_signal)
        cuts_at_marks = args.branch_point == "punctuation" or args.branch_snap_to_punctuation
        if args.guidance and cuts_at_marks and not representable_marks(self._tokenizer, args.punctuation):
            logger.warning(
                "The tokenizer cannot write any of the punctuation marks %s, so every punctuation cut keeps nothing "
                "and each group trains as plain GRPO with the loss on its first tokens. Set `punctuation` to marks "
                "this tokenizer has, or branch_point='entropy' (guidance/empty_prefix_ratio shows the effect).",
                list(args.punctuation),
            )
        if args.ot_coef > 0 and args.ot_reference == "old" and args.old_policy_is_current:
            logger.warning(
                "ot_reference='old' with these settings compares the policy with itself: TRL only keeps an old policy "
                "when gradient_accumulation_steps is not a multiple of steps_per_generation * num_iterations (or with "
                "vLLM importance sampling). The plain OT cost is then only entropic blur and the debiased one is 0. "
                "For a real constraint use ot_reference='ref' or num_iterations > 1; ot_debiased=True at least "
                "turns the blur into an exact 0."
            )

    def _rollout_backend(self) -> RolloutBackend:
        """The sampler's generation backend over TRL's (`trl_guided.backends`), wired with what it uses."""
        return RolloutBackend(
            plain_generate=self._plain_generate,
            trl=TRLGeneration(
                vllm_generation=self.vllm_generation if self.use_vllm else None,
                vllm_mode=self.vllm_mode if self.use_vllm else None,
                generation_config=getattr(self, "generation_config", None),
                generation_kwargs=getattr(self, "generation_kwargs", None),
                continuous_batching=self.use_transformers_continuous_batching,
            ),
            model=lambda: self.model_wrapped,  # DeepSpeed / DDP wrap the model when training starts
            accelerator=self.accelerator,
            args=self.args,
            tokenizer=self._tokenizer,
            pad_to_multiple_of=self.pad_to_multiple_of,
            on_weights_synced=self._weights_synced,
        )

    def _weights_synced(self) -> None:
        """The rollout pushed this step's weights to vLLM: TRL's own per-call sync then has nothing to do."""
        self._last_loaded_step = self.state.global_step

    def _loss_focus_of(self, args: GuidedGRPOConfig) -> LossFocus:
        """The loss-focus rewrite of scored batches (`trl_guided.loss_focus`), wired with what it uses."""
        return LossFocus(
            scope=args.guidance_loss_scope,
            postfix_decay=args.postfix_decay,
            postfix_min_weight=args.postfix_min_weight,
            loss_prob_threshold=args.loss_prob_threshold,
            normalization=args.guidance_loss_normalization,
            tree_advantage=args.tree_advantage,
            prefix_advantage_weight=args.prefix_advantage_weight,
            num_prefixes_per_group=args.num_prefixes_per_group,
            loss_type=self.loss_type,
            scale_rewards=self.scale_rewards,
            reward_weights=self.reward_weights,
            pad_to_multiple_of=self.pad_to_multiple_of,
            group_size=lambda: self.num_generations if self.model.training else self.num_generations_eval,
            score=self._score_completions,
            gather=self.accelerator.gather,
            process_index=self.accelerator.process_index,
            log_metric=self._log_metric,
        )

    def _score_completions(self, input_ids, attention_mask, logits_to_keep: int) -> torch.Tensor:
        """(B, logits_to_keep) log-probs of the current policy, the forward TRL scores old log-probs with."""
        args = self.args
        batch_size = args.per_device_train_batch_size if self.model.training else args.per_device_eval_batch_size
        logps, _, _ = self._get_per_token_logps_and_entropies(
            self.model, input_ids, attention_mask, logits_to_keep, batch_size
        )
        return logps

    def _log_metric(self, name: str, value: float) -> None:
        """Log `value` under `name` for this step, in the current mode's metrics (train or eval)."""
        self._metrics["train" if self.model.training else "eval"][name].append(value)

    # --------------------------------------------------------------------------------------------------- checkpoints

    @property
    def stop_checkpoint(self) -> str | None:
        """The checkpoint written when a stop signal ended training early (`enable_jit_checkpoint`), else None."""
        return self._stop_on_signal.checkpoint if self._stop_on_signal is not None else None

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        # Override: `resume_from_checkpoint=True` takes Trainer's highest-numbered checkpoint even when a killed save
        # left it incomplete; resolve it to the last complete one here and let Trainer resume from that path.
        if resume_from_checkpoint is True:
            checkpoint, skipped = last_complete_checkpoint(self.args.output_dir)
            for path in skipped:
                logger.warning("Skipping %s: its save did not finish (no trainer_state.json, or a marker left)", path)
            if checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True, but {self.args.output_dir} has no complete checkpoint-N folder. "
                    "Start without resume_from_checkpoint, or pass the path of a checkpoint."
                )
            resume_from_checkpoint = checkpoint
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def _save_rng_state(self, output_dir: str) -> None:
        # Override: Trainer saves python/numpy/torch RNG states per process; what else decides the next steps of a
        # guided run must travel in the checkpoint too, so that resuming continues the same run (TRL 1.16 keeps
        # neither): the sampler's own generator (segment lengths), and TRL's generation buffer when the checkpoint
        # falls inside it (`steps_per_generation` or `num_iterations` > 1: the next steps train on rows generated
        # before the checkpoint, which TRL would otherwise regenerate).
        super()._save_rng_state(output_dir)
        inside_buffer = self._step % (self.args.steps_per_generation * self.num_iterations)
        buffer = {"step": self._step, "inputs": self._buffered_inputs} if inside_buffer else None
        save_sampler_state(output_dir, self.args.process_index, self._guidance_rng, buffer)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        buffer = load_sampler_state(checkpoint, self.args.process_index, self._guidance_rng, self.accelerator.device)
        if buffer is not None:
            self._step, self._buffered_inputs = buffer["step"], buffer["inputs"]

    # ---------------------------------------------------------------------------------------------------- generation

    def _samples_guided(self) -> bool:
        """Whether this rollout is guided: training, or evaluation with `eval_guidance`."""
        return self.args.guidance and (self.model.training or self.args.eval_guidance)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        # Override: TRL 1.16's `_generate_and_score_completions` -> `_generate` calls this once per generation batch
        # with every prompt repeated `num_generations` times in a row (also from `_tool_call_loop`, which guidance
        # refuses in __init__), and expects (completion ids, sampling log-probs or None) row-aligned with the prompts.
        self._check_prompt_lengths(prompt_ids)
        if not self._samples_guided():
            text_only = images is None and not multimodal_fields
            with self._backend.shared_prompt_prefill(prompt_ids if text_only else [], num_generations):
                return super()._generate_single_turn(
                    prompt_ids, images, multimodal_fields, num_generations, has_tool_images
                )
        if images is not None or multimodal_fields:
            raise ValueError(
                "Guided sampling supports text-only prompts; this batch has images or multimodal inputs. Set "
                "guidance=False (or eval_guidance=False for evaluation) to train a vision-language model."
            )
        with self._backend.session():
            return self._generate_guided(prompt_ids, num_generations)

    def _check_prompt_lengths(self, prompt_ids: list[list[int]]) -> None:
        """Count (`guidance/long_prompts`, on steps where it happens) and warn once about prompts that leave less than
        `max_completion_length` tokens of the context: generation goes on, but past the model's trained positions
        (vLLM refuses such requests)."""
        context = self.args.vllm_max_model_length if self.use_vllm else None
        context = context or getattr(unwrap(self.model).config, "max_position_embeddings", None)
        if not context:
            return
        long = [len(ids) + self.max_completion_length > context for ids in prompt_ids]
        if any(long):
            self._log_metric("guidance/long_prompts", sum(long) / len(long))
            longest = max(len(ids) for ids in prompt_ids)
            self._warn_once(
                "long_prompts",
                f"{sum(long)} of {len(long)} prompts (the longest {longest} tokens) leave less than "
                f"max_completion_length={self.max_completion_length} tokens of the model's {context}-token context. "
                "Shorten the prompts or lower max_completion_length; guidance/long_prompts counts them.",
            )

    def _warn_once(self, kind: str, message: str) -> None:
        """A warning the first time `kind` happens in this trainer (faults can repeat every step)."""
        warned = self.__dict__.setdefault("_warned_once", set())
        if kind not in warned:
            warned.add(kind)
            logger.warning(message[0].upper() + message[1:])

    def _generate_guided(self, prompt_ids: list[list[int]], num_generations: int):
        """The three phases for every group of the batch; the segments wait in `self._segments` for scoring."""
        rollout = self._sampler.sample(prompt_ids, num_generations)
        # Hand-off to `_generate_and_score_completions` (below), which TRL calls around this and which has no other way
        # to learn where each completion's segments are: TRL passes only ids and log-probs between the two.
        self._segments = rollout.segments
        self._log_guidance(rollout)
        return rollout.completions, rollout.logprobs

    def _plain_generate(self, prompt_ids: list[list[int]], num_generations: int):
        """TRL's own single-turn generation, which every guided phase goes through (see `trl_guided.backends`)."""
        return super()._generate_single_turn(prompt_ids, None, {}, num_generations)

    def _log_guidance(self, rollout: GuidedRollout) -> None:
        segments, empty_prefix, completions = rollout.segments, rollout.empty_prefix, rollout.completions
        device = self.accelerator.device
        local = torch.tensor(
            [
                sum(segments.prefix) / len(segments),
                sum(segments.guidance) / len(segments),
                sum(segments.postfix) / len(segments),
                sum(empty_prefix) / len(empty_prefix),
                rollout.prefix_retries / len(empty_prefix),
                sum(rollout.branch_position) / len(empty_prefix),
            ],
            device=device,
        )
        means = self.accelerator.gather(local.unsqueeze(0)).mean(dim=0).tolist()
        names = (
            "prefix_length",
            "guide_length",
            "postfix_length",
            "empty_prefix_ratio",
            "prefix_retries",
            "branch_position",
        )
        for name, value in zip(names, means, strict=True):
            self._log_metric(f"guidance/{name}", value)
        if means[names.index("empty_prefix_ratio")] == 1.0:
            self._warn_once(
                "empty_prefixes",
                f"no group of step {self.state.global_step} has a shared prefix (every phase-1 sample ended at once "
                "or had no branch point in its first prefix_max_tokens tokens), so these groups train as plain GRPO "
                "with the loss on their first tokens; watch guidance/empty_prefix_ratio. A longer prefix_max_tokens, "
                "other `punctuation` marks or branch_point='entropy' give prefixes.",
            )
        self._log_metric("guidance/num_prefixes", float(self.args.num_prefixes_per_group))
        if self._sampler.rule.needs_signals:  # entropies are known only when the cut scored the samples
            sums = [sum(rollout.branch_entropy), sum(rollout.mean_entropy), len(rollout.branch_entropy)]
            totals = self.accelerator.reduce(torch.tensor(sums, device=device), reduction="sum").tolist()
            if totals[2]:
                self._log_metric("guidance/branch_entropy", totals[0] / totals[2])
                self._log_metric("guidance/mean_entropy", totals[1] / totals[2])
        if self.log_completions:
            decode = functools.partial(self._tokenizer.decode, skip_special_tokens=True)
            starts = [0] * len(segments)
            for column, lengths in (("prefix", segments.prefix), ("guidance", segments.guidance)):
                ends = [s + n for s, n in zip(starts, lengths, strict=True)]
                texts = [decode(c[s:e]) for c, s, e in zip(completions, starts, ends, strict=True)]
                self._log_completion_extra(column, texts)
                starts = ends
            self._log_completion_extra("postfix", [decode(c[s:]) for c, s in zip(completions, starts, strict=True)])
            self._log_completion_extra("branch_set", rollout.branch_set)

    # ---------------------------------------------------------------------------------------------------- loss focus

    def _prepare_inputs(self, generation_batch):
        # Override: when TRL has split a new generation batch into shuffled micro-batches, keep each prompt group's
        # rows together where that leaves the gradient unchanged (`StepSavings.layout`).
        buffered = self._buffered_inputs
        inputs = super()._prepare_inputs(generation_batch)
        if not self.model.training or self._buffered_inputs is buffered:
            return inputs
        self._buffered_inputs = self._savings.layout(self._buffered_inputs)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self._segments = None
        output = super()._generate_and_score_completions(inputs)
        # Set by `_generate_guided` while the parent generated (None: this batch was sampled plain).
        segments, self._segments = self._segments, None
        rewards_per_func, self._rewards_per_func = self._rewards_per_func, None
        if output.get("ref_per_token_logps") is not None:
            # Text quality for free: TRL scored every completion token under the reference model for the KL term.
            self._log_nll("quality/ref_nll", output["ref_per_token_logps"], output["completion_mask"])
        if segments is not None:
            prefix_advantage = self._loss_focus.tree_advantages(output, rewards_per_func)
            output = self._focus_loss(output, segments, prefix_advantage)
        if self._ot is not None:
            output = self._ot.attach(output)
        return output

    def _focus_loss(
        self, output: dict[str, Any], segments: Segments, prefix_advantage: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """Restrict TRL's scored batch to the trained tokens of `guidance_loss_scope` (`trl_guided.loss_focus`)."""
        return self._loss_focus.apply(output, segments, prefix_advantage)

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
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                compute_entropy,
                self.accelerator.autocast(),
                nested=self.args.num_prefixes_per_group > 1,
            )
            result = (logps, entropies, None)
        view = self._current_loss_view
        if view is not None and view.logps is None:  # the policy forward of `_compute_loss`
            view.logps = result[0].detach()
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
        self._log_metric(name, (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan"))

    def _shares_prefix(self, model, compute_aux_loss: bool, multimodal_inputs: dict) -> bool:
        """Whether the shared-prefix forward applies (it needs a KV cache, text only, no per-forward OT hook, and the
        same forward calls on every process under ZeRO-3)."""
        args = self.args
        if not args.shared_prefix_loss or args.ot_coef > 0 or compute_aux_loss:
            return False
        if self._backend.zero3 and self.accelerator.num_processes > 1:  # a forward per group: ZeRO-3's parameter
            return False  # gathers are collectives, and processes can hold different numbers of groups
        if any(value is not None for value in multimodal_inputs.values()):
            return False
        unwrapped = unwrap(model)
        checkpointing = getattr(unwrapped, "is_activation_checkpointing", None)  # transformers >= 5.x name
        if checkpointing is None:
            checkpointing = getattr(unwrapped, "is_gradient_checkpointing", False)
        return not checkpointing  # checkpointed layers drop the KV cache the shared prefix lives in

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Override: the OT penalty on the backbone's last hidden states of the parent's own forward (`trl_guided.
        # ot_reference`), a zero-gradient step for a non-finite loss, the trained-token metrics; training leaves out
        # the rows and columns that cannot change the gradient (`trl_guided.step_savings`).
        inputs, scale = self._loss_focus.micro_batch(inputs), 1.0
        if self.model.training:
            inputs, scale, skipped = self._savings.micro_batch(inputs)
            self._log_metric("savings/skipped_rows", skipped)
        with self._loss_view_of(inputs) as view:
            if self.args.ot_coef <= 0:
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            else:
                loss = self._loss_with_ot(model, inputs, return_outputs, num_items_in_batch)
        self._log_trained_tokens(inputs, view)
        return self._finite_or_zero(model, loss * scale if scale != 1.0 else loss)

    @contextlib.contextmanager
    def _loss_view_of(self, inputs: dict[str, Any]):
        """Collect, while TRL's `_compute_loss` runs on `inputs`, what it decides about their tokens (`_LossView`)."""
        view = _LossView()
        prefix_lengths = inputs.get("guidance_prefix_tokens")
        if prefix_lengths is not None and self.top_entropy_quantile < 1.0:
            view.prefix_lengths = prefix_lengths
            view.sources = prefix_source_rows(
                inputs["prompt_ids"],
                inputs["prompt_mask"],
                inputs["completion_ids"],
                inputs["completion_mask"],
                prefix_lengths,
            )
        self._current_loss_view = view
        try:
            yield view
        finally:
            self._current_loss_view = None

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        # Override (`top_entropy_quantile` < 1): TRL takes the entropy quantile over every masked token of the
        # micro-batch, and a shared-prefix token sits in every row of its group the micro-batch holds, so it would
        # count that many times. Its repeats are left out of the quantile and take the decision of the row that
        # counted it: one node of the rollout tree, one vote, one decision (trained in every row that holds it).
        view = self._current_loss_view
        if view is None or view.sources is None:
            high = super().get_high_entropy_mask(entropies, mask, threshold)
        else:
            copies = prefix_copies(view.sources, view.prefix_lengths, mask.size(1))
            high = super().get_high_entropy_mask(entropies, mask * ~copies, threshold)
            high = share_prefix(high, view.sources, view.prefix_lengths) & mask.bool()
        if view is not None:
            view.entropy_mask = high
        return high

    def _loss_with_ot(self, model, inputs, return_outputs, num_items_in_batch):
        with capture_hidden_states(model) as captured:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        penalty = self._ot.penalty(inputs, torch.cat(captured))
        accumulation = self.current_gradient_accumulation_steps if self.model.training else 1.0
        if torch.isfinite(penalty):
            return loss + self.args.ot_coef * penalty / accumulation
        # Left out of the graph entirely: a NaN anywhere in it would reach every gradient.
        self._count_nonfinite("ot", "the OT cost is not finite (NaN/inf); this step trains without the OT term")
        return loss

    def _log_trained_tokens(self, inputs: dict[str, Any], view: _LossView) -> None:
        """`guidance/trained_fraction`: the share of completion tokens that carry the policy loss (scope, probability
        and entropy masks together); `guidance/trained_prob`: their mean probability under the sampling-time policy
        (TRL's old log-probs, or the loss forward's own when the old policy is the current one). Guided batches only.
        """
        if inputs.get("guidance_completion_tokens") is None or view.logps is None:
            return
        local = trained_token_totals(inputs, view.entropy_mask, view.logps)
        trained, tokens, probability = self.accelerator.reduce(local, reduction="sum").tolist()
        self._log_metric("guidance/trained_fraction", trained / tokens if tokens else float("nan"))
        self._log_metric("guidance/trained_prob", probability / trained if trained else float("nan"))

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # Override: infinite rewards read as None (`NonFiniteGuard`); the matrix is kept for the tree advantages
        # (they re-normalise the summed reward per branch set).
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rewards_per_func = rewards_per_func
        return rewards_per_func
