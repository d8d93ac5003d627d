"""trl_guided.backends: token budgets, vLLM server collectives, colocate sleep mode, the shared prompt KV cache."""

from __future__ import annotations

import pytest
import torch
from trl import GRPOTrainer

from .common import G, trainer_for


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
    trainer._backend = trainer._sampler.backend = trainer._rollout_backend()  # wired with the engine, as TRL's is
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


@pytest.mark.parametrize("shared", [False, True], ids=["one_row_each", "shared_prefill"])
def test_rows_stop_at_their_own_budget_with_the_same_tokens(tiny_model, tmp_path, shared):
    """`row_budgets` (the branches' budgets after their prefixes): the call ends once every row has its budget, and
    each row keeps the tokens it gets without the budgets (same random stream)."""
    trainer = trainer_for(tiny_model, tmp_path, temperature=1.0)
    prompts = [ids for ids in [[5, 6, 7, 8], [9, 10]] for _ in range(G)]
    budgets = [3] * G + [5] * G

    def run(row_budgets):
        forwards = []
        hook = trainer.model.register_forward_hook(lambda *args: forwards.append(1))
        torch.manual_seed(4)
        try:
            ids, _ = trainer._backend.generate(prompts, G, 9, shared_prompts=shared, row_budgets=row_budgets)
        finally:
            hook.remove()
        return ids, len(forwards)

    (plain, plain_forwards), (budgeted, budgeted_forwards) = run(None), run(budgets)
    assert [row[:budget] for row, budget in zip(budgeted, budgets, strict=True)] == [
        row[:budget] for row, budget in zip(plain, budgets, strict=True)
    ]
    assert budgeted_forwards == plain_forwards - 4  # 5 decode steps instead of 9 (no row ended before)
    assert all(len(row) == 9 for row in plain)
    assert "generate" not in vars(trainer.accelerator.unwrap_model(trainer.model))  # every patch is gone


def test_unguided_generation_prefills_each_prompt_once(tiny_model, tmp_path):
    """guidance=False on the transformers backend: TRL's own generate call, each group's prompt prefilled once."""
    trainer = trainer_for(tiny_model, tmp_path, guidance=False)
    prompts = [ids for ids in [[5, 6, 7, 8], [9, 10]] for _ in range(G)]
    forwards = []
    hook = trainer.model.register_forward_hook(
        lambda m, a, kw, out: forwards.append(kw["input_ids"].shape), with_kwargs=True
    )
    try:
        ids, _ = trainer._generate_single_turn(prompts, None, {}, G)
        trainer._generate_single_turn(prompts[:3], None, {}, G)  # not in runs of G: TRL's call as it is
    finally:
        hook.remove()
    assert len(ids) == 2 * G
    assert forwards[0] == (2, 3) and forwards[1] == (2 * G, 1)  # one row per group, then every row
    assert (3, 4) in forwards  # the unshared call prefills every row
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
