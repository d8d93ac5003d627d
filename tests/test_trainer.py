"""GuidedGRPOTrainer on tiny fixture models: shared prefixes, trained-token sets, parity with GRPOTrainer."""

from __future__ import annotations

import inspect
import math

import pandas as pd
import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from trl_guided import GuidedGRPOConfig, GuidedGRPOTrainer
from trl_guided.guidance import loss_weights
from trl_guided.shared_prefix import shared_prefix_groups, shared_prefix_logps

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
    trainer = trainer_for(tiny_llama, tmp_path, guidance_loss_scope=scope, postfix_decay=0.7, beta=0.0)
    captured = {}
    focus = trainer._focus_loss

    def capture_focus(output, segments):
        captured["segments"], captured["width"] = segments, output["completion_ids"].size(1)
        return focus(output, segments)

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


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(min_guide_tokens=5, max_guide_tokens=3), "min_guide_tokens=5 > max_guide_tokens=3"),
        (dict(prefix_min_tokens=9, prefix_max_tokens=4), "prefix_min_tokens=9"),
        (dict(prefix_max_tokens=20, max_guide_tokens=4), "leave room for a postfix"),
        (dict(guidance_loss_scope="prefix"), "guidance_loss_scope='prefix'"),
        (dict(branch_point="entropy"), "branch_point='entropy'"),
        (dict(punctuation=[]), "punctuation"),
        (dict(postfix_decay=0.0, guidance_loss_scope="guidance_postfix"), "postfix_decay"),
    ],
)
def test_config_validation(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config(tmp_path, **overrides)


def test_groups_straddling_processes_are_refused(tmp_path, monkeypatch):
    # 2 processes x 2 rows: the global batch of 4 holds whole groups of 4, but each process holds half a group.
    monkeypatch.setattr(GuidedGRPOConfig, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="would straddle two processes"):
        config(tmp_path, per_device_train_batch_size=2, num_generations=4, steps_per_generation=1)
    assert config(tmp_path, per_device_train_batch_size=2, num_generations=4, steps_per_generation=2)


def test_default_prefix_range_leaves_room(tmp_path):
    args = GuidedGRPOConfig(output_dir=str(tmp_path), max_completion_length=256)
    assert args.prefix_max_tokens == (256 - 8) // 2 and 1 <= args.prefix_min_tokens <= args.prefix_max_tokens
    assert GuidedGRPOConfig(output_dir=str(tmp_path), guidance=False, min_guide_tokens=9).guidance is False


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


def test_plain_grpo_config_is_refused(tiny_llama, tmp_path):
    with pytest.raises(TypeError, match="GuidedGRPOConfig"):
        GuidedGRPOTrainer(model=tiny_llama, reward_funcs=reward_len, args=GRPOConfig(output_dir=str(tmp_path)))


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
    }
    for name, params in expected.items():
        method = getattr(GRPOTrainer, name, None)
        assert method is not None, f"trl {trl.__version__}: GRPOTrainer.{name} is gone"
        if params is not None:
            assert list(inspect.signature(method).parameters) == params, f"GRPOTrainer.{name} changed signature"
    init = list(inspect.signature(GRPOTrainer.__init__).parameters)
    assert init == list(inspect.signature(GuidedGRPOTrainer.__init__).parameters)
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    for key in ('"tool_mask"', '"advantages"', '"num_items_in_batch"', "self._generate("):
        assert key in source, f"GRPOTrainer._generate_and_score_completions no longer uses {key}"
    assert "advantages.dim() == 1" in inspect.getsource(GRPOTrainer._compute_loss), "(B, T) advantages unsupported"
    assert "self.generation_kwargs" in inspect.getsource(GRPOTrainer._generate_single_turn)
    from trl.generation.vllm_generation import VLLMGeneration

    assert "self.max_completion_length" in inspect.getsource(VLLMGeneration.generate)


def test_trl_private_attributes_the_rollout_backend_uses_exist(tiny_llama, tmp_path):
    """trl_guided/backends.py reads and sets private attributes of TRL 1.16; fail loudly when an upgrade moves one."""
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
    ):
        assert hasattr(trainer, name), f"GRPOTrainer no longer has .{name}"
    assert isinstance(trainer._dist.is_zero3, bool), "GRPOTrainer._dist.is_zero3 moved"
    assert hasattr(trainer.args, "ds3_gather_for_generation")
    vllm_source = inspect.getsource(VLLMGeneration)
    for name in ("_llm_weights_sleeping", "enable_sleep_mode", "def sync_weights", "generation_kwargs", "self.llm"):
        assert name in vllm_source, f"VLLMGeneration no longer has {name}"
    assert "_last_loaded_step" in inspect.getsource(GRPOTrainer), "GRPOTrainer no longer tracks _last_loaded_step"


def test_vllm_server_phases_send_equal_lists_and_one_budget(tiny_llama, tmp_path, monkeypatch):
    """In vLLM server mode each phase call is a collective: pad to the largest list, use the largest budget."""
    trainer = trainer_for(tiny_llama, tmp_path)
    calls = []

    def fake_backend(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        calls.append((len(prompt_ids), num_generations, self.generation_config.max_new_tokens))
        return [[7] * self.generation_config.max_new_tokens for _ in prompt_ids], [[-0.5] * 3 for _ in prompt_ids]

    other_rank = {"rows": 5, "budget": 30}

    def fake_gather(tensor):  # this process, plus another one with a longer list and a larger budget
        return torch.cat([tensor, torch.tensor([[other_rank["rows"], other_rank["budget"]]])])

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", fake_backend)
    monkeypatch.setattr(trainer._backend, "is_server_collective", lambda: True)
    monkeypatch.setattr(trainer.accelerator, "gather", fake_gather)
    ids, logps = trainer._backend.generate([[1, 2], [3]], 1, 4)
    assert calls == [(5, 1, 30)]  # padded to the other process's 5 rows and its budget of 30 tokens
    assert len(ids) == 2 and len(logps) == 2  # only this process's rows come back
    assert trainer.generation_config.max_new_tokens == trainer.max_completion_length  # budget restored
    other_rank["rows"] = 3
    ids, logps = trainer._backend.generate([], 1, 4)  # nothing here, but another process has rows: still call
    assert calls[-1] == (3, 1, 30) and ids == [] and logps == []
    other_rank.update(rows=0, budget=0)
    calls.clear()
    assert trainer._backend.generate([], 1, 0) == ([], None) and calls == []  # nobody has rows: nobody calls


def test_minimum_guidance_length_goes_through_the_backend(tiny_llama, tmp_path, monkeypatch):
    """Phase 2 holds EOS back for min_guide_tokens through generate's own parameter; phases 1 and 3 do not."""
    trainer = trainer_for(tiny_llama, tmp_path, min_guide_tokens=3, max_guide_tokens=4)
    seen = []
    backend = GRPOTrainer._generate_single_turn

    def spy(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        seen.append((num_generations, self.generation_config.min_new_tokens, self.generation_config.max_new_tokens))
        return backend(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images)

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", spy)
    trainer._generate_guided([ids for ids in [[5, 6, 7], [8, 9]] for _ in range(G)], G)
    guidance_calls = [call for call in seen if call[0] == G]
    assert len(guidance_calls) == 1 and guidance_calls[0][1] == 3
    assert all(call[1] is None for call in seen if call[0] != G)
    assert trainer.generation_config.min_new_tokens is None  # restored after the phase


class FakeSleepingEngine:
    """The sleep-mode protocol of trl 1.16's VLLMGeneration in colocate mode (weights dropped at sleep level 2)."""

    def __init__(self):
        self.mode, self.enable_sleep_mode, self._llm_weights_sleeping = "colocate", True, True
        self.max_completion_length, self.generation_kwargs = 16, {}
        self.events = []
        self.llm = self

    def wake_up(self, tags):
        self.events.append(f"wake:{','.join(tags)}")

    def sleep(self, level):
        self.events.append(f"sleep:{level}")

    def sync_weights(self):
        if self.enable_sleep_mode:
            self.wake_up(tags=["weights"])
            self._llm_weights_sleeping = False
        self.events.append("sync")

    def generate(self, prompts, images, num_generations, profiler=None):
        if self.enable_sleep_mode and self._llm_weights_sleeping:
            self.sync_weights()
        if self.enable_sleep_mode:
            self.wake_up(tags=["kv_cache"])
        self.events.append(f"generate:{self.generation_kwargs.get('min_tokens')}")
        completions = [[11 + i % 3] * self.max_completion_length for i in range(len(prompts))]
        logprobs = [[[-1.0]] * len(c) for c in completions]
        if self.enable_sleep_mode:
            self.sleep(level=2)
            self._llm_weights_sleeping = True
        return prompts, completions, logprobs, None


def test_colocate_sleep_mode_wakes_and_syncs_once_per_rollout(tiny_llama, tmp_path):
    trainer = trainer_for(tiny_llama, tmp_path, min_guide_tokens=2)
    engine = FakeSleepingEngine()
    trainer.use_vllm, trainer.vllm_mode, trainer.vllm_generation = True, "colocate", engine
    trainer._last_loaded_step = trainer.state.global_step  # TRL would sync here only when the step changed
    prompts = [ids for ids in [[5, 6, 7], [8, 9]] for _ in range(G)]
    completions, logprobs = trainer._generate_single_turn(prompts, None, {}, G)
    assert engine.events.count("sync") == 1 and engine.events[:2] == ["wake:weights", "sync"]
    assert engine.events.count("wake:kv_cache") == 1 and engine.events[-1] == "sleep:2"
    assert engine.events.count("sleep:2") == 1
    generates = [e for e in engine.events if e.startswith("generate")]
    assert generates == ["generate:None", "generate:2", "generate:None"]  # min_tokens only for the guidance
    assert engine.enable_sleep_mode and engine._llm_weights_sleeping and engine.generation_kwargs == {}
    assert [len(row) for row in logprobs] == [len(row) for row in completions]  # three phases' log-probs joined
    segments = trainer._segments
    for row, row_logps in enumerate(logprobs):
        start = segments.prefix[row]
        held = min(2, segments.guidance[row])  # sampled under min_tokens: not the policy's log-probs
        assert row_logps[start : start + held] == [None] * held
        assert None not in row_logps[:start] + row_logps[start + held :]
    engine.events.clear()
    trainer.state.global_step += 1  # next step: still exactly one sync, not one per phase
    trainer._generate_single_turn(prompts, None, {}, G)
    assert engine.events.count("sync") == 1 and engine.events.count("sleep:2") == 1


def test_shared_prefix_loss_forward_matches_the_plain_forward(tiny_model, tmp_path, monkeypatch):
    """Prefix Grouper: same log-probs, entropies and gradients as TRL's plain forward on a real guided batch."""
    import trl_guided.trainer as trainer_module

    trainer = trainer_for(tiny_model, tmp_path, guidance_loss_scope="completion")
    batch = trainer._generate_and_score_completions(group_batch(trainer))
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    width = batch["completion_ids"].size(1)
    calls = []
    monkeypatch.setattr(
        trainer_module, "shared_prefix_logps", lambda *a, **k: calls.append(1) or shared_prefix_logps(*a, **k)
    )

    def run(shared):
        trainer.args.shared_prefix_loss = shared
        trainer.model.zero_grad()
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, width, compute_entropy=True
        )
        weights = torch.linspace(-1, 1, logps.numel()).view_as(logps)
        ((logps + entropies) * weights * batch["completion_mask"]).sum().backward()
        grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
        return logps.detach(), entropies.detach(), grads

    plain = run(False)
    assert calls == []
    shared = run(True)
    assert calls == [1]
    mask = batch["completion_mask"].bool()
    torch.testing.assert_close(shared[0][mask], plain[0][mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[1][mask], plain[1][mask], rtol=1e-5, atol=1e-5)
    assert len(shared[2]) == len(plain[2])
    for got, want in zip(shared[2], plain[2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_shared_prefix_training_step_equals_plain_step(tiny_llama, tmp_path, monkeypatch):
    import trl_guided.trainer as trainer_module

    calls = []
    monkeypatch.setattr(
        trainer_module, "shared_prefix_logps", lambda *a, **k: calls.append(1) or shared_prefix_logps(*a, **k)
    )

    def one_step(shared, **overrides):
        torch.manual_seed(0)
        trainer = trainer_for(tiny_llama, tmp_path / str(shared), shared_prefix_loss=shared, max_steps=2, **overrides)
        trainer.train()
        return losses(trainer), [p.detach().clone() for p in trainer.model.parameters()]

    one_step(True, gradient_checkpointing=True)
    assert calls == []  # checkpointed layers drop the cache: the plain forward runs
    plain_losses, plain_params = one_step(False, gradient_checkpointing=False)
    assert calls == []
    shared_losses, shared_params = one_step(True, gradient_checkpointing=False)
    assert len(calls) == 2  # one loss forward per step
    assert shared_losses == pytest.approx(plain_losses, rel=1e-4, abs=1e-6)
    for got, want in zip(shared_params, plain_params, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_shared_prefix_groups_rows_by_prompt_and_common_prefix():
    ids = torch.tensor([[0, 5, 6, 7, 8, 9], [0, 5, 6, 7, 8, 1], [3, 4, 6, 7, 2, 2], [0, 5, 6, 1, 2, 3]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]])
    groups, singles = shared_prefix_groups(ids, mask, prompt_width=3)
    assert [(rows.tolist(), shared) for rows, shared in groups] == [([0, 1, 3], 3)]
    assert singles.tolist() == [2]
    ids[3, 3:5] = ids[0, 3:5]  # the third row now also shares the first two completion tokens
    mask[3] = mask[0]
    groups, _ = shared_prefix_groups(ids, mask, prompt_width=3)
    assert [(rows.tolist(), shared) for rows, shared in groups] == [([0, 1, 3], 5)]


def test_branches_start_from_one_prefill_per_group(tiny_model, tmp_path, monkeypatch):
    """transformers backend: a group's prompt + prefix is encoded once and its cache repeated for the G branches."""
    trainer = trainer_for(tiny_model, tmp_path, temperature=1.0)
    prompts = [ids for ids in [[5, 6, 7, 8], [9, 10]] for _ in range(G)]

    def run(shared):
        forwards = []
        hook = trainer.model.register_forward_hook(
            lambda m, a, kw, out: forwards.append(kw["input_ids"].shape), with_kwargs=True
        )
        torch.manual_seed(3)
        try:
            ids, _ = trainer._backend.generate(prompts, G, 6, shared_prompts=shared)
        finally:
            hook.remove()
        return ids, forwards

    plain_ids, plain_forwards = run(False)
    shared_ids, shared_forwards = run(True)
    assert shared_ids == plain_ids  # same samples from the same random stream: the cache is exact
    assert plain_forwards[0] == (2 * G, 4)  # without sharing: every row prefills the whole padded prompt
    assert shared_forwards[0] == (2, 3)  # one row per group, all but the last column
    assert shared_forwards[1] == (2 * G, 1)  # generate then starts at the last prompt column
    assert "generate" not in vars(trainer.accelerator.unwrap_model(trainer.model))  # the patch is gone


def test_guidance_and_postfix_split_one_sample_on_transformers(tiny_llama, tmp_path, monkeypatch):
    trainer = trainer_for(tiny_llama, tmp_path, max_completion_length=24)
    calls = []
    backend = GRPOTrainer._generate_single_turn

    def spy(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        calls.append((len(prompt_ids), num_generations, self.generation_config.max_new_tokens))
        return backend(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images)

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", spy)
    completions, _ = trainer._generate_guided([ids for ids in [[5, 6, 7], [8, 9]] for _ in range(G)], G)
    segments = trainer._segments
    branch_calls = [call for call in calls if call[1] == G]
    assert len(branch_calls) == 1 and len(calls) - len(branch_calls) >= 1  # prefix call(s), then one branch call
    assert branch_calls[0][2] == 24 - min(segments.prefix)  # the budget left after the shorter prefix
    for row, completion in enumerate(completions):
        assert len(completion) <= 24
        assert segments.prefix[row] + segments.guidance[row] + segments.postfix[row] == len(completion)
        assert segments.guidance[row] <= 4


def test_shared_prefix_finds_the_model_config_inside_wrappers(tiny_llama):
    """A DeepSpeedEngine wraps the model in `.module` and has a `.config` of its own (its JSON config, a dict)."""
    from transformers import AutoModelForCausalLM

    from trl_guided.shared_prefix import _config_of

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)

    class EngineLike(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.config = module, {"zero_optimization": {"stage": 3}}

    assert _config_of(EngineLike(model)) is model.config
    assert _config_of(model) is model.config
