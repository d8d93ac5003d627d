"""GuidedGRPOConfig: TRL's GRPOConfig plus the guided-sampling and loss-focus settings."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available
from trl import GRPOConfig

from .guidance import BRANCH_POINTS, DEFAULT_PUNCTUATION, LOSS_SCOPES, TREE_ADVANTAGES

# generation_kwargs of transformers' beam search: they change the number of rows a generate call returns.
BEAM_SEARCH_KWARGS = {"num_beams", "num_beam_groups", "num_return_sequences", "length_penalty", "early_stopping"}

# What the policy loss is divided by when guidance narrows the trained tokens (see docs/training.md).
LOSS_NORMALIZATIONS = ("trained", "completion")

# The fields the three-phase sampler reads (besides max_completion_length): what a recipe hands to `trl-guided eval
# --sampling guided`, so that evaluation samples as training did. tests/unit/test_evaluate.py checks this against the
# attributes trl_guided/sampler.py reads. (Not field metadata: HfArgumentParser passes metadata to argparse.)
SAMPLER_FIELDS = (
    "prefix_min_tokens",
    "prefix_max_tokens",
    "punctuation",
    "branch_point",
    "branch_min_prefix_tokens",
    "branch_snap_to_punctuation",
    "branch_snap_window",
    "num_prefixes_per_group",
    "min_guide_tokens",
    "max_guide_tokens",
    "prefix_eos_retries",
)


def gpu_weight_semantics() -> bool:
    """Whether TRL's vLLM weight sync can run here: a GPU (CUDA, ROCm, XPU) in this process. vLLM's GPU backends
    compute from the parameters that the colocated sync writes into, and server mode pushes them over NCCL; vLLM's CPU
    backend computes each linear layer from a packed copy made at load time, and NCCL needs CUDA.
    tests/distributed/vllm_scripts/ replace this function: they emulate GPU semantics on CPU (see there)."""
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def vllm_training_refusal(args: GRPOConfig) -> str | None:
    """One line saying why `use_vllm` cannot train here and what to do instead, or None when it can.

    Checked before anything is loaded (`trl-guided train` at parse time, `GuidedGRPOTrainer` before TRL builds the
    engine): otherwise the colocated engine starts (about 2 minutes on CPU) and the first weight sync fails. A
    machine-level check, so it is not part of the config's own validation: a GPU recipe still parses on a laptop.
    """
    if not args.use_vllm:
        return None
    fix = "train with the transformers backend (use_vllm: false), see docs/distributed.md"
    if not gpu_weight_semantics():
        if args.vllm_mode == "server":
            return (
                "use_vllm=True with vllm_mode='server' needs a GPU in the training process: TRL pushes the policy's "
                f"weights to the vLLM server over NCCL, which needs CUDA. On this machine {fix}."
            )
        sleep = " (vllm_enable_sleep_mode is GPU-only too)" if args.vllm_enable_sleep_mode else ""
        return (
            f"use_vllm=True with vllm_mode='colocate' cannot train on a machine without a GPU{sleep}: vLLM's CPU "
            "backend computes from packed copies of the weights, which TRL's weight sync does not update. Instead "
            f"{fix}; vLLM on CPU pays for batched evaluation (trl-guided eval --backend vllm)."
        )
    if importlib.util.find_spec("vllm") is None:
        return (
            'use_vllm=True, but vllm is not installed in this Python environment: run `pip install -e ".[vllm]"` '
            f"(TRL 1.16 supports vLLM 0.22-0.31), or {fix}."
        )
    return None


@dataclass
class GuidedGRPOConfig(GRPOConfig):
    r"""
    Configuration for [`GuidedGRPOTrainer`]. Every [`~trl.GRPOConfig`] field works as in TRL; the fields below are new.
    Rollouts of a prompt group are sampled in three phases: one shared **prefix**, `num_generations` short
    **guidance** continuations of it, then each chain's **postfix**, up to `max_completion_length` tokens in all.

    Precision: when neither `bf16` nor `fp16` is set and training runs on CPU (`use_cpu`, or no accelerator that
    computes in bf16), `bf16` is turned off and training runs in float32; TRL's default (`bf16` unless `fp16`) would
    stop there with "Your setup doesn't support bf16/gpu". On a GPU the default stays TRL's. An explicit `bf16=True`
    without a bf16 accelerator is still refused (set `bf16=False`, or train where a GPU is visible).

    Parameters that control the prefix:
        guidance (`bool`, defaults to `True`):
            Sample prefix/guidance/postfix rollouts. `False`: behave exactly like `trl.GRPOTrainer`.
        prefix_min_tokens (`int` or `None`, defaults to `None`):
            Shortest prefix drawn (per group) before the cut. `None`: `prefix_max_tokens // 4`, at least 1.
        prefix_max_tokens (`int` or `None`, defaults to `None`):
            Longest prefix drawn before the cut. `None`: `(max_completion_length - max_guide_tokens) // 2`.
        punctuation (`list[str]`, defaults to `["\n", ".", ",", "!", "?"]`):
            Marks a prefix may end on; a token that merges a mark with other characters counts.
        branch_point (`str`, defaults to `"punctuation"`):
            Where the drawn prefix is cut (`trl_guided.guidance.BRANCH_POINTS`, docs/sampling.md): `"punctuation"`
            after its last punctuation mark; `"entropy"` before its highest-entropy token; `"low_prob"` before its
            lowest-probability token; `"random"` before a uniformly drawn token. `"entropy"` and `"low_prob"` read the
            policy's signals at each phase-1 token off generation's logits (vLLM: one no-grad forward of the policy).
        branch_min_prefix_tokens (`int`, defaults to `1`):
            Positions before it are never chosen as the branch point (a cut keeping fewer tokens keeps none).
        branch_snap_to_punctuation (`bool`, defaults to `False`):
            `"entropy"`, `"low_prob"`, `"random"`: move the cut back to the last punctuation boundary before it when
            one lies within `branch_snap_window` tokens.
        branch_snap_window (`int`, defaults to `8`):
            How far back (tokens) `branch_snap_to_punctuation` may move the cut.
        prefix_eos_retries (`int`, defaults to `2`):
            How often a prefix sample that hit EOS is redrawn before it is cut before EOS.

    Parameters that control the tree:
        num_prefixes_per_group (`int`, defaults to `1`):
            K shared prefixes per prompt group, each from its own phase-1 sample, with `num_generations / K` branches
            each (`num_generations % K == 0`). 1: one prefix shared by the whole group.
        tree_advantage (`str`, defaults to `"group"`):
            The advantage of a branch with K > 1: `"group"` (TRL's, normalised across all `num_generations`),
            `"branch"` (normalised within its branch set of `num_generations / K`), `"group+branch"` (their sum,
            TreeRL's global + local), `"treerl"` (`"group+branch"` for the branch tokens, and each shared prefix token
            TreeRL's `(global + local) / sqrt(leaves)`: twice its set's mean reward against the group's, over
            `sqrt(num_generations / K)`; needs `guidance_loss_scope` `"completion"` or `"low_prob"`).
        prefix_advantage_weight (`float`, defaults to `0.0`):
            K > 1: train each prefix's tokens with this weight times its branch set's mean reward against the
            group's (normalised as TRL's group advantage). 0: prefix tokens are not trained.

    Parameters that control the guidance:
        min_guide_tokens (`int`, defaults to `2`):
            Shortest guidance segment (drawn per group); EOS is held back until it is reached.
        max_guide_tokens (`int`, defaults to `8`):
            Longest guidance segment (drawn per group).
        eval_guidance (`bool`, defaults to `True`):
            Sample TRL's evaluation rollouts guided (`True`) or plain (`False`).

    Parameters that control the loss:
        guidance_loss_scope (`str`, defaults to `"guidance_postfix"`):
            Which completion tokens the loss trains. `"guidance_postfix"` (the default, chosen by the rule in
            docs/training.md from the guided-vs-plain studies): guidance weight 1, the `k`-th postfix token (k = 0,
            1, ...) `max(postfix_decay ** (k + 1), postfix_min_weight)`, prefix 0. `"guidance"` (Guide-GRPO's
            setting): the guidance tokens only (weight 1; the loss forward stops after the last guidance token).
            `"completion"`: every completion token, as plain GRPO. `"low_prob"`: SPO's probability mask, every
            completion token (shared prefix included) whose probability under the sampling-time policy was below
            `loss_prob_threshold`.
            TRL's `top_entropy_quantile` applies on top of any scope (docs/training.md).
        guidance_loss_normalization (`str`, defaults to `"trained"`):
            What the loss is divided by: the trained tokens (`"trained"`), or every completion token as plain GRPO
            would (`"completion"`). Fractional weights (`"guidance_postfix"`) are first rescaled to average 1 over
            the tokens the loss type's normaliser counts, so `beta` and the entropy bonus weigh the same as in plain
            GRPO.
        postfix_decay (`float`, defaults to `0.9`):
            Decay of the postfix weights in the `"guidance_postfix"` scope.
        postfix_min_weight (`float`, defaults to `0.0`):
            Floor of the postfix weights in the `"guidance_postfix"` scope.
        loss_prob_threshold (`float`, defaults to `0.9`):
            The `"low_prob"` scope trains the tokens whose sampling probability was strictly below it (0 < it <= 1).
        shared_prefix_loss (`bool`, defaults to `True`):
            Encode each group's shared prompt + prefix once in the loss forward (same log-probs and gradients; with
            `guidance=False` the prompt).
        skip_zero_advantage_rows (`bool`, defaults to `True`):
            Leave the rows whose advantage is 0 at every trained token out of the loss forward and backward, the
            loss type's normaliser kept as if they were there (same gradient). Off by itself where it would not be
            exact: `beta` > 0, an entropy bonus, `top_entropy_quantile` < 1, OT, a MoE auxiliary loss.
        trim_loss_padding (`bool`, defaults to `True`):
            Drop each micro-batch's completion columns after its longest completion before the loss forward (same
            gradient; off with OT).
        group_micro_batches (`bool`, defaults to `True`):
            Keep each prompt group's rows in one micro-batch instead of TRL's shuffled split (same gradient where
            the loss type's normaliser does not depend on the split; off for `bnpo`, an entropy bonus,
            `top_entropy_quantile` < 1, OT, a MoE auxiliary loss, and when `gradient_accumulation_steps` is not a
            multiple of `steps_per_generation`).

    Parameters that control the optimal-transport (OT) regularizer:
        ot_coef (`float`, defaults to `0.0`):
            Weight of the OT penalty on the backbone's last hidden states; 0 turns OT off.
        ot_window (`int`, defaults to `16`):
            Band half-width: token `i` may be matched to `j` with `|i - j| <= ot_window`.
        ot_epsilon (`float`, defaults to `0.1`):
            Entropic regularization of the Sinkhorn solve.
        ot_iterations (`int`, defaults to `50`):
            Sinkhorn iterations (the cap when `ot_tolerance` is set).
        ot_tolerance (`float` or `None`, defaults to `None`):
            Stop early once the row-marginal L1 error is below it.
        ot_target (`float`, defaults to `0.0`):
            Hinge: only the OT cost above it is penalised.
        ot_reference (`str`, defaults to `"ref"`):
            `"ref"`: the reference model's hidden states; `"old"`: the sampling-time policy's.
        ot_debiased (`bool`, defaults to `False`):
            Use the Sinkhorn divergence `OT(x, y) - OT(x, x) / 2 - OT(y, y) / 2` (0 at identity).
        ot_reference_on_cpu (`bool`, defaults to `False`):
            Keep the reference hidden states on CPU between generation and loss.
    """

    _argument_group_name = "Training fields (GuidedGRPOConfig: TRL's GRPOConfig and the guided fields)"  # --help

    guidance: bool = field(
        default=True,
        metadata={"help": "Sample prefix/guidance/postfix rollouts. False: behave exactly like trl.GRPOTrainer."},
    )
    prefix_min_tokens: int | None = field(
        default=None,
        metadata={"help": "Shortest prefix drawn before the punctuation cut. Default: prefix_max_tokens // 4 (>= 1)."},
    )
    prefix_max_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Longest prefix drawn before the punctuation cut. Default: (max_completion_length - "
            "max_guide_tokens) // 2, which leaves at least half the budget for guidance and postfix."
        },
    )
    punctuation: list[str] = field(
        default_factory=lambda: list(DEFAULT_PUNCTUATION),
        metadata={"help": "Marks a prefix may end on (a token that merges a mark with other characters counts)."},
    )
    branch_point: str = field(
        default="punctuation",
        metadata={"help": f"How the shared prefix is cut. One of: {', '.join(BRANCH_POINTS)}."},
    )
    branch_min_prefix_tokens: int = field(
        default=1, metadata={"help": "Positions before this are never chosen as the branch point."}
    )
    branch_snap_to_punctuation: bool = field(
        default=False,
        metadata={
            "help": "entropy/low_prob/random: move the cut back to the last punctuation boundary within "
            "branch_snap_window tokens."
        },
    )
    branch_snap_window: int = field(
        default=8, metadata={"help": "How far back (tokens) branch_snap_to_punctuation may move the cut."}
    )
    num_prefixes_per_group: int = field(
        default=1,
        metadata={"help": "K prefixes per prompt group, each with num_generations / K branches (two-level tree)."},
    )
    tree_advantage: str = field(
        default="group",
        metadata={"help": f"Advantage of a branch with K > 1. One of: {', '.join(TREE_ADVANTAGES)}."},
    )
    prefix_advantage_weight: float = field(
        default=0.0,
        metadata={
            "help": "K > 1: weight of the prefix tokens' advantage (branch-set mean vs group mean); 0: untrained."
        },
    )
    min_guide_tokens: int = field(default=2, metadata={"help": "Shortest guidance segment (drawn per group)."})
    max_guide_tokens: int = field(default=8, metadata={"help": "Longest guidance segment (drawn per group)."})
    guidance_loss_scope: str = field(
        default="guidance_postfix",  # the rule's winner in bench/learning*.json (tests/unit/test_evidence.py)
        metadata={"help": f"Which completion tokens the loss trains. One of: {', '.join(LOSS_SCOPES)}."},
    )
    guidance_loss_normalization: str = field(
        default="trained",
        metadata={
            "help": "What the loss is normalised by when guidance narrows the trained tokens. 'trained': the trained "
            "tokens (TRL's own rule applied to the narrowed mask). 'completion': every completion token, as plain "
            "GRPO would, so guided and plain losses and gradient norms share one scale. See docs/training.md."
        },
    )
    postfix_decay: float = field(
        default=0.9,
        metadata={"help": "guidance_postfix scope: postfix token k after the guidance weighs postfix_decay**(k+1)."},
    )
    postfix_min_weight: float = field(
        default=0.0, metadata={"help": "guidance_postfix scope: floor of the postfix weights."}
    )
    loss_prob_threshold: float = field(
        default=0.9,
        metadata={
            "help": "low_prob scope: train the completion tokens whose sampling probability was below this "
            "(SPO's probability mask), in (0, 1]."
        },
    )
    prefix_eos_retries: int = field(
        default=2,
        metadata={
            "help": "How often a prefix sample that hit EOS is resampled; after that it is cut before EOS (or left "
            "empty when it has no punctuation mark before EOS)."
        },
    )
    eval_guidance: bool = field(
        default=True, metadata={"help": "Sample evaluation rollouts guided (True) or plain (False)."}
    )
    shared_prefix_loss: bool = field(
        default=True,
        metadata={
            "help": "Loss forward: encode each group's shared prompt + prefix once and run only the rest per row "
            "(Prefix Grouper; same log-probs and gradients). Skipped with gradient checkpointing, OT, multimodal or "
            "MoE aux-loss batches and multi-process ZeRO-3, where the plain forward runs. With guidance=False the "
            "shared part is the prompt."
        },
    )
    # Exact savings of a training step (trl_guided.step_savings): each is on only where it leaves the gradient as is.
    skip_zero_advantage_rows: bool = field(
        default=True,
        metadata={
            "help": "Leave rows with advantage 0 at every trained token out of the loss forward/backward, the "
            "normaliser kept (same gradient). Off where not exact: beta > 0, entropy bonus, top_entropy_quantile "
            "< 1, OT, MoE aux loss."
        },
    )
    trim_loss_padding: bool = field(
        default=True,
        metadata={"help": "Drop a micro-batch's columns after its longest completion before the loss (off with OT)."},
    )
    group_micro_batches: bool = field(
        default=True,
        metadata={
            "help": "Keep a prompt group's rows in one micro-batch instead of TRL's shuffled split (same gradient; "
            "off for bnpo, entropy bonus, top_entropy_quantile < 1, OT, MoE aux loss, or gradient_accumulation_steps "
            "not a multiple of steps_per_generation)."
        },
    )

    # Optimal-transport (Sinkhorn) regularizer on the backbone's last hidden states (see trl_guided.ot).
    ot_coef: float = field(default=0.0, metadata={"help": "Weight of the OT penalty in the loss; 0 turns OT off."})
    ot_window: int = field(default=16, metadata={"help": "Band half-width: token i may move to j with |i-j| <= it."})
    ot_epsilon: float = field(default=0.1, metadata={"help": "Entropic regularization of the Sinkhorn solve."})
    ot_iterations: int = field(
        default=50, metadata={"help": "Sinkhorn iterations (the cap when ot_tolerance is set)."}
    )
    ot_tolerance: float | None = field(
        default=None,
        metadata={"help": "Stop Sinkhorn once the row-marginal L1 error is below this (checked every 10)."},
    )
    ot_target: float = field(default=0.0, metadata={"help": "Hinge: only OT cost above this target is penalised."})
    ot_reference: str = field(
        default="ref",
        metadata={
            "help": "'ref': reference-model hidden states (built if beta == 0; the adapter-disabled base with PEFT). "
            "'old': the sampling-time policy (equal to the current one with TRL's on-policy defaults)."
        },
    )
    ot_debiased: bool = field(
        default=False,
        metadata={"help": "Use the Sinkhorn divergence OT(x,y) - OT(x,x)/2 - OT(y,y)/2 (0 at identity)."},
    )
    ot_reference_on_cpu: bool = field(
        default=False, metadata={"help": "Keep reference hidden states on CPU between generation and loss."}
    )

    def __post_init__(self):
        self._default_precision()
        super().__post_init__()
        self._derive_prefix_range()
        errors = self._ot_errors()
        if not self.guidance:
            if errors:
                raise ValueError("Invalid GuidedGRPOConfig:\n- " + "\n- ".join(errors))
            return
        if self.branch_point not in BRANCH_POINTS:
            errors.append(f"branch_point={self.branch_point!r} is unknown; choose one of {sorted(BRANCH_POINTS)}.")
        errors += self._branch_errors()
        if self.guidance_loss_scope not in LOSS_SCOPES:
            errors.append(
                f"guidance_loss_scope={self.guidance_loss_scope!r} is unknown; choose one of {list(LOSS_SCOPES)}."
            )
        if self.guidance_loss_normalization not in LOSS_NORMALIZATIONS:
            errors.append(
                f"guidance_loss_normalization={self.guidance_loss_normalization!r} is unknown; choose one of "
                f"{list(LOSS_NORMALIZATIONS)}."
            )
        if not self.punctuation or not all(isinstance(p, str) and p for p in self.punctuation):
            errors.append(f"punctuation={self.punctuation!r} must be a non-empty list of non-empty strings.")
        if self.min_guide_tokens < 1:
            errors.append(f"min_guide_tokens={self.min_guide_tokens} must be >= 1.")
        if self.min_guide_tokens > self.max_guide_tokens:
            errors.append(
                f"min_guide_tokens={self.min_guide_tokens} > max_guide_tokens={self.max_guide_tokens}; "
                "set min_guide_tokens <= max_guide_tokens."
            )
        if self.prefix_min_tokens < 1 or self.prefix_min_tokens > self.prefix_max_tokens:
            errors.append(
                f"prefix_min_tokens={self.prefix_min_tokens}, prefix_max_tokens={self.prefix_max_tokens}: need "
                "1 <= prefix_min_tokens <= prefix_max_tokens."
            )
        if self.prefix_max_tokens + self.max_guide_tokens >= self.max_completion_length:
            errors.append(
                f"prefix_max_tokens ({self.prefix_max_tokens}) + max_guide_tokens ({self.max_guide_tokens}) must be "
                f"< max_completion_length ({self.max_completion_length}) to leave room for a postfix; lower them or "
                "raise max_completion_length."
            )
        if not 0.0 < self.postfix_decay <= 1.0:
            errors.append(f"postfix_decay={self.postfix_decay} must be in (0, 1].")
        if not 0.0 < self.loss_prob_threshold <= 1.0:
            errors.append(f"loss_prob_threshold={self.loss_prob_threshold} must be in (0, 1] (SPO uses 0.9).")
        if not 0.0 <= self.postfix_min_weight <= 1.0:
            errors.append(f"postfix_min_weight={self.postfix_min_weight} must be in [0, 1].")
        if self.prefix_eos_retries < 0:
            errors.append(f"prefix_eos_retries={self.prefix_eos_retries} must be >= 0.")
        beam_search = sorted(set(self.generation_kwargs or {}) & BEAM_SEARCH_KWARGS)
        if beam_search and (self.generation_kwargs or {}).get("num_beams", 2) != 1:
            errors.append(
                f"generation_kwargs {beam_search} ask for beam search, which guided sampling does not support (each "
                "phase samples one continuation per row; beams change the rows). Keep sampling settings (temperature, "
                "top_k, top_p, min_p, repetition_penalty) and remove these, or set guidance=False."
            )
        rows_per_process = self.per_device_train_batch_size * self.steps_per_generation
        if rows_per_process % self.num_generations != 0:
            errors.append(
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) * steps_per_generation "
                f"({self.steps_per_generation}) = {rows_per_process} rows per process is not a multiple of "
                f"num_generations ({self.num_generations}): a prompt group would straddle two processes, and guided "
                "sampling needs whole groups per process. Make it a multiple (e.g. per_device_train_batch_size="
                f"{self.num_generations})."
            )
        eval_generations = self.num_generations_eval or self.num_generations
        if self.eval_guidance and self.eval_strategy != "no" and self.per_device_eval_batch_size % eval_generations:
            errors.append(
                f"per_device_eval_batch_size ({self.per_device_eval_batch_size}) is not a multiple of "
                f"num_generations_eval ({eval_generations}): guided evaluation needs whole groups per process. "
                "Make it a multiple, or set eval_guidance=False."
            )
        if errors:
            raise ValueError("Invalid GuidedGRPOConfig:\n- " + "\n- ".join(errors))

    def _default_precision(self) -> None:
        """bf16 off when the user set neither bf16 nor fp16 and training runs on CPU (see the class docstring)."""
        on_cpu = self.use_cpu or not (is_torch_bf16_gpu_available() or is_torch_xla_available())
        if self.bf16 is None and not self.fp16 and on_cpu:
            self.bf16 = False

    def _branch_errors(self) -> list[str]:
        errors = []
        if self.branch_min_prefix_tokens < 0:
            errors.append(f"branch_min_prefix_tokens={self.branch_min_prefix_tokens} must be >= 0.")
        if self.branch_snap_to_punctuation and self.branch_point == "punctuation":
            errors.append(
                "branch_snap_to_punctuation applies to branch_point 'entropy', 'low_prob' or 'random' ('punctuation' "
                "already cuts at a mark); choose one of those or remove it."
            )
        if self.branch_snap_window < 1:
            errors.append(f"branch_snap_window={self.branch_snap_window} must be >= 1.")
        k = self.num_prefixes_per_group
        if k < 1 or self.num_generations % k:
            errors.append(
                f"num_prefixes_per_group={k} must be >= 1 and divide num_generations ({self.num_generations}) so "
                "every prefix gets the same number of branches."
            )
        eval_generations = self.num_generations_eval or self.num_generations
        if k >= 1 and self.eval_guidance and self.eval_strategy != "no" and eval_generations % k:
            errors.append(
                f"num_prefixes_per_group={k} must divide num_generations_eval ({eval_generations}) for guided "
                "evaluation; change one of them or set eval_guidance=False."
            )
        if self.tree_advantage not in TREE_ADVANTAGES:
            errors.append(f"tree_advantage={self.tree_advantage!r} is unknown; choose one of {list(TREE_ADVANTAGES)}.")
        elif self.tree_advantage != "group" and k == 1:
            errors.append(
                f"tree_advantage={self.tree_advantage!r} needs num_prefixes_per_group > 1 (with one prefix the branch "
                "set is the whole group); raise num_prefixes_per_group or use 'group'."
            )
        tree_credit = self.tree_advantage != "group" or self.prefix_advantage_weight > 0
        if tree_credit and self.multi_objective_aggregation != "sum_then_normalize":
            errors.append(
                "tree_advantage other than 'group' and prefix_advantage_weight > 0 normalise the summed reward; they "
                "need multi_objective_aggregation='sum_then_normalize'."
            )
        scope = LOSS_SCOPES.get(self.guidance_loss_scope)
        if self.tree_advantage == "treerl" and scope is not None and not scope.trains_prefix:
            errors.append(
                f"tree_advantage='treerl' weights the shared prefix tokens, which guidance_loss_scope="
                f"{self.guidance_loss_scope!r} does not train; use 'completion' or 'low_prob', or 'group+branch'."
            )
        if self.tree_advantage == "treerl" and self.prefix_advantage_weight > 0:
            errors.append(
                "tree_advantage='treerl' sets the prefix tokens' advantage itself; set prefix_advantage_weight=0 "
                "or use tree_advantage='group+branch'."
            )
        if self.prefix_advantage_weight < 0:
            errors.append(f"prefix_advantage_weight={self.prefix_advantage_weight} must be >= 0.")
        elif self.prefix_advantage_weight > 0 and k == 1:
            errors.append(
                "prefix_advantage_weight > 0 needs num_prefixes_per_group > 1 (one prefix per group has the group's "
                "mean reward, so its advantage is 0); raise num_prefixes_per_group or set it to 0."
            )
        return errors

    def _ot_errors(self) -> list[str]:
        errors = []
        if self.ot_coef < 0:
            errors.append(f"ot_coef={self.ot_coef} must be >= 0 (0 turns OT off).")
        if self.ot_window < 0:
            errors.append(f"ot_window={self.ot_window} must be >= 0.")
        if self.ot_epsilon <= 0:
            errors.append(f"ot_epsilon={self.ot_epsilon} must be > 0.")
        if self.ot_iterations < 1:
            errors.append(f"ot_iterations={self.ot_iterations} must be >= 1.")
        if self.ot_tolerance is not None and self.ot_tolerance <= 0:
            errors.append(f"ot_tolerance={self.ot_tolerance} must be > 0 or unset.")
        if self.ot_reference not in ("ref", "old"):
            errors.append(f"ot_reference={self.ot_reference!r} is unknown; choose 'ref' or 'old'.")
        return errors

    @property
    def old_policy_is_current(self) -> bool:
        """True when TRL never computes old log-probs: the sampling policy equals the one being optimised."""
        generate_every = self.steps_per_generation * self.num_iterations
        correcting_vllm = self.use_vllm and self.vllm_importance_sampling_correction
        return self.gradient_accumulation_steps % generate_every == 0 and not correcting_vllm

    def _derive_prefix_range(self) -> None:
        if self.prefix_max_tokens is None:
            self.prefix_max_tokens = max(1, (self.max_completion_length - self.max_guide_tokens) // 2)
        if self.prefix_min_tokens is None:
            self.prefix_min_tokens = max(1, min(self.prefix_max_tokens, self.prefix_max_tokens // 4))
