"""GuidedGRPOTrainer on tiny fixture models: shared prefixes, trained-token sets, parity with GRPOTrainer."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from trl import GRPOConfig, GRPOTrainer

from trl_guided import GuidedGRPOConfig, GuidedGRPOTrainer
from trl_guided.guidance import loss_weights

from .common import G, config, dataset, group_batch, losses, reward_len, trainer_for


def test_groups_share_their_prefix_and_branch(tiny_model, tmp_path):
    seen = []

    def record(completions, completion_ids, **kwargs):
        seen.append((completions, completion_ids, trainer._segments))
        return reward_len(completions)

    trainer = trainer_for(tiny_model, tmp_path, reward=record, max_steps=3)
    trainer.train()
    tokenizer = trainer.processing_class
    nonempty_prefixes, branching_groups = 0, 0
    for completions, completion_ids, segments in seen:
        assert len(segments) == len(completion_ids)
        for row, ids in enumerate(completion_ids):
            p, g, q = segments.prefix[row], segments.guidance[row], segments.postfix[row]
            assert p + g + q == len(ids) <= trainer.max_completion_length
            ended = ids[p + g - 1] in trainer.eos_token_ids
            assert 2 <= g <= 4 or (ended and g < 2)
            # Rewards see the whole completion: prefix + guidance + postfix.
            assert completions[row][0]["content"] == tokenizer.decode(ids, skip_special_tokens=True)
        for start in range(0, len(completion_ids), G):
            rows = range(start, start + G)
            prefixes = {tuple(completion_ids[r][: segments.prefix[r]]) for r in rows}
            assert len(prefixes) == 1, "rows of one group do not share their prefix"
            nonempty_prefixes += bool(next(iter(prefixes)))
            guides = {tuple(completion_ids[r][segments.prefix[r] : segments.guide_end_of(r)]) for r in rows}
            branching_groups += len(guides) > 1
    assert nonempty_prefixes > 0 and branching_groups > 0
    metrics = trainer.state.log_history[0]
    for name in ("prefix_length", "guide_length", "postfix_length", "trained_tokens", "empty_prefix_ratio"):
        assert f"guidance/{name}" in metrics
    assert "guidance/prefix_retries" in metrics


@pytest.mark.parametrize("scope", ["guidance", "guidance_postfix", "completion"])
def test_loss_gradient_reaches_only_the_trained_tokens(tiny_llama, tmp_path, scope):
    # Every row's gradient is inspected: the savings would leave rows with advantage 0 and trailing padding out.
    savings_off = dict(skip_zero_advantage_rows=False, trim_loss_padding=False)
    trainer = trainer_for(tiny_llama, tmp_path, guidance_loss_scope=scope, postfix_decay=0.7, beta=0.0, **savings_off)
    captured = {}
    focus = trainer._focus_loss

    def capture_focus(output, segments, *rest):
        captured["segments"], captured["width"] = segments, output["completion_ids"].size(1)
        return focus(output, segments, *rest)

    trainer._focus_loss = capture_focus
    trainer.model.train()
    inputs = trainer._generate_and_score_completions(group_batch(trainer))
    segments = captured["segments"]
    width = inputs["completion_ids"].size(1)
    if scope == "guidance":
        assert width == max(segments.guidance_end) < captured["width"], "columns after the guidance were kept"
    weights = loss_weights(segments, width, scope, 0.7)
    trained = inputs["completion_mask"] * inputs["tool_mask"]
    assert torch.equal(trained.bool(), (weights > 0) & inputs["completion_mask"].bool())

    logps = {}
    scorer = trainer._get_per_token_logps_and_entropies

    def keep_logps(*args, **kwargs):
        out = scorer(*args, **kwargs)
        out[0].retain_grad()
        logps["value"] = out[0]
        return out

    trainer._get_per_token_logps_and_entropies = keep_logps
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop outside train()
    trainer.compute_loss(trainer.model, inputs).backward()
    grad = logps["value"].grad
    assert torch.all(grad[~trained.bool()] == 0), "a token outside the trained set received gradient"
    # Fractional weights travel as (B, T) advantages: A[b] * w[b, t].
    token_advantages = inputs["advantages"]
    if scope == "guidance_postfix":
        assert token_advantages.dim() == 2
        row_advantages = token_advantages.sum(1, keepdim=True) / weights.sum(1, keepdim=True)
        torch.testing.assert_close(token_advantages, row_advantages * weights)
    else:
        token_advantages = token_advantages.unsqueeze(1) * trained
    # On-policy DAPO loss (TRL's default): d loss / d logp[b, t] = -A[b] * w[b, t] / (trained tokens in the batch).
    # The normalizer is `num_items_in_batch`, so this also checks it counts trained tokens, not completion tokens.
    assert trainer.loss_type == "dapo" and inputs["num_items_in_batch"] == trained.sum()
    expected = -token_advantages / trained.sum()
    torch.testing.assert_close(grad, expected * trained, rtol=1e-4, atol=1e-7)
    assert grad.abs().sum() > 0


def test_guidance_false_reproduces_grpo_trainer(tiny_llama, tmp_path):
    common = dict(
        per_device_train_batch_size=G,
        num_generations=G,
        max_completion_length=16,
        max_steps=3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=7,
    )
    plain = GRPOTrainer(
        model=tiny_llama,
        reward_funcs=reward_len,
        args=GRPOConfig(output_dir=str(tmp_path / "plain"), **common),
        train_dataset=dataset(),
    )
    plain.train()
    guided = GuidedGRPOTrainer(
        model=tiny_llama,
        reward_funcs=reward_len,
        args=GuidedGRPOConfig(output_dir=str(tmp_path / "guided"), guidance=False, **common),
        train_dataset=dataset(),
    )
    guided.train()
    assert losses(plain) == losses(guided) and len(losses(plain)) == 3
    rewards = lambda t: [e["reward"] for e in t.state.log_history if "reward" in e]  # noqa: E731
    assert rewards(plain) == rewards(guided)
    assert not any(k.startswith("guidance/") for e in guided.state.log_history for k in e)


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]


@pytest.mark.parametrize("scope", ["guidance", "guidance_postfix"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type(tiny_llama, tmp_path, loss_type, scope):
    trainer = trainer_for(tiny_llama, tmp_path, loss_type=loss_type, guidance_loss_scope=scope)
    trainer.train()
    assert math.isfinite(losses(trainer)[0])


@pytest.mark.parametrize(
    "overrides",
    [
        dict(beta=0.05),
        dict(num_iterations=2, max_steps=2),
        dict(gradient_accumulation_steps=2, max_steps=2),
        dict(mask_truncated_completions=True, max_completion_length=20),
        dict(importance_sampling_level="sequence"),
        dict(top_entropy_quantile=0.5),
    ],
    ids=["kl", "num_iterations", "grad_accum", "mask_truncated", "sequence_is", "entropy_mask"],
)
def test_trl_options_keep_working(tiny_qwen2, tmp_path, overrides):
    trainer = trainer_for(tiny_qwen2, tmp_path, **overrides)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert all(math.isfinite(x) for x in losses(trainer))
    if overrides.get("beta"):
        assert "kl" in trainer.state.log_history[0]
    if not overrides.get("mask_truncated_completions"):
        assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_lora(tiny_llama, tmp_path):
    from peft import LoraConfig

    args = config(tmp_path, max_steps=2, beta=0.05)
    trainer = GuidedGRPOTrainer(
        model=tiny_llama,
        reward_funcs=reward_len,
        args=args,
        train_dataset=dataset(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert lora and any(not torch.equal(lora[n], p) for n, p in trainer.model.named_parameters() if n in lora)
    assert all(math.isfinite(x) for x in losses(trainer))


@pytest.mark.parametrize("eval_guidance", [True, False])
def test_evaluation(tiny_llama, tmp_path, eval_guidance):
    args = config(
        tmp_path, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=G, eval_guidance=eval_guidance
    )
    trainer = GuidedGRPOTrainer(
        model=tiny_llama, reward_funcs=reward_len, args=args, train_dataset=dataset(), eval_dataset=dataset(4)
    )
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    assert ("eval_guidance/prefix_length" in metrics) == eval_guidance


def test_log_completions_adds_segment_columns(tiny_llama, tmp_path):
    trainer = trainer_for(tiny_llama, tmp_path, log_completions=True)
    trainer.train()
    table = pd.read_parquet(tmp_path / "completions" / "completions_00001.parquet")
    assert {"prefix", "guidance", "postfix"} <= set(table.columns)
    for row in table.itertuples():
        assert row.completion[0]["content"] == row.prefix + row.guidance + row.postfix


@pytest.mark.parametrize("owner", ["tools", "rollout_func", "environment_factory"])
def test_guidance_rejects_rollout_owners(tiny_llama, tmp_path, owner):
    def tool(x: int) -> int:
        """Echo.

        Args:
            x: a number
        """
        return x

    values = {"tools": [tool], "rollout_func": lambda prompts, trainer: {}, "environment_factory": object}
    with pytest.raises(ValueError, match=f"cannot be combined with {owner}"):
        GuidedGRPOTrainer(
            model=tiny_llama,
            reward_funcs=reward_len,
            args=config(tmp_path),
            train_dataset=dataset(),
            **{owner: values[owner]},
        )


def test_constructor_takes_grpo_trainers_parameters_by_position_and_keyword(tiny_llama, tmp_path):
    """The constructor binds GRPOTrainer's signature: its positions and keywords work, an unknown one is refused."""
    data = dataset()
    trainer = GuidedGRPOTrainer(tiny_llama, reward_len, config(tmp_path), data, None, None, None, [], (None, None))
    assert trainer.train_dataset is data and trainer.eval_dataset is None
    with pytest.raises(TypeError, match="train_datset"):
        GuidedGRPOTrainer(tiny_llama, reward_len, config(tmp_path), train_datset=data)


def test_plain_grpo_config_is_refused(tiny_llama, tmp_path):
    with pytest.raises(TypeError, match="GuidedGRPOConfig"):
        GuidedGRPOTrainer(model=tiny_llama, reward_funcs=reward_len, args=GRPOConfig(output_dir=str(tmp_path)))


@pytest.mark.parametrize(
    "generation_kwargs",
    [{"top_k": 5}, {"top_p": 0.9}, {"min_p": 0.05}, {"repetition_penalty": 1.3}, {"top_k": 20, "top_p": 0.8}],
    ids=["top_k", "top_p", "min_p", "repetition_penalty", "top_k_top_p"],
)
def test_sampling_generation_kwargs_train_with_guidance(tiny_llama, tmp_path, generation_kwargs):
    """The generation_kwargs of TRL's docs that guided sampling supports reach every phase and train."""
    trainer = trainer_for(tiny_llama, tmp_path, generation_kwargs=generation_kwargs)
    for key, value in generation_kwargs.items():
        assert getattr(trainer.generation_config, key) == value
    trainer.train()
    assert math.isfinite(losses(trainer)[0])
