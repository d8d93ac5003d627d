"""Shared builders of the trainer tests: a tiny dataset, a reward, a GuidedGRPOConfig and a trainer."""

from __future__ import annotations

from datasets import Dataset

from trl_guided import GuidedGRPOConfig, GuidedGRPOTrainer

# The tiny random models rarely sample real punctuation; frequent letters stand in as marks so prefixes get cut.
TEST_MARKS = ["e", "a", "o", "t", "s"]


G = 4


def dataset(n=8):
    return Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": f"Count to {i}, then stop."}] for i in range(n)]}
    )


def reward_len(completions, **kwargs):
    return [-abs(30 - len(c[0]["content"])) / 30 for c in completions]


def config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=G,
        num_generations=G,
        max_completion_length=24,
        max_steps=1,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        punctuation=TEST_MARKS,
        prefix_min_tokens=4,
        prefix_max_tokens=10,
        min_guide_tokens=2,
        max_guide_tokens=4,
    )
    values.update(overrides)
    return GuidedGRPOConfig(**values)


def trainer_for(model, tmp_path, reward=reward_len, **overrides):
    args = config(tmp_path, **overrides)
    return GuidedGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset())


def group_batch(trainer, start=0, groups=2):
    rows = dataset()[start : start + groups]["prompt"]
    return [{"prompt": prompt} for prompt in rows for _ in range(trainer.num_generations)]


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
