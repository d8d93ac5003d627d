"""`trl-guided eval --backend vllm` (vLLM's offline engine on CPU, in the vLLM venv) agrees with the transformers
backend on a greedy tiny case, also when a kept engine answers for a second model (`kept_vllm_engine`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from trl_guided import cli
from trl_guided.evaluate import read_records

from .test_vllm import run_script

ROOT = Path(__file__).resolve().parents[2]

# A 0/1 score of the exact text: the sharpened tiny model writes 16 characters for most prompts, more for some.
LENGTH_REWARD = """
def over_16_chars(completions, **kwargs):
    return [float(len(c[0]["content"] if isinstance(c, list) else c) > 16) for c in completions]
"""


def backends_agree(python: Path, workdir: Path) -> tuple[list[dict], list[dict], dict]:
    """Greedy on two sharpened tiny Llamas of one architecture (vLLM's CPU attention needs head size >= 32):
    transformers in this process; vLLM's offline engine in the vLLM venv (float32 there too), both models in one
    process inside `kept_vllm_engine()`, so the second is answered by the first one's engine with its weights
    reloaded. Returns the transformers results, the vLLM results (model order) and the vLLM script's report."""
    # Imported here: the harness module sets the vLLM harness's environment (offline, KV cache size) on import,
    # which the rest of the suite collected in this process must not inherit.
    from .vllm_scripts._common import build_model

    # Tied output layers (as SmolLM2's): vLLM's reload then leaves the CPU LM head's packed copy stale unless it is
    # packed again (`_repack_cpu_lm_head`); with untied ones the reload itself packs it.
    models = [build_model(workdir / "model-a", seed=0, tied=True), build_model(workdir / "model-b", seed=1, tied=True)]
    (workdir / "parity.py").write_text(LENGTH_REWARD)
    argv = ["eval", "--task", "length", "--eval-size", "8", "--max-new-tokens", "16"]
    argv += ["--reward-funcs", "parity.over_16_chars", "--quality-model", "none", "--no-progress"]
    runs = [[*argv, "--model", model] for model in models]

    def output(index: int, kind: str) -> list[str]:
        return ["--output", str(workdir / f"{index}-{kind}.json"), "--records", str(workdir / f"{index}-{kind}.jsonl")]

    vllm_runs = [[*run, *output(index, "vllm"), "--backend", "vllm"] for index, run in enumerate(runs)]
    report = run_script(python, "eval_kept_engine", workdir, json.dumps(vllm_runs))
    here = os.getcwd()
    os.chdir(workdir)  # the reward module is imported from the working directory, as with recipes
    try:
        for index, run in enumerate(runs):
            assert cli.main([*run, *output(index, "transformers"), "--backend", "transformers"]) == 0
    finally:
        os.chdir(here)
    results = {}
    for kind in ("transformers", "vllm"):
        for index in range(len(models)):
            result = json.loads((workdir / f"{index}-{kind}.json").read_text())
            result["completions"] = [r["completion"] for r in read_records(workdir / f"{index}-{kind}.jsonl")]
            results.setdefault(kind, []).append(result)
    return results["transformers"], results["vllm"], report


@pytest.mark.slow
def test_transformers_and_vllm_backends_agree_on_greedy_also_with_a_kept_engine(vllm_python, tmp_path):
    transformers_results, vllm_results, report = backends_agree(vllm_python, tmp_path)
    assert report["engines"] == [str(tmp_path / "model-a")]  # the second model reused the first one's engine
    accuracy = "parity.over_16_chars/mean"
    for transformers_result, vllm_result in zip(transformers_results, vllm_results, strict=True):
        assert transformers_result["metrics"][accuracy]["value"] == vllm_result["metrics"][accuracy]["value"]
        assert transformers_result["problems"] == vllm_result["problems"]  # per problem: same scores, same lengths
        assert transformers_result["completions"] == vllm_result["completions"]  # the same texts
        assert vllm_result["settings"]["backend"] == "vllm" and "vllm" in vllm_result["versions"]
    # The two models answer differently, so the reloaded engine did not answer with the first model's weights.
    assert transformers_results[0]["completions"] != transformers_results[1]["completions"]
