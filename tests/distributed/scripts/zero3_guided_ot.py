"""Run by test_zero3.py under `accelerate launch` (2 CPU processes, ZeRO-3): 3 guided steps with OT on, branching at
the highest-entropy token (one scoring forward per rollout inside its gather) into K = 2 prefixes per group, training
the `low_prob` scope (its sampling-time forward runs on the sharded model) under TRL's high-entropy mask (its quantile
gathers entropies from both processes).

Each rank writes `report-rank{N}.json` into the output folder. Besides the losses it counts the ZeRO-3 parameter
gathers made during each rollout (`_generate_single_turn`): TRL's `_unwrap_model_for_generation` enters
`deepspeed.zero.GatheredParameters` once per generate call, so a guided rollout (three phases) should gather once,
not three times.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import deepspeed  # noqa: E402
from datasets import Dataset  # noqa: E402

from trl_guided import GuidedGRPOConfig, GuidedGRPOTrainer  # noqa: E402


def reward_len(completions, **kwargs):
    return [-abs(30 - len(c[0]["content"])) / 30 for c in completions]


class CountingGather(deepspeed.zero.GatheredParameters):
    """`deepspeed.zero.GatheredParameters` that counts how often it is entered (looked up at call time by TRL)."""

    entered = 0

    def __enter__(self):
        CountingGather.entered += 1
        return super().__enter__()


def count_gathers_per_rollout(trainer) -> list[int]:
    """Wrap the trainer's `_generate_single_turn` (the whole guided rollout) and record the gathers made inside it."""
    counts = []
    rollout = trainer._generate_single_turn

    def counted(*args, **kwargs):
        before = CountingGather.entered
        result = rollout(*args, **kwargs)
        counts.append(CountingGather.entered - before)
        return result

    trainer._generate_single_turn = counted
    return counts


def main(model_path: str, output_dir: str) -> None:
    deepspeed.zero.GatheredParameters = CountingGather
    prompts = [[{"role": "user", "content": f"Count to {i}, then stop."}] for i in range(16)]
    args = GuidedGRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=24,
        max_steps=3,
        logging_steps=1,
        report_to="none",
        save_strategy="steps",
        save_steps=3,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        punctuation=["e", "a", "o", "t", "s"],  # the tiny random model rarely samples real punctuation
        prefix_min_tokens=4,
        prefix_max_tokens=10,
        max_guide_tokens=4,
        ot_coef=0.5,
        ot_window=4,
        ot_epsilon=0.5,
        ot_iterations=20,
        branch_point="entropy",
        num_prefixes_per_group=2,
        tree_advantage="group+branch",
        prefix_advantage_weight=0.5,
        guidance_loss_scope="low_prob",
        loss_prob_threshold=0.05,  # the tiny random model is unsure of nearly every token
        top_entropy_quantile=0.5,
    )
    trainer = GuidedGRPOTrainer(
        model=model_path, reward_funcs=reward_len, args=args, train_dataset=Dataset.from_dict({"prompt": prompts})
    )
    sharded = all(p.numel() == 0 and hasattr(p, "ds_id") for p in trainer.model.parameters())
    gathers = count_gathers_per_rollout(trainer)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    report = {
        "rank": trainer.accelerator.process_index,
        "deepspeed": trainer.is_deepspeed_enabled,
        "sharded": sharded,
        "reference": type(trainer._ot.model).__name__,
        "losses": [e["loss"] for e in logs],
        "ot_costs": [e["ot/cost"] for e in logs],
        "guide_lengths": [e["guidance/guide_length"] for e in logs],
        "num_prefixes": [e["guidance/num_prefixes"] for e in logs],
        "branch_entropies": [e["guidance/branch_entropy"] for e in logs],
        "mean_entropies": [e["guidance/mean_entropy"] for e in logs],
        "gathers_per_rollout": gathers,
        "trained_fractions": [e["guidance/trained_fraction"] for e in logs],
        "trained_probs": [e["guidance/trained_prob"] for e in logs],
        "steps": trainer.state.global_step,
    }
    # A file per rank: the two processes share stdout, where their lines can interleave.
    Path(output_dir, f"report-rank{report['rank']}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
