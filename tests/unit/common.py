"""Shared builders of the trainer tests: a tiny dataset, a reward, a GuidedGRPOConfig and a trainer; and, on the
embedded SmolLM2 (fixture `embedded` in conftest.py), a guided trainer, its scored batch and the loss gradients."""

from __future__ import annotations

import torch
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


# ---- the embedded SmolLM2-135M ----

EMBEDDED = "embedded:smollm2-135m-instruct"
PROMPT = [
    {"role": "system", "content": "You are a helpful assistant. Answer the user's request."},
    {"role": "user", "content": "Explain the history of paper."},
]
FIXED_ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5])


def reward_length(completions, **kwargs):
    return [-abs(120 - len(c[0]["content"])) / 120 for c in completions]


def guided_trainer(model_path, tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=G,
        num_generations=G,
        max_completion_length=32,
        prefix_min_tokens=6,
        prefix_max_tokens=16,
        min_guide_tokens=2,
        max_guide_tokens=6,
        guidance_loss_scope="guidance",
        beta=0.0,
        max_steps=1,
        report_to="none",
        save_strategy="no",
        seed=3,
        use_cpu=True,
        bf16=False,
    )
    values.update(overrides)
    data = Dataset.from_dict({"prompt": [PROMPT] * G})
    trainer = GuidedGRPOTrainer(model_path, reward_length, args=GuidedGRPOConfig(**values), train_dataset=data)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop outside train()
    return trainer


def scored_batch(trainer):
    """A real guided batch, and TRL's scored batch before the loss focus (every column, no trained-token mask)."""
    captured = {}
    focus = trainer._focus_loss

    def capture(output, segments, *rest):
        captured["raw"], captured["segments"] = dict(output), segments
        output["advantages"] = FIXED_ADVANTAGES.clone()  # equal rewards in a group would give no gradient at all
        return focus(output, segments, *rest)

    trainer._focus_loss = capture
    batch = trainer._generate_and_score_completions([{"prompt": PROMPT}] * G)
    trainer._focus_loss = focus
    raw = captured["raw"]
    raw["advantages"] = FIXED_ADVANTAGES.clone()
    return batch, raw, captured["segments"]


def hidden_and_embedding_grads(trainer, batch):
    """Gradient of the loss w.r.t. the final hidden states (one position feeds one next-token prediction, so this is
    each predicted token's own share) and w.r.t. the input embeddings, both (B, prompt + completion columns)."""
    model = trainer.model
    grads, handles = {}, []

    def keep(name):
        def hook(module, args, output):
            output.register_hook(lambda grad: grads.__setitem__(name, grad.detach().clone()))

        return hook

    handles.append(model.model.norm.register_forward_hook(keep("hidden")))
    handles.append(model.get_input_embeddings().register_forward_hook(keep("embedding")))
    model.zero_grad()
    try:
        trainer.compute_loss(model, batch).backward()
    finally:
        for handle in handles:
            handle.remove()
    return grads["hidden"].norm(dim=-1), grads["embedding"].norm(dim=-1)
