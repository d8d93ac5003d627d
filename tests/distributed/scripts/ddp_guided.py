"""Run by test_ddp.py under `accelerate launch --multi_gpu --num_processes 2` on CPU (plain DDP over gloo, no
DeepSpeed): 3 guided steps of a tiny model, the loss through the shared-prefix forward (OT is covered by the
ZeRO-3 run, and OT turns the shared-prefix forward off). Each rank writes `report-rank{N}.json` into the output folder
with what the test compares across ranks: the logged losses, the prompts this rank sampled for, and a checksum of
the parameters before and after training (DDP all-reduces the gradients, so the replicas must stay identical
although their data differ).
"""

import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

import trl_guided.trainer as trainer_module  # noqa: E402
from trl_guided import GuidedGRPOConfig, GuidedGRPOTrainer  # noqa: E402
from trl_guided.train import leave_process_group  # noqa: E402


def reward_len(completions, **kwargs):
    return [-abs(30 - len(c[0]["content"])) / 30 for c in completions]


def checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(model_path: str, output_dir: str) -> None:
    prompts = [[{"role": "user", "content": f"Count to {i}, then stop."}] for i in range(16)]
    args = GuidedGRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=16,
        max_steps=3,
        learning_rate=1e-3,  # large enough that three steps visibly move a tiny model
        logging_steps=1,
        report_to="none",
        save_strategy="steps",
        save_steps=3,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        punctuation=["e", "a", "o", "t", "s"],  # the tiny random model rarely samples real punctuation
        prefix_min_tokens=2,
        prefix_max_tokens=6,
        max_guide_tokens=4,
        seed=0,
    )
    trainer = GuidedGRPOTrainer(
        model=model_path, reward_funcs=reward_len, args=args, train_dataset=Dataset.from_dict({"prompt": prompts})
    )
    seen_prompts = []
    rollout = trainer._generate_single_turn

    def recording(prompt_ids, *rest, **kwargs):
        seen_prompts.append([list(map(int, ids)) for ids in prompt_ids])
        return rollout(prompt_ids, *rest, **kwargs)

    trainer._generate_single_turn = recording
    shared_forwards = []
    shared_prefix_logps = trainer_module.shared_prefix_logps

    def counting(*args, **kwargs):
        shared_forwards.append(1)
        return shared_prefix_logps(*args, **kwargs)

    trainer_module.shared_prefix_logps = counting
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = checksum(model)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    report = {
        "rank": trainer.accelerator.process_index,
        "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "wrapped": type(trainer.model_wrapped).__name__,
        "deepspeed": trainer.is_deepspeed_enabled,
        "losses": [e["loss"] for e in logs],
        "rewards": [e["reward"] for e in logs],
        "shared_prefix_forwards": len(shared_forwards),
        "guide_lengths": [e["guidance/guide_length"] for e in logs],
        "prompts_digest": hashlib.sha256(json.dumps(seen_prompts).encode()).hexdigest(),
        "checksum_before": before,
        "checksum_after": checksum(model),
        "steps": trainer.state.global_step,
    }
    # A file per rank: the two processes share stdout, where their lines can interleave.
    Path(output_dir, f"report-rank{report['rank']}.json").write_text(json.dumps(report))
    trainer.accelerator.wait_for_everyone()
    leave_process_group()  # as `trl-guided train` does: a rank may otherwise abort at exit


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
