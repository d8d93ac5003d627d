"""Guided GRPO with vLLM colocate on CPU: two real training steps of a tiny model through the real vLLM engine,
branching at the highest-entropy token into two prefixes per group; the cut equals the transformers backend's, and
the `low_prob` scope's mask is the trainer forward's (not vLLM's sampling log-probs).

Run with the .venv-vllm python: `python colocate.py WORKDIR`. Prints
`REPORT {json}`; exits 1 when a check fails.

Sleep mode (`vllm_enable_sleep_mode=True`) cannot run here: vLLM 0.31's CPU platform rejects it when the engine is
configured ("Sleep mode is not supported on current platform").
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import _common as common

# bfloat16 (vLLM) against float32 (trainer): worst single-token log-prob gap allowed.
BF16_TOLERANCE = 0.25


def keep_linear_weights_in_place() -> None:
    """The one CPU-only patch: emulate GPU weight semantics, so that this CI machine without a GPU runs the colocated
    engine, TRL's weight sync and the guided trainer together as a GPU user's run does.

    After loading, vLLM's CPU backend hands every linear layer to `dispatch_cpu_unquantized_gemm`, which packs a
    private copy of the weight for oneDNN (or the SGL kernel) and replaces `layer.weight` by an empty tensor (linear
    layers) or keeps it but computes from the copy (the LM head). TRL's colocate weight sync writes the training
    weights with `model.load_weights(...)` into `layer.weight`: into an empty tensor that fails, and for the LM head
    it would silently keep sampling from the stale copy. GPU backends compute from `layer.weight` directly; the
    fallback below is the plain `F.linear` vLLM itself uses when oneDNN is unavailable. It is slower than the packed
    kernels, which is why the package refuses colocated training on CPU (`trl_guided.config.vllm_training_refusal`,
    docs/distributed.md) instead of doing this; with the GPU semantics emulated, that refusal is switched off here.
    """
    import torch.nn.functional as F
    from vllm.model_executor.layers import utils

    import trl_guided.config

    def plain_linear(layer: Any, remove_weight: bool) -> None:
        layer.cpu_linear = lambda x, weight, bias: F.linear(x, weight, bias)

    # Looked up by name at every call (`from ...utils import dispatch_cpu_unquantized_gemm` inside the loaders).
    utils.dispatch_cpu_unquantized_gemm = plain_linear
    trl_guided.config.gpu_weight_semantics = lambda: True


def same_cut_as_transformers(trainer: Any, model: str, config: Any) -> dict[str, Any]:
    """For fixed phase-1 samples, the vLLM trainer's entropies and cuts equal a transformers-backend trainer's."""
    from trl_guided import GuidedGRPOTrainer

    plain_config = common.guided_config(Path(config.output_dir) / "hf", use_vllm=False, branch_point="entropy")
    plain = GuidedGRPOTrainer(
        model=model, reward_funcs=common.reward_len, args=plain_config, train_dataset=common.dataset()
    )
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    samples = [[20, 21, 22, 23, 24, 25, 26, 27], [30, 31, 32, 33, 34], [40, 41, 42, 43, 44, 45]]
    cuts, max_gap = {}, 0.0
    for name, each in (("vllm", trainer), ("transformers", plain)):
        signals = each._backend.token_signals(prompts, samples)
        rule = each._sampler.rule
        cuts[name] = [rule.cut(w, each.processing_class, s) for w, s in zip(samples, signals, strict=True)]
        cuts[f"{name}_entropies"] = [s.entropies for s in signals]
    for ours, theirs in zip(cuts["vllm_entropies"], cuts["transformers_entropies"], strict=True):
        max_gap = max(max_gap, max(abs(a - b) for a, b in zip(ours, theirs, strict=True)))
    common.check(trainer.use_vllm and not plain.use_vllm, "the two trainers do not use different backends")
    common.check(cuts["vllm"] == cuts["transformers"], f"cuts differ: {cuts['vllm']} vs {cuts['transformers']}")
    common.check(max_gap < 1e-5, f"entropies differ between backends by {max_gap}")
    return dict(vllm_cuts=cuts["vllm"], transformers_cuts=cuts["transformers"], max_entropy_gap=max_gap)


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    args = parser.parse_args()

    keep_linear_weights_in_place()
    from transformers import AutoModelForCausalLM
    from trl.generation.vllm_generation import VLLMGeneration

    from trl_guided import GuidedGRPOTrainer

    model = common.build_model(args.workdir / "model")
    initial = AutoModelForCausalLM.from_pretrained(model).eval()
    config = common.guided_config(
        args.workdir / "out",
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.1,
        # Large enough that one optimizer step visibly moves the log-probs: step 2 then only matches vLLM's sampling
        # log-probs if the weight sync really reached the engine.
        learning_rate=3e-3,
        branch_point="entropy",
        num_prefixes_per_group=2,
        tree_advantage="group+branch",
        guidance_loss_scope="low_prob",
        loss_prob_threshold=0.05,  # the tiny random model is unsure of nearly every token
    )
    # Count TRL's weight syncs (the real method runs): one per training step, not one per phase.
    syncs: list[int] = []
    sync = VLLMGeneration.sync_weights

    def counted_sync(self: VLLMGeneration) -> None:
        syncs.append(trainer.state.global_step)
        sync(self)

    VLLMGeneration.sync_weights = counted_sync
    start = time.perf_counter()
    trainer = GuidedGRPOTrainer(
        model=model, reward_funcs=common.reward_len, args=config, train_dataset=common.dataset()
    )
    init_seconds = time.perf_counter() - start
    cuts = same_cut_as_transformers(trainer, model, config)
    recorder = common.Recorder(trainer)
    focused = record_focus(trainer)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    recorder.close()

    steps = trainer.state.global_step
    common.check(steps == 2, f"{steps} training steps ran, expected 2")
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    common.check(len(losses) == 2 and all(math.isfinite(x) for x in losses), f"losses {losses}")
    guidance = common.logged(trainer, "guidance/")
    for name in ("prefix_length", "guide_length", "postfix_length", "empty_prefix_ratio", "branch_entropy"):
        common.check(all(f"guidance/{name}" in e for e in guidance[:2]), f"guidance/{name} not logged: {guidance}")
    report: dict[str, Any] = dict(steps=steps, losses=losses, init_seconds=init_seconds, train_seconds=train_seconds)
    report.update(cuts, num_prefixes=[e["guidance/num_prefixes"] for e in guidance[:2]])
    report.update(common.check_rollouts(recorder.rollouts, config.max_completion_length, config.min_guide_tokens, 2))
    # TRL's colocate engine is built without a dtype, and vLLM's "auto" turns a float32 checkpoint into bfloat16: the
    # sampling log-probs carry bfloat16 rounding against the fp32 trainer.
    report.update(common.check_scored(recorder.scored, recorder.rollouts, BF16_TOLERANCE, config.min_guide_tokens))
    # Step 2 samples after one optimizer step. Its log-probs match the updated trainer (checked above) and not the
    # initial weights: the sync reached the engine (with stale engine weights this is the other way round).
    second = recorder.scored[1]
    sampling, mask = second["sampling_per_token_logps"], second["completion_mask"]
    stale = common.masked_mean_abs(common.completion_logprobs(initial, second)[0], sampling, mask)
    synced = common.masked_mean_abs(second["old_per_token_logps"], sampling, mask)
    report.update(step2_synced_logp_diff=synced, step2_stale_logp_diff=stale)
    common.check(stale > 3 * synced, f"step 2 sampled from stale weights? synced {synced:.3f}, stale {stale:.3f}")
    common.check(syncs == [0, 1], f"weight syncs at steps {syncs}, expected one per step: [0, 1]")
    report["syncs"] = syncs
    low_prob = same_low_prob_mask_as_the_trainer_forward(
        recorder.scored, recorder.rollouts, focused, config.loss_prob_threshold
    )
    report.update(low_prob)
    return report


def record_focus(trainer: Any) -> list[Any]:
    """Keep the trained-token mask (`completion_mask * tool_mask`) of every batch the guided loss focus returns."""
    masks: list[Any] = []
    focus = trainer._focus_loss

    def recorded(output, segments, *rest):
        output = focus(output, segments, *rest)
        masks.append((output["completion_mask"] * output["tool_mask"]).bool())
        return output

    trainer._focus_loss = recorded
    return masks


def same_low_prob_mask_as_the_trainer_forward(
    scored: list[dict], rollouts: list[dict], masks: list[Any], threshold: float
) -> dict[str, Any]:
    """The low_prob mask reads the trainer's own forward of the sampling weights (TRL's `old_per_token_logps`, one
    decision per shared prefix token), not vLLM's sampling log-probs: the tokens the transformers backend would train.
    """
    import torch

    from trl_guided.guidance import low_prob_mask, prefix_source_rows, share_prefix

    common.check(len(masks) == len(scored), f"{len(masks)} focused batches for {len(scored)} scored ones")
    differ_from_vllm = 0
    for batch, rollout, mask in zip(scored, rollouts, masks, strict=True):
        live = batch["completion_mask"].bool()
        prefix = torch.tensor(rollout["segments"].prefix)
        sources = prefix_source_rows(batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], live, prefix)
        expected = low_prob_mask(share_prefix(batch["old_per_token_logps"], sources, prefix), live, threshold)
        common.check(torch.equal(mask, expected), "the low_prob mask is not the trainer forward's")
        sampling = torch.nan_to_num(batch["sampling_per_token_logps"], nan=0.0)
        differ_from_vllm += int((expected != low_prob_mask(sampling, live, threshold)).sum())
    return dict(low_prob_tokens=int(sum(int(m.sum()) for m in masks)), low_prob_vllm_disagreements=differ_from_vllm)


if __name__ == "__main__":
    common.run(main)
