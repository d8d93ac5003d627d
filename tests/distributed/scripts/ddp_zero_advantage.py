"""Run by test_ddp.py under `accelerate launch --multi_gpu --num_processes 2` on CPU (DDP over gloo), and by
test_zero3.py under the 2-process ZeRO-3 config (DeepSpeed over gloo, parameters sharded): rank 1's
reward is one constant, so every row it holds has advantage 0 (rank 0's for half its groups) and the zero-advantage
saving leaves its micro-batches with no training row. The same 2 steps train twice in these processes, savings on
then off (plain SGD), from the same model; each rank writes `report-rank{N}.json`: its training rows and the rows it
ran per micro-batch, the largest weight difference between the two runs, and a checksum of the final weights (DDP
keeps the replicas identical).
"""

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from trl_guided import GuidedGRPOConfig, GuidedGRPOTrainer  # noqa: E402
from trl_guided.step_savings import training_rows  # noqa: E402
from trl_guided.train import leave_process_group  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))


def reward(completions, prompts, **kwargs):
    """Rank 1: one constant. Rank 0: constant for the groups of even prompts, a length reward for odd ones."""
    rewards = []
    for prompt, completion in zip(prompts, completions, strict=True):
        even = int(prompt[-1]["content"].split()[2].rstrip(",")) % 2 == 0
        rewards.append(0.5 if RANK == 1 or even else -abs(30 - len(completion[0]["content"])) / 30)
    return rewards


def train(model_path: str, output_dir: str, savings: bool):
    torch.manual_seed(0)
    prompts = [[{"role": "user", "content": f"Count to {i}, then stop."}] for i in range(16)]
    args = GuidedGRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_generations=4,
        max_completion_length=16,
        max_steps=2,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        punctuation=["e", "a", "o", "t", "s"],
        prefix_min_tokens=2,
        prefix_max_tokens=6,
        max_guide_tokens=4,
        seed=0,
        skip_zero_advantage_rows=savings,
        trim_loss_padding=savings,
        group_micro_batches=savings,
    )
    trainer = GuidedGRPOTrainer(
        model=model_path, reward_funcs=reward, args=args, train_dataset=Dataset.from_dict({"prompt": prompts})
    )
    rows = []  # per micro-batch: (training rows, rows that ran)
    micro_batch = trainer._savings.micro_batch

    def recording(inputs):
        kept, scale, share = micro_batch(inputs)
        rows.append((int(training_rows(inputs).sum()), kept["advantages"].size(0)))
        return kept, scale, share

    trainer._savings.micro_batch = recording
    trainer.train()
    parameters = dict(trainer.accelerator.unwrap_model(trainer.model).named_parameters())
    with gathered(trainer, list(parameters.values())):
        return {name: p.detach().clone() for name, p in parameters.items()}, rows


def gathered(trainer, parameters):
    """The full parameters while inside (ZeRO-3 keeps each process's shard only)."""
    if not trainer.is_deepspeed_enabled:
        return contextlib.nullcontext()
    import deepspeed  # noqa: PLC0415 - installed with the deepspeed extra; only the ZeRO-3 launch needs it

    return deepspeed.zero.GatheredParameters(parameters)


def main(model_path: str, output_dir: str) -> None:
    with_savings, rows = train(model_path, output_dir, True)
    without, _ = train(model_path, output_dir, False)
    digest = hashlib.sha256()
    for name in sorted(with_savings):
        digest.update(with_savings[name].numpy().tobytes())
    report = {
        "rank": RANK,
        "num_processes": int(os.environ.get("WORLD_SIZE", "1")),
        "rows": rows,
        "max_difference": max(float((with_savings[n] - without[n]).abs().max()) for n in with_savings),
        "checksum": digest.hexdigest(),
    }
    Path(output_dir, f"report-rank{RANK}.json").write_text(json.dumps(report))
    leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
