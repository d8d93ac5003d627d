"""The one place that knows TRL's, vLLM's and DeepSpeed's internals: how a guided phase reaches the generation backend.

`RolloutBackend` is the `trl_guided.sampler.PhaseBackend` of a `GuidedGRPOTrainer`. Every phase goes through TRL's own
backend dispatch (`GRPOTrainer._generate_single_turn`: transformers, vLLM colocate, vLLM server); this module only sets
the token budget around each call, keeps the backend ready across the three phases of a rollout (one ZeRO-3 gather,
one vLLM wake-up and weight sync), shares the prompt's KV cache between branches on the transformers backend, and makes
vLLM server calls collective. A TRL or vLLM upgrade that moves one of the private attributes used here changes this
file (and `tests/unit/test_trl_contract.py` says which one moved).

TRL 1.16 attributes read or set here: `GRPOTrainer.use_vllm`, `.vllm_mode`, `.use_transformers_continuous_batching`,
`.vllm_generation` (its `.generation_kwargs`, `.max_completion_length`, `.enable_sleep_mode`,
`._llm_weights_sleeping`, `.sync_weights()`, `.llm`), `.generation_config`, `.generation_kwargs`, `._last_loaded_step`,
`._dist.is_zero3`, `.model_wrapped`, `.pad_to_multiple_of`, `._tokenizer`; `args.ds3_gather_for_generation`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers import DynamicCache, PretrainedConfig
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import pad

from .guidance import TokenSignals


class RolloutBackend:
    """Generation for the guided sampler, over the backends of one `GRPOTrainer`.

    `plain_generate(prompt_ids, num_generations) -> (ids, logps)` is TRL's own single-turn generation
    (`GRPOTrainer._generate_single_turn` with no images), called for every phase with the budget set here.
    """

    def __init__(self, trainer, plain_generate: Callable[[list[list[int]], int], tuple[list, list | None]]):
        self.trainer = trainer
        self.plain_generate = plain_generate

    @property
    def branches_in_one_call(self) -> bool:
        """The transformers backend: no cache survives between generate calls (vLLM has prefix caching)."""
        return not self.trainer.use_vllm and not self.trainer.use_transformers_continuous_batching

    def is_server_collective(self) -> bool:
        trainer = self.trainer
        return bool(trainer.use_vllm and trainer.vllm_mode == "server" and trainer.accelerator.num_processes > 1)

    def any_process(self, flag: bool) -> bool:
        accelerator = self.trainer.accelerator
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
    ):
        """One batched call of TRL's backend with `max_new_tokens` (and EOS held back for `min_new_tokens`).

        `shared_prompts` (transformers backend): the prompts come in runs of `num_generations` identical ones, whose
        key/value cache is computed once per run and repeated, instead of once per row.

        Every process makes every call, because a call may be a collective: a ZeRO-3 parameter gather (a process with
        nothing to do sends a throw-away 1-token row), or a vLLM server request, which needs equal-sized lists and one
        token budget on all processes (short lists are padded, the budget is the largest; rows are cut to their own
        budget afterwards).
        """
        trainer, count = self.trainer, len(prompts)
        eos_token_id = trainer._tokenizer.eos_token_id
        if self.is_server_collective():
            accelerator = trainer.accelerator
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
                stack.enter_context(self.generate_from_shared_cache(prompts, num_generations))
            ids, logps = self.plain_generate(prompts, num_generations)
        return ids[:count], None if logps is None else logps[:count]

    def token_signals(self, prompts: list[list[int]], samples: list[list[int]]) -> list[TokenSignals]:
        """The current policy's entropy and log-prob at every sampled token, from one no-grad forward over each
        prompt + sample (TRL's scoring forward: fused LM head at the sampling temperature; the same on every backend).

        Every process must call it: under ZeRO-3 the gather (or the sharded forward itself) is a collective, so a
        process with no rows scores a throw-away one-token row.
        """
        trainer = self.trainer
        device = trainer.accelerator.device
        filler = not prompts
        if filler:
            prompts, samples = [[trainer._tokenizer.eos_token_id]], [[trainer._tokenizer.eos_token_id]]
        width = max(1, max(len(sample) for sample in samples))
        padding = dict(padding_side="left", pad_to_multiple_of=trainer.pad_to_multiple_of)
        prompt_ids = pad(
            [torch.tensor(ids) for ids in prompts], padding_value=trainer._tokenizer.pad_token_id, **padding
        )
        prompt_mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in prompts], padding_value=0, **padding)
        sample_ids = torch.full((len(samples), width), trainer._tokenizer.pad_token_id, dtype=torch.long)
        sample_mask = torch.zeros((len(samples), width), dtype=torch.long)
        for row, sample in enumerate(samples):
            sample_ids[row, : len(sample)] = torch.tensor(sample, dtype=torch.long)
            sample_mask[row, : len(sample)] = 1
        input_ids = torch.cat([prompt_ids, sample_ids], dim=1).to(device)
        attention_mask = torch.cat([prompt_mask, sample_mask], dim=1).to(device)
        with self._policy_for_forward() as model:
            logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, width, trainer.args.per_device_train_batch_size, compute_entropy=True
            )
        if filler:
            return []
        logps, entropies = logps.float().cpu().tolist(), entropies.float().cpu().tolist()
        return [
            TokenSignals(entropies=entropies[row][: len(sample)], logprobs=logps[row][: len(sample)])
            for row, sample in enumerate(samples)
        ]

    @contextlib.contextmanager
    def _policy_for_forward(self):
        """The policy for a no-grad forward outside the loss (gathered under ZeRO-3 as TRL gathers it to generate)."""
        trainer = self.trainer
        with (
            unwrap_model_for_generation(
                trainer.model_wrapped,
                trainer.accelerator,
                gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
            ) as model,
            torch.no_grad(),
        ):
            yield model

    @contextlib.contextmanager
    def generate_from_shared_cache(self, prompts: list[list[int]], num_generations: int):
        """Prefill each run of `num_generations` identical prompts once; the next generate call starts from it.

        The cache is laid out exactly as TRL pads the prompts (left padding, `pad_to_multiple_of`, positions from the
        attention mask), covers all but the last prompt column, and is repeated `num_generations` times.
        """
        trainer = self.trainer
        device = trainer.accelerator.device
        unique = [torch.tensor(ids) for ids in prompts[::num_generations]]
        padding = dict(padding_side="left", pad_to_multiple_of=trainer.pad_to_multiple_of)
        input_ids = pad(unique, padding_value=trainer._tokenizer.pad_token_id, **padding).to(device)
        mask = pad([torch.ones_like(ids) for ids in unique], padding_value=0, **padding).to(device)
        if input_ids.size(1) < 2:
            yield
            return
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        with self._policy_for_forward() as model:
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

        model.generate = generate_from_cache  # an instance attribute: TRL's next generate call takes it
        try:
            yield
        finally:
            del model.generate

    @contextlib.contextmanager
    def token_budget(self, max_new_tokens: int, min_new_tokens: int = 0):
        """Temporarily set the token budget of whichever generation backend is active.

        The minimum goes through each backend's own parameter (vLLM `min_tokens`, transformers `min_new_tokens`), so
        EOS is held back inside the sampler rather than resampled afterwards.
        """
        trainer = self.trainer
        vllm_generation = getattr(trainer, "vllm_generation", None) if trainer.use_vllm else None
        settings = []
        if vllm_generation is not None:
            settings.append((vllm_generation, "max_completion_length", max_new_tokens))
            settings.append((vllm_generation.generation_kwargs, "min_tokens", min_new_tokens or None))
        if getattr(trainer, "generation_config", None) is not None:
            settings.append((trainer.generation_config, "max_new_tokens", max_new_tokens))
            settings.append((trainer.generation_config, "min_new_tokens", min_new_tokens or None))
        if isinstance(getattr(trainer, "generation_kwargs", None), dict):
            settings.append((trainer.generation_kwargs, "max_new_tokens", max_new_tokens))
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
        trainer = self.trainer
        vllm_generation = getattr(trainer, "vllm_generation", None) if trainer.use_vllm else None
        with contextlib.ExitStack() as stack:
            if vllm_generation is not None and trainer.vllm_mode == "colocate" and vllm_generation.enable_sleep_mode:
                if vllm_generation._llm_weights_sleeping:
                    vllm_generation.sync_weights()  # wakes the weights and pushes the current policy
                    trainer._last_loaded_step = trainer.state.global_step
                vllm_generation.llm.wake_up(tags=["kv_cache"])
                stack.callback(put_to_sleep, vllm_generation)
                stack.enter_context(temporarily(vllm_generation, "enable_sleep_mode", False))
            elif not trainer.use_vllm and trainer._dist.is_zero3 and trainer.args.ds3_gather_for_generation:
                stack.enter_context(
                    unwrap_model_for_generation(
                        trainer.model_wrapped,
                        trainer.accelerator,
                        gather_deepspeed3_params=True,
                        gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
                    )
                )
                stack.enter_context(temporarily(trainer.args, "ds3_gather_for_generation", False))
            yield


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
