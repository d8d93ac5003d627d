"""`trl-guided eval --backend vllm` (vLLM's offline engine on CPU, in the vLLM venv) agrees with the transformers
backend on a greedy tiny case."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from trl_guided import cli

ROOT = Path(__file__).resolve().parents[2]

# A 0/1 score of the exact text: the sharpened tiny model writes 16 characters for most prompts, more for some.
LENGTH_REWARD = """
def over_16_chars(completions, **kwargs):
    return [float(len(c[0]["content"] if isinstance(c, list) else c) > 16) for c in completions]
"""


def backends_agree(python: Path, workdir: Path) -> tuple[dict, dict]:
    """Greedy on a sharpened tiny Llama (vLLM's CPU attention needs head size >= 32): transformers in this process,
    vLLM's offline engine in the vLLM venv (float32 there too); returns both results."""
    from .vllm_scripts._common import build_model

    model = build_model(workdir / "model")
    (workdir / "parity.py").write_text(LENGTH_REWARD)
    argv = ["eval", "--model", model, "--task", "length", "--eval-size", "8", "--max-new-tokens", "16"]
    argv += ["--reward-funcs", "parity.over_16_chars", "--quality-model", "none", "--no-progress"]
    subprocess.run(
        [str(python), "-m", "trl_guided.cli", *argv, "--backend", "vllm", "--output", str(workdir / "vllm.json")],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TRL_GUIDED_VLLM_DTYPE": "float32", "VLLM_CPU_KVCACHE_SPACE": "1"},
        check=True,
        timeout=900,
    )
    here = os.getcwd()
    os.chdir(workdir)  # the reward module is imported from the working directory, as with recipes
    try:
        assert cli.main([*argv, "--backend", "transformers", "--output", str(workdir / "transformers.json")]) == 0
    finally:
        os.chdir(here)
    return tuple(json.loads((workdir / f"{name}.json").read_text()) for name in ("transformers", "vllm"))


@pytest.mark.slow
def test_transformers_and_vllm_backends_agree_on_greedy(vllm_python, tmp_path):
    transformers_result, vllm_result = backends_agree(vllm_python, tmp_path)
    accuracy = "parity.over_16_chars/mean"
    assert transformers_result["metrics"][accuracy]["value"] == vllm_result["metrics"][accuracy]["value"]
    assert transformers_result["problems"] == vllm_result["problems"]  # per problem: same scores, same lengths
    assert vllm_result["settings"]["backend"] == "vllm" and "vllm" in vllm_result["versions"]
