"""Run by tests/test_zero3.py under `accelerate launch` (2 CPU processes, ZeRO-3): 3 guided steps with OT on."""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets import Dataset  # noqa: E402

from trl_guided import GuidedGRPOConfig, GuidedGRPOTrainer  # noqa: E402


def reward_len(completions, **kwargs):
    return [-abs(30 - len(c[0]["content"])) / 30 for c in completions]


def main(model_path: str, output_dir: str) -> None:
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
    )
    trainer = GuidedGRPOTrainer(
        model=model_path, reward_funcs=reward_len, args=args, train_dataset=Dataset.from_dict({"prompt": prompts})
    )
    sharded = all(p.numel() == 0 and hasattr(p, "ds_id") for p in trainer.model.parameters())
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    report = {
        "rank": trainer.accelerator.process_index,
        "deepspeed": trainer.is_deepspeed_enabled,
        "sharded": sharded,
        "reference": type(trainer._ot_ref_model).__name__,
        "losses": [e["loss"] for e in logs],
        "ot_costs": [e["ot/cost"] for e in logs],
        "steps": trainer.state.global_step,
    }
    print("REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
