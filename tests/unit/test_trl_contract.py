"""The TRL 1.16 private methods and attributes the plugin overrides or touches: fail loudly when one moves."""

from __future__ import annotations

import inspect

from trl import GRPOTrainer

from trl_guided import GuidedGRPOTrainer

from .common import trainer_for


def test_trl_private_signatures_we_rely_on_are_unchanged():
    """Fails loudly when a TRL upgrade moves a private method this plugin overrides or calls."""
    import trl

    expected = {
        "_generate_single_turn": [
            "self",
            "prompt_ids",
            "images",
            "multimodal_fields",
            "num_generations",
            "has_tool_images",
        ],
        "_generate_and_score_completions": ["self", "inputs"],
        "_compute_loss": ["self", "model", "inputs"],
        "_get_per_token_logps_and_entropies": None,
        "_log_completion_extra": ["self", "column", "values"],
        "_calculate_rewards": ["self", "inputs", "prompts", "completions", "completion_ids_list"],
        "_save_rng_state": ["self", "output_dir"],
        "_load_rng_state": ["self", "checkpoint"],
        "train": ["self", "resume_from_checkpoint", "trial", "ignore_keys_for_eval"],
        "get_high_entropy_mask": ["self", "entropies", "mask", "threshold"],
    }
    for name, params in expected.items():
        method = getattr(GRPOTrainer, name, None)
        assert method is not None, f"trl {trl.__version__}: GRPOTrainer.{name} is gone"
        if params is not None:
            assert list(inspect.signature(method).parameters) == params, f"GRPOTrainer.{name} changed signature"
    # GuidedGRPOTrainer binds its arguments by GRPOTrainer's own signature; its first three are named the same.
    init = list(inspect.signature(GRPOTrainer.__init__).parameters)
    assert init[:4] == list(inspect.signature(GuidedGRPOTrainer.__init__).parameters)[:4]
    assert {"tools", "rollout_func", "environment_factory"} <= set(init), "the rollout owners guidance refuses moved"
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    for key in ('"tool_mask"', '"advantages"', '"num_items_in_batch"', "self._generate("):
        assert key in source, f"GRPOTrainer._generate_and_score_completions no longer uses {key}"
    # Tree advantages re-normalise TRL's summed rewards and slice them as TRL slices the advantages.
    for key in ("rewards_per_func * self.reward_weights", "self.accelerator.process_index * len(prompts)"):
        assert key in source, f"GRPOTrainer._generate_and_score_completions no longer uses {key}"
    loss_source = inspect.getsource(GRPOTrainer._compute_loss)
    assert "advantages.dim() == 1" in loss_source, "(B, T) advantages unsupported"
    # The entropy mask: one call per micro-batch, over the tokens in the loss (`mask` includes `tool_mask`).
    assert "self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)" in loss_source
    # A completion without any reward (all NaN) gets advantage 0 in TRL; infinite rewards are mapped onto that case.
    assert "unscorable_mask" in source, "TRL no longer zeroes the advantage of completions without any reward"
    assert "self.generation_kwargs" in inspect.getsource(GRPOTrainer._generate_single_turn)
    from trl.generation.vllm_generation import VLLMGeneration

    assert "self.max_completion_length" in inspect.getsource(VLLMGeneration.generate)


def test_trl_private_attributes_the_rollout_backend_uses_exist(tiny_llama, tmp_path):
    """The trainer wires private attributes of TRL 1.16 into its helpers (`GuidedGRPOTrainer._rollout_backend`,
    `_loss_focus_of`) and trl_guided/backends.py sets some; fail loudly when an upgrade moves one."""
    from trl.generation.vllm_generation import VLLMGeneration

    trainer = trainer_for(tiny_llama, tmp_path)
    for name in (
        "use_vllm",
        "vllm_mode",
        "use_transformers_continuous_batching",
        "generation_config",
        "generation_kwargs",
        "model_wrapped",
        "pad_to_multiple_of",
        "_tokenizer",
        "eos_token_ids",
        "_metrics",
        "_step",
        "_buffered_inputs",
        "loss_type",
        "scale_rewards",
        "reward_weights",
        "num_generations_eval",
    ):
        assert hasattr(trainer, name), f"GRPOTrainer no longer has .{name}"
    assert isinstance(trainer._dist.is_zero3, bool), "GRPOTrainer._dist.is_zero3 moved"
    assert hasattr(trainer.args, "ds3_gather_for_generation")
    vllm_source = inspect.getsource(VLLMGeneration)
    for name in ("_llm_weights_sleeping", "enable_sleep_mode", "def sync_weights", "generation_kwargs", "self.llm"):
        assert name in vllm_source, f"VLLMGeneration no longer has {name}"
    assert "_last_loaded_step" in inspect.getsource(GRPOTrainer), "GRPOTrainer no longer tracks _last_loaded_step"
