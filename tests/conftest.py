"""Offline CPU test kit: tiny locally built models and an autouse fixture that forces CPU and offline mode."""

from __future__ import annotations

import os

import pytest

# Set before transformers/datasets/huggingface_hub are imported by any test module.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Long tests first and short ones last, so that pytest-xdist's workers end together (scripts/test.sh).

    Long: the subprocess tests of tests/launch and tests/distributed, then the vLLM ones (the test command builds
    .venv-vllm in the background and they wait for it: later is better), then the unit tests marked slow.
    """

    def rank(item) -> int:
        if "vllm_python" in getattr(item, "fixturenames", ()):
            return 1
        if not item.nodeid.startswith("tests/unit/"):
            return 0
        return 2 if item.get_closest_marker("slow") else 3

    items.sort(key=rank)  # stable: the collection order within each rank


@pytest.fixture(autouse=True)
def force_cpu_offline(monkeypatch):
    """Every TrainingArguments (so every GRPOConfig) built in a test runs on CPU in fp32, with the Hub unreachable.

    GRPOConfig defaults to bf16=True, which needs a GPU unless `use_cpu` is set; fp32 keeps losses comparable exactly.
    """
    from transformers import TrainingArguments

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    original = TrainingArguments.__post_init__

    def post_init_on_cpu(self):
        self.use_cpu = True
        self.bf16 = False
        self.fp16 = False
        original(self)

    monkeypatch.setattr(TrainingArguments, "__post_init__", post_init_on_cpu)
    yield


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """Path of a 2-layer Llama with a locally trained BPE tokenizer and ChatML template (seed 0)."""
    from trl_guided.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> str:
    """Path of a 2-layer Qwen2 with the same tokenizer (seed 0)."""
    from trl_guided.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2", seed=0)


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model(request) -> str:
    """Both tiny architectures, one after the other."""
    return request.getfixturevalue(f"tiny_{request.param}")
