"""The one place that knows TRL's, vLLM's and DeepSpeed's internals: how a guided phase reaches a generation backend.

Two `trl_guided.sampler.PhaseBackend`s live here, both built from the values and callables they use (never a
trainer), so either can be built and tested on its own:

- `RolloutBackend`, a `GuidedGRPOTrainer`'s: every phase goes through TRL's own backend dispatch
  (`GRPOTrainer._generate_single_turn`: transformers, vLLM colocate, vLLM server), which the trainer hands over as
  `plain_generate`. This module only sets the token budget around each call, keeps the backend ready across the three
  phases of a rollout (one ZeRO-3 gather, one vLLM wake-up and weight sync), shares the prompt's KV cache between
  branches on the transformers backend, and makes vLLM server calls collective.
- `ModelBackend`: one transformers model on one process, for sampling outside training (`trl-guided eval --sampling
  guided`): each phase is one `generate` call, its rows cut after EOS as TRL's transformers path cuts them.

The `entropy` / `low_prob` branch points read the policy's signals at each phase-1 token off the logits generation
computed anyway (`SignalRecorder`, both backends on transformers); where generation keeps no logits here (vLLM,
continuous batching), one scoring forward computes them (`score_tokens`: TRL's fused LM head at the sampling
temperature). A TRL or vLLM upgrade that moves one of the private names used here changes this file (and
`tests/unit/test_trl_contract.py` says which one moved). TRL 1.16 names used here: `VLLMGeneration`'s
`.generation_kwargs`, `.max_completion_length`, `.enable_sleep_mode`, `._llm_weights_sleeping`, `.sync_weights()`,
`.llm`; `trl.distributed.DistributedBackend.is_zero3`; `trl.models.unwrap_model_for_generation`;
`trl.trainer.utils.pad`, `add_fused_lm_head` (the `fused_lm_head=True` forward); `args.ds3_gather_for_generation`.
The trainer wires `GRPOTrainer.vllm_generation`, `.vllm_mode`, `.generation_config`, `.generation_kwargs`,
`.use_transformers_continuous_batching`, `.model_wrapped`, `.pad_to_multiple_of`, `._tokenizer` and
`._last_loaded_step` into `RolloutBackend` (`GuidedGRPOTrainer._rollout_backend`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers import DynamicCache, GenerationConfig, PretrainedConfig, StoppingCriteriaList
from trl.distributed import DistributedBackend
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import add_fused_lm_head, pad

from .generation import RowBudgets, SignalRecorder, generate_with
from .guidance import TokenSignals

# (model, input_ids, attention_mask, logits_to_keep) -> (per-token log-probs, entropies) of the last columns
Scorer = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def score_tokens(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    batch_size: int | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of the last `logits_to_keep` tokens of each row, in chunks of `batch_size` rows,
    through the fused LM head TRL patches into every scored model (`add_fused_lm_head`: log-softmax at the sampling
    temperature without materialising the logits; the same forward TRL's scoring makes). No gradient is taken here."""
    batch_size = batch_size or input_ids.size(0)
    logps, entropies = [], []
    for start in range(0, input_ids.size(0), batch_size):
        ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :-logits_to_keep] = -100
        with autocast():
            out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        logps.append(out.log_probs[:, -logits_to_keep:])
        entropies.append(out.entropy[:, -logits_to_keep:])
    return torch.cat(logps), torch.cat(entropies)


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int, pad_to_multiple_of: int | None = None):
    """(ids, attention mask) of token rows, left-padded as TRL pads prompts for generation."""
    tensors = [torch.tensor(list(ids), dtype=torch.long) for ids in rows]
    padding = dict(padding_side="left", pad_to_multiple_of=pad_to_multiple_of)
    ids = pad(tensors, padding_value=pad_token_id, **padding)
    mask = pad([torch.ones_like(t) for t in tensors], padding_value=0, **padding)
    return ids, mask


def sample_signals(
    policy: Callable[[], contextlib.AbstractContextManager],
    score: Scorer,
    prompts: list[list[int]],
    samples: list[list[int]],
    pad_token_id: int,
    pad_to_multiple_of: int | None,
    device: torch.device,
) -> list[TokenSignals]:
    """The policy's entropy and log-prob at every token of each sample after its prompt, from one no-grad forward over
    each prompt + sample (left-padded prompts, right-padded samples) of the model `policy()` yields."""
    width = max(1, max(len(sample) for sample in samples))
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id, pad_to_multiple_of)
    sample_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    sample_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        sample_ids[row, : len(sample)] = torch.tensor(sample, dtype=torch.long)
        sample_mask[row, : len(sample)] = 1
    input_ids = torch.cat([prompt_ids, sample_ids], dim=1).to(device)
    attention_mask = torch.cat([prompt_mask, sample_mask], dim=1).to(device)
    with policy() as model, torch.no_grad():
        logps, entropies = score(model, input_ids, attention_mask, width)
    logps, entropies = logps.float().cpu().tolist(), entropies.float().cpu().tolist()
    return [
        TokenSignals(entropies=entropies[row][: len(sample)], logprobs=logps[row][: len(sample)])
        for row, sample in enumerate(samples)
    ]


@contextlib.contextmanager
def generate_from_shared_cache(
    policy: Callable[[], contextlib.AbstractContextManager],
    prompts: list[list[int]],
    num_generations: int,
    pad_token_id: int,
    pad_to_multiple_of: int | None,
    device: torch.device,
):
    """Prefill each run of `num_generations` identical prompts once (with the model `policy()` yields); the next
    `generate` call of that model starts from it.

    The cache is laid out exactly as TRL pads the prompts (left padding, `pad_to_multiple_of`, positions from the
    attention mask), covers all but the last prompt column, and is repeated `num_generations` times.
    """
    input_ids, mask = left_pad(prompts[::num_generations], pad_token_id, pad_to_multiple_of)
    input_ids, mask = input_ids.to(device), mask.to(device)
    if input_ids.size(1) < 2:
        yield
        return
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with policy() as model, torch.no_grad():
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
    with generate_with(model, past_key_values=cache):
        yield


@dataclass
class TRLGeneration:
    """TRL's generation objects of one `GRPOTrainer` that a phase's token budget and a rollout's session set."""

    vllm_generation: Any = None  # TRL's `VLLMGeneration` (when `use_vllm`)
    vllm_mode: str | None = None  # "colocate" or "server" (when `use_vllm`)
    generation_config: GenerationConfig | None = None  # transformers backend
    generation_kwargs: dict | None = None  # transformers backend: overrides of the model's own generation config
    continuous_batching: bool = False  # `use_transformers_continuous_batching`

    @property
    def use_vllm(self) -> bool:
        return self.vllm_generation is not None


class RolloutBackend:
    """Generation for the guided sampler over the backends of one `GRPOTrainer`, from what the trainer hands over:

    - `plain_generate(prompt_ids, num_generations) -> (ids, logps)`: TRL's own single-turn generation
      (`GRPOTrainer._generate_single_turn` with no images), called for every phase with the budget set here;
    - `trl`: the generation objects that budget is set on (`TRLGeneration`);
    - `model()`: the policy as the trainer holds it now (wrapped by DDP / DeepSpeed once training starts);
    - `accelerator`, `args` (its `ds3_gather_for_generation`, `gradient_checkpointing_kwargs` and
      `per_device_train_batch_size`), `tokenizer` (pad and EOS ids), `pad_to_multiple_of`;
    - `on_weights_synced()`: called after a rollout pushed the policy's weights to vLLM (TRL then skips its own sync).
    """

    def __init__(
        self,
        plain_generate: Callable[[list[list[int]], int], tuple[list, list | None]],
        trl: TRLGeneration,
        model: Callable[[], torch.nn.Module],
        accelerator,
        args,
        tokenizer,
        pad_to_multiple_of: int | None = None,
        on_weights_synced: Callable[[], None] = lambda: None,
    ):
        self.plain_generate, self.trl, self.model, self.accelerator = plain_generate, trl, model, accelerator
        self.args, self.tokenizer, self.pad_to_multiple_of = args, tokenizer, pad_to_multiple_of
        self.on_weights_synced = on_weights_synced
        self.zero3 = DistributedBackend(accelerator).is_zero3

    @property
    def branches_in_one_call(self) -> bool:
        """The transformers backend: no cache survives between generate calls (vLLM has prefix caching)."""
        return not self.trl.use_vllm and not self.trl.continuous_batching

    def is_server_collective(self) -> bool:
        return bool(self.trl.use_vllm and self.trl.vllm_mode == "server" and self.accelerator.num_processes > 1)

    def any_process(self, flag: bool) -> bool:
        accelerator = self.accelerator
        if accelerator.num_processes == 1:
            return flag
        flags = accelerator.gather(torch.tensor([int(flag)], device=accelerator.device))
        return bool(flags.any().item())

    def generate(
        self,
        prompts: list[list[int]],
        num_generations: int,
        max_new_tokens: int,
        min_new_tokens: int = 0,
        shared_prompts: bool = False,
        row_budgets: list[int] | None = None,
    ):
        """One batched call of TRL's backend with `max_new_tokens` (and EOS held back for `min_new_tokens`).

        `shared_prompts` (transformers backend): the prompts come in runs of `num_generations` identical ones, whose
        key/value cache is computed once per run and repeated, instead of once per row. `row_budgets`: the tokens
        each row keeps (the caller cuts the rest); the transformers backend ends each row there (`RowBudgets`).

        Every process makes every call, because a call may be a collective: a ZeRO-3 parameter gather (a process with
        nothing to do sends a throw-away 1-token row), or a vLLM server request, which needs equal-sized lists and one
        token budget on all processes (short lists are padded, the budget is the largest; rows are cut to their own
        budget afterwards).
        """
        return self._generate(prompts, num_generations, max_new_tokens, min_new_tokens, shared_prompts, row_budgets)

    def generate_scored(
        self, prompts: list[list[int]], num_generations: int, max_new_tokens: int, shared_prompts: bool = False
    ):
        """`generate`, plus each sample's `TokenSignals` when the backend reads them off its own forwards (the
        transformers backend: `SignalRecorder`); None where it cannot (vLLM, continuous batching): score the samples
        with `token_signals` then."""
        if not self.branches_in_one_call:
            return (*self.generate(prompts, num_generations, max_new_tokens, shared_prompts=shared_prompts), None)
        recorder = SignalRecorder(self.args.temperature)
        ids, logps = self._generate(prompts, num_generations, max_new_tokens, 0, shared_prompts, recorder=recorder)
        return ids, logps, recorder.signals(ids)

    def _generate(
        self, prompts, num_generations, max_new_tokens, min_new_tokens, shared_prompts, row_budgets=None, recorder=None
    ):
        count, eos_token_id = len(prompts), self.tokenizer.eos_token_id
        if self.is_server_collective():
            accelerator = self.accelerator
            sizes = accelerator.gather(torch.tensor([[count, max_new_tokens]], device=accelerator.device))
            target, max_new_tokens = int(sizes[:, 0].max()), int(sizes[:, 1].max())
            if target == 0:
                return [], None
            filler = prompts[:num_generations] if prompts else [[eos_token_id]] * num_generations
            prompts = prompts + filler * ((target - count) // num_generations)
        elif not prompts:
            prompts, num_generations, max_new_tokens = [[eos_token_id]], 1, 1
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.token_budget(max_new_tokens, min(min_new_tokens, max_new_tokens)))
            if shared_prompts and count and num_generations > 1 and self.branches_in_one_call:
                stack.enter_context(self._prefill_once(prompts, num_generations))
            if row_budgets is not None and count and self.branches_in_one_call:
                stopping = StoppingCriteriaList([RowBudgets(row_budgets)])
                model = self.accelerator.unwrap_model(self.model())  # the object TRL calls `generate` on
                stack.enter_context(generate_with(model, stopping_criteria=stopping))
            if recorder is not None:  # after the shared prefill: only generate's own forwards are recorded
                stack.enter_context(recorder.attached(generating_model(self.model())))
            ids, logps = self.plain_generate(prompts, num_generations)
        return ids[:count], None if logps is None else logps[:count]

    @contextlib.contextmanager
    def shared_prompt_prefill(self, prompts: list[list[int]], num_generations: int):
        """Around a plain (unguided) generate call of TRL's transformers backend: each run of `num_generations`
        identical prompts is prefilled once (`generate_from_shared_cache`). Nothing changes on the other backends
        (vLLM caches prefixes itself), for prompts not laid out in such runs, and under multi-process ZeRO-3 (the
        prefill would gather the parameters outside TRL's own gather, a collective every process must join)."""
        shared = (
            self.branches_in_one_call
            and num_generations > 1
            and not (self.zero3 and self.accelerator.num_processes > 1)
            and in_runs(prompts, num_generations)
        )
        with self._prefill_once(prompts, num_generations) if shared else contextlib.nullcontext():
            yield

    def _prefill_once(self, prompts: list[list[int]], num_generations: int):
        """`generate_from_shared_cache` of these runs of `num_generations` prompts, laid out as TRL pads them."""
        return generate_from_shared_cache(
            self._policy_for_forward,
            prompts,
            num_generations,
            self.tokenizer.pad_token_id,
            self.pad_to_multiple_of,
            self.accelerator.device,
        )

    def token_signals(self, prompts: list[list[int]], samples: list[list[int]]) -> list[TokenSignals]:
        """The current policy's entropy and log-prob at every sampled token (`sample_signals`, TRL's scoring forward:
        fused LM head at the sampling temperature, the trainer's mixed precision; the same on every backend).

        Every process must call it: under ZeRO-3 the gather (or the sharded forward itself) is a collective, so a
        process with no rows scores a throw-away one-token row.
        """
        filler = not prompts
        if filler:
            eos = self.tokenizer.eos_token_id
            prompts, samples = [[eos]], [[eos]]

        def score(model, input_ids, attention_mask, logits_to_keep):
            batch_size = self.args.per_device_train_batch_size
            return score_tokens(
                model, input_ids, attention_mask, logits_to_keep, batch_size, self.accelerator.autocast
            )

        signals = sample_signals(
            self._policy_for_forward,
            score,
            prompts,
            samples,
            self.tokenizer.pad_token_id,
            self.pad_to_multiple_of,
            self.accelerator.device,
        )
        return [] if filler else signals

    def _policy_for_forward(self):
        """The policy for a no-grad forward outside the loss (gathered under ZeRO-3 as TRL gathers it to generate)."""
        return unwrap_model_for_generation(
            self.model(),
            self.accelerator,
            gather_deepspeed3_params=self.args.ds3_gather_for_generation,
            gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
        )

    @contextlib.contextmanager
    def token_budget(self, max_new_tokens: int, min_new_tokens: int = 0):
        """Temporarily set the token budget of whichever generation backend is active.

        The minimum goes through each backend's own parameter (vLLM `min_tokens`, transformers `min_new_tokens`), so
        EOS is held back inside the sampler rather than resampled afterwards.
        """
        trl, settings = self.trl, []
        if trl.use_vllm:
            settings.append((trl.vllm_generation, "max_completion_length", max_new_tokens))
            settings.append((trl.vllm_generation.generation_kwargs, "min_tokens", min_new_tokens or None))
        if trl.generation_config is not None:
            settings.append((trl.generation_config, "max_new_tokens", max_new_tokens))
            settings.append((trl.generation_config, "min_new_tokens", min_new_tokens or None))
        if isinstance(trl.generation_kwargs, dict):
            settings.append((trl.generation_kwargs, "max_new_tokens", max_new_tokens))
        with contextlib.ExitStack() as stack:
            for target, name, value in settings:
                stack.enter_context(temporarily(target, name, value))
            yield

    @contextlib.contextmanager
    def session(self):
        """Keep the generation backend ready across the three phases of one rollout.

        - ZeRO-3 on the transformers backend: TRL gathers the sharded parameters around each generate call; here they
          are gathered once for the rollout and the phase calls are told not to gather again.
        - vLLM colocate with sleep mode: TRL's engine sleeps (level 2, weights dropped) after every generate call and
          reloads the weights on the next one; here it wakes and syncs once, stays awake for the three phases, then
          sleeps.
        """
        vllm_generation = self.trl.vllm_generation
        with contextlib.ExitStack() as stack:
            if vllm_generation is not None and self.trl.vllm_mode == "colocate" and vllm_generation.enable_sleep_mode:
                if vllm_generation._llm_weights_sleeping:
                    vllm_generation.sync_weights()  # wakes the weights and pushes the current policy
                    self.on_weights_synced()
                vllm_generation.llm.wake_up(tags=["kv_cache"])
                stack.callback(put_to_sleep, vllm_generation)
                stack.enter_context(temporarily(vllm_generation, "enable_sleep_mode", False))
            elif vllm_generation is None and self.zero3 and self.args.ds3_gather_for_generation:
                stack.enter_context(
                    unwrap_model_for_generation(
                        self.model(),
                        self.accelerator,
                        gather_deepspeed3_params=True,
                        gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
                    )
                )
                stack.enter_context(temporarily(self.args, "ds3_gather_for_generation", False))
            yield


@dataclass
class ModelBackend:
    """A `PhaseBackend` over one transformers model on one process, without a trainer (`trl-guided eval --sampling
    guided`): each phase is one left-padded `generate` call whose rows are cut after their first EOS, as TRL's
    transformers path cuts them; a group's branches start from one prefill of its prompt + prefix; the branch-point
    signals are read off generation (`SignalRecorder`; `token_signals` scores with `score_tokens`, the model gets
    TRL's fused LM head at the sampling temperature).

    `generation_config` holds the sampling settings (its token budget is set per call here) and `eos_token_ids` every
    id that ends a completion. No sampling log-probs are reported (as on TRL's transformers path).
    """

    model: torch.nn.Module
    tokenizer: Any
    generation_config: GenerationConfig
    eos_token_ids: list[int]
    batch_size: int | None = None  # rows per scoring forward (None: all at once)
    branches_in_one_call: bool = field(default=True, init=False)

    def __post_init__(self):
        target = self.model.get_base_model() if is_peft_model(self.model) else self.model
        add_fused_lm_head(target, temperature=self.generation_config.temperature, outputs=("log_probs", "entropy"))

    def any_process(self, flag: bool) -> bool:
        return flag  # one process

    def generate(
        self, prompts, num_generations, max_new_tokens, min_new_tokens=0, shared_prompts=False, row_budgets=None
    ):
        return self._generate(prompts, num_generations, max_new_tokens, min_new_tokens, shared_prompts, row_budgets)

    def generate_scored(self, prompts, num_generations, max_new_tokens, shared_prompts=False):
        recorder = SignalRecorder(self.generation_config.temperature)
        ids, logps = self._generate(prompts, num_generations, max_new_tokens, 0, shared_prompts, recorder=recorder)
        return ids, logps, recorder.signals(ids)

    def _generate(
        self, prompts, num_generations, max_new_tokens, min_new_tokens, shared_prompts, row_budgets=None, recorder=None
    ):
        if not prompts:
            return [], None
        pad_token_id, device = self.tokenizer.pad_token_id, self.model.device
        config = copy.deepcopy(self.generation_config)
        config.max_new_tokens, config.min_new_tokens = max_new_tokens, min_new_tokens or None
        input_ids, attention_mask = left_pad(prompts, pad_token_id)
        with contextlib.ExitStack() as stack:
            if shared_prompts and num_generations > 1:
                stack.enter_context(
                    generate_from_shared_cache(self._policy, prompts, num_generations, pad_token_id, None, device)
                )
            if recorder is not None:  # after the shared prefill: only generate's own forwards are recorded
                stack.enter_context(recorder.attached(generating_model(self.model)))
            stopping = StoppingCriteriaList([RowBudgets(row_budgets)] if row_budgets is not None else [])
            with torch.no_grad():
                output = self.model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=config,
                    stopping_criteria=stopping,
                )
        return [cut_after_eos(row, self.eos_token_ids) for row in output[:, input_ids.size(1) :].tolist()], None

    def token_signals(self, prompts, samples):
        if not prompts:
            return []

        def score(model, input_ids, attention_mask, logits_to_keep):
            return score_tokens(model, input_ids, attention_mask, logits_to_keep, self.batch_size)

        return sample_signals(
            self._policy, score, prompts, samples, self.tokenizer.pad_token_id, None, self.model.device
        )

    def _policy(self):
        return contextlib.nullcontext(self.model)


def in_runs(prompts: Sequence[Sequence[int]], run: int) -> bool:
    """Whether `prompts` come in runs of `run` identical ones (TRL's layout of a generation batch)."""
    if not prompts or len(prompts) % run:
        return False
    return all(list(prompts[i]) == list(prompts[i - i % run]) for i in range(len(prompts)))


def generating_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model whose forward `generate` calls: inside DDP / DeepSpeed wrappers, and inside PEFT (a
    PEFT model's `generate` runs its base model's)."""
    model = unwrap(model)
    return model.get_base_model() if is_peft_model(model) else model


def cut_after_eos(ids: list[int], eos_token_ids: Sequence[int]) -> list[int]:
    """A generated row up to and including its first EOS (all of it when there is none)."""
    eos = set(eos_token_ids)
    end = next((i + 1 for i, token in enumerate(ids) if token in eos), len(ids))
    return ids[:end]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / DeepSpeed wrappers, which hold it in `.module` (a PEFT model stays a PEFT model).

    Stops at the first module with a transformers config: a DeepSpeedEngine's own `.config` is its JSON config (a
    dict), so `.config` alone does not tell a wrapper from a model.
    """
    while hasattr(model, "module") and not isinstance(getattr(model, "config", None), PretrainedConfig):
        model = model.module
    return model


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack whose output is the last hidden state (LoRA layers, if any, live inside it)."""
    model = unwrap(model)
    if is_peft_model(model):
        model = model.get_base_model()
    return model.get_decoder()


@contextlib.contextmanager
def temporarily(target: Any, name: str, value: Any):
    """Set an attribute (or a dict key) for the duration of the block; restore it (or remove it) afterwards.

    A dict key set to None is removed for the block instead (so an unset option stays unset).
    """
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


def put_to_sleep(vllm_generation) -> None:
    """What TRL's VLLMGeneration does after a generate call in sleep mode (level 2: weights dropped)."""
    vllm_generation.llm.sleep(level=2)
    vllm_generation._llm_weights_sleeping = True
