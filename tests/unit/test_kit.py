"""The offline test kit itself: tiny models are deterministic, chat-ready, and train with plain TRL GRPO."""

from __future__ import annotations

import os

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments
from trl import GRPOConfig, GRPOTrainer

from trl_guided.tiny_models import build_tiny_model

from ..conftest import pytest_collection_modifyitems


def test_tiny_models_are_deterministic_by_seed(tmp_path):
    a = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "a", seed=3))
    b = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "b", seed=3))
    c = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "c", seed=4))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not all(
        torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values(), strict=True)
    )
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "a").get_vocab()
        == AutoTokenizer.from_pretrained(tmp_path / "c").get_vocab()
    )


def test_tiny_model_has_chatml_template_and_both_architectures(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.num_hidden_layers == 2
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi, there."}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nHi, there.<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == text  # special tokens are single, lossless tokens
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5 or tokenizer.eos_token_id in out[0, ids.shape[1] :].tolist()


def test_autouse_fixture_forces_cpu_and_offline(tmp_path):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    args = TrainingArguments(output_dir=str(tmp_path))
    assert args.use_cpu and not args.bf16
    assert GRPOConfig(output_dir=str(tmp_path)).use_cpu


def test_plain_trl_grpo_runs_two_steps(tiny_llama, tmp_path):
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Count to {i}."}] for i in range(8)]})

    def reward_len(completions, **kwargs):
        return [-abs(20 - len(c[0]["content"])) / 20 for c in completions]

    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
    )
    trainer = GRPOTrainer(model=tiny_llama, reward_funcs=reward_len, args=args, train_dataset=dataset)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 2 and len(logs) == 2
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert changed, "two GRPO steps left every parameter unchanged"


class FakeItem:
    def __init__(self, nodeid: str, fixturenames=(), slow: bool = False):
        self.nodeid, self.fixturenames, self.slow = nodeid, fixturenames, slow

    def get_closest_marker(self, name):
        return object() if name == "slow" and self.slow else None


def test_the_suite_runs_long_tests_first_and_the_vllm_tests_after_the_other_subprocess_tests():
    """tests/conftest.py's order, which lets the test command's xdist workers end together and gives the background
    vLLM build time: tests/launch + tests/distributed, then the vLLM tests, then slow unit tests, then the rest."""
    collected = [
        FakeItem("tests/distributed/test_ddp.py::a"),
        FakeItem("tests/distributed/test_vllm.py::b", fixturenames=("tmp_path", "vllm_python")),
        FakeItem("tests/launch/test_train.py::c"),
        FakeItem("tests/unit/test_ot.py::d"),
        FakeItem("tests/unit/test_quality.py::e", slow=True),
        FakeItem("tests/unit/test_ot.py::f"),
        FakeItem("tests/launch/test_slurm.py::g"),
    ]
    items = list(collected)
    pytest_collection_modifyitems(None, items)
    assert [item.nodeid[-1] for item in items] == ["a", "c", "g", "b", "e", "d", "f"]
