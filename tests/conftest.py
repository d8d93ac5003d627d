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
    """The vLLM tests run just before the unit tests.

    The test command builds .venv-vllm in the background while the suite runs, and a vLLM test waits for that build
    (scripts/setup_vllm_env.sh takes a lock): after the launch and distributed tests it has had minutes to finish, and
    the many short unit tests last let pytest-xdist's workers end together.
    """
    uses_vllm = {item.nodeid for item in items if "vllm_python" in getattr(item, "fixturenames", ())}
    vllm = [item for item in items if item.nodeid in uses_vllm]
    others = [item for item in items if item.nodeid not in uses_vllm]
    first_unit = next((i for i, item in enumerate(others) if item.nodeid.startswith("tests/unit/")), len(others))
    items[:] = others[:first_unit] + vllm + others[first_unit:]


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
