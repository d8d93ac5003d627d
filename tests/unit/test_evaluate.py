"""Evaluation: statistics on hand-computed cases, records -> metrics, comparisons, model folders, bad input, the
before/after evaluation of a training run (the vLLM backend: tests/distributed/test_eval_vllm.py)."""

from __future__ import annotations

import importlib.machinery
import json
import math
import os
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset

import trl_guided.evaluate as evaluate_module
from trl_guided import GuidedGRPOTrainer, cli
from trl_guided import sampler as sampler_module
from trl_guided.config import SAMPLER_FIELDS
from trl_guided.data import load_task
from trl_guided.evaluate import (
    EvalSettings,
    _cut,
    _stop_ids,
    evaluate,
    generate_guided,
    guided_config,
    prompt_token_ids,
    read_records,
    vllm_request_seed,
)
from trl_guided.locate import ModelError, load_model, locate_model
from trl_guided.stats import (
    EvalError,
    bootstrap_ci,
    compare,
    format_comparison,
    mcnemar_exact,
    metric_direction,
    metrics_from_records,
    paired_bootstrap_ci,
    pass_at_k,
    repetition,
    summary_line,
    wins_losses_ties,
)

ROOT = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------------ statistics


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0  # fewer wrong samples than k: a correct one is always drawn
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_bootstrap_intervals():
    assert bootstrap_ci([0.5] * 7) == (0.5, 0.5)
    half = [0.0] * 20 + [1.0] * 20
    low, high = bootstrap_ci(half, seed=3)
    assert (low, high) == bootstrap_ci(half, seed=3)  # seeded
    spread = [float(i % 7) ** 2 for i in range(40)]
    assert bootstrap_ci(spread, seed=3) != bootstrap_ci(spread, seed=4)
    # Normal approximation: 0.5 +- 1.96 * sqrt(0.25 / 40) = 0.5 +- 0.155.
    assert low == pytest.approx(0.345, abs=0.04) and high == pytest.approx(0.655, abs=0.04)
    before = [0.0, 1.0, 0.5, 0.25, 1.0]
    assert paired_bootstrap_ci(before, [b + 0.25 for b in before]) == pytest.approx((0.25, 0.25))
    assert all(math.isnan(x) for x in bootstrap_ci([]))


def test_mcnemar_and_wins_losses_ties():
    assert mcnemar_exact(1, 5) == pytest.approx(2 * 7 / 64)  # 2 * (C(6,0) + C(6,1)) / 2^6
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    assert wins_losses_ties([0, 1, 1, 0, 0.5], [1, 1, 0, 0, 1]) == (2, 1, 2)


def _record(pid, sample, reward, tokens=4, truncated=False, nll=None):
    return dict(
        problem_id=pid,
        sample=sample,
        prompt="p",
        completion="x" * tokens,
        rewards={"acc": reward},
        tokens=tokens,
        truncated=truncated,
        nll=nll,
        nll_tokens=tokens if nll is not None else 0,
    )


def test_metrics_from_records_hand_computed():
    records = [
        _record("a", 0, 1.0, tokens=2, nll=1.0),
        _record("a", 1, 0.0, tokens=4, truncated=True, nll=3.0),
        _record("a", 2, 1.0, tokens=6, nll=2.0),
        _record("b", 0, 0.0, tokens=8, nll=4.0),
        _record("b", 1, 0.0, tokens=8, truncated=True, nll=4.0),
        _record("b", 2, None, tokens=8, nll=4.0),  # unparseable gold: left out of the reward, not of the lengths
    ]
    result = metrics_from_records(records, ["acc"], num_samples=3, seed=0)
    metric = {name: entry["value"] for name, entry in result["metrics"].items()}
    assert metric["acc/mean"] == pytest.approx((2 / 3 + 0) / 2)
    assert metric["acc/pass@1"] == pytest.approx(1 / 3)
    # b has only 2 scored samples, fewer than K=3: pass@3 is over a alone.
    assert metric["acc/pass@3"] == 1.0 and result["metrics"]["acc/pass@3"]["problems"] == 1
    assert metric["acc/avg@3"] == pytest.approx(1 / 3)
    assert metric["completion_tokens"] == pytest.approx((4 + 8) / 2)
    assert metric["truncated"] == pytest.approx((1 / 3 + 1 / 3) / 2)
    assert metric["nll_per_token"] == pytest.approx((6 / 12 + 12 / 24) / 2)
    assert result["problems"]["a"]["acc/mean"] == pytest.approx(2 / 3)
    assert metric["repetition"] == 0.0  # every completion here is shorter than one 10-gram
    assert repetition("abababab", n=2) == pytest.approx(1 - 2 / 7) and repetition("abcdef", n=2) == 0.0
    assert repetition("1." * 20) == pytest.approx(1 - 2 / 31)  # 31 10-grams, 2 distinct


def _result(scores: dict[str, float], model="m", **settings) -> dict:
    base = dict(task="arithmetic", split="test", num_samples=1, temperature=0.0, reward_funcs=["acc"], batch_size=8)
    return {
        "settings": {**base, **settings},
        "model": {"name": model},
        "versions": {},
        "metrics": {"acc/mean": {"value": sum(scores.values()) / len(scores), "ci95": [0, 1], "problems": 1}},
        "problems": {pid: {"acc/mean": v} for pid, v in scores.items()},
    }


def test_comparisons_count_by_each_metrics_direction():
    """Truncation falling on 4 problems is 4 better (it read as "0 wins, 4 losses" before metrics knew their
    direction); a reward falling is worse; lengths have no better side."""
    before = _result({f"p{i}": 1.0 for i in range(6)})
    after = _result({f"p{i}": float(i >= 4) for i in range(6)})
    for result, values in ((before, [1.0] * 6), (after, [0.0] * 4 + [1.0] * 2)):
        for name in ("truncated", "nll_per_token", "repetition", "completion_tokens"):
            result["metrics"][name] = {"value": sum(values) / 6, "ci95": [0, 1], "problems": 6}
            for pid, value in zip(result["problems"], values, strict=True):
                result["problems"][pid][name] = value
    metrics = compare(before, after)["metrics"]
    for name in ("truncated", "nll_per_token", "repetition"):
        assert metric_direction(name) == "lower"
        assert {k: metrics[name][k] for k in ("better_when", "better", "worse", "ties")} == {
            "better_when": "lower",
            "better": 4,
            "worse": 0,
            "ties": 2,
        }
    assert (metrics["acc/mean"]["better"], metrics["acc/mean"]["worse"]) == (0, 4)
    tokens = metrics["completion_tokens"]
    assert tokens["better_when"] is None and (tokens["higher"], tokens["lower"], tokens["ties"]) == (0, 4, 2)
    assert "better" not in tokens
    table = format_comparison(compare(before, after))
    assert "4 better / 0 worse / 2 ties" in table and "0 higher / 4 lower / 2 ties" in table
    assert "0 better / 4 worse / 2 ties" in table  # the reward


def test_compare_hand_made_results(tmp_path):
    before = _result({f"p{i}": float(i < 2) for i in range(10)}, model="base")
    after = _result({f"p{i}": float(i < 7) for i in range(10)}, model="trained", batch_size=32)
    for name, data in (("before", before), ("after", after)):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    out = tmp_path / "comparison.json"
    assert (
        cli.main(
            ["eval", "--compare", str(tmp_path / "before.json"), str(tmp_path / "after.json"), "--output", str(out)]
        )
        == 0
    )
    entry = json.loads(out.read_text())["metrics"]["acc/mean"]
    assert (entry["before"], entry["after"], entry["diff"]) == pytest.approx((0.2, 0.7, 0.5))
    assert (entry["better_when"], entry["better"], entry["worse"], entry["ties"]) == ("higher", 5, 0, 5)
    assert entry["mcnemar_p"] == pytest.approx(2 / 32)
    assert 0 < entry["diff_ci95"][0] <= 0.5 <= entry["diff_ci95"][1] <= 1
    line = summary_line(compare(before, after))
    assert line.startswith("acc: 0.20 -> 0.70 (+0.50, 95% CI +") and line.endswith("5 better / 0 worse / 5 ties)")
    assert "McNemar" in format_comparison(compare(before, after))

    # Different problems or different settings: refused, unless forced (on the common problems).
    fewer = _result({f"p{i}": 1.0 for i in range(8)})
    hotter = _result({f"p{i}": 1.0 for i in range(10)}, temperature=1.0)
    for other, message in ((fewer, "different problems"), (hotter, r"different settings \(temperature")):
        with pytest.raises(EvalError, match=message):
            compare(before, other)
    assert compare(before, fewer, force=True)["problems"] == 8


# --------------------------------------------------------------------------------------------- with a tiny model


def _eval_argv(model: str, tmp_path: Path, name: str, *extra: str) -> list[str]:
    """A fast evaluation: 6 length prompts x 2 samples of 8 tokens, scored by the same tiny model."""
    return [
        "eval", "--model", model, "--task", "length", "--eval-size", "6", "--num-samples", "2", "--temperature",
        "1.0", "--max-new-tokens", "8", "--batch-size", "4", "--quality-model", model, "--no-progress",
        "--output", str(tmp_path / f"{name}.json"), "--records", str(tmp_path / f"{name}.jsonl"), *extra,
    ]  # fmt: skip


def test_tiny_eval_is_deterministic_and_recomputable_from_records(tiny_llama, tmp_path):
    assert cli.main(_eval_argv(tiny_llama, tmp_path, "one")) == 0
    assert cli.main(_eval_argv(tiny_llama, tmp_path, "two")) == 0
    one, two = (tmp_path / "one.json").read_text(), (tmp_path / "two.json").read_text()
    assert one == two
    assert (tmp_path / "one.jsonl").read_text() == (tmp_path / "two.jsonl").read_text()
    result = json.loads(one)
    records = read_records(tmp_path / "one.jsonl")
    assert len(records) == 12 and result["settings"]["problems"] == 6
    assert {"trl_guided", "torch", "transformers"} <= set(result["versions"])
    assert len(result["model"]["weights_sha256"]) == 64
    recomputed = metrics_from_records(records, ["smooth_length"], num_samples=2, seed=result["settings"]["seed"])
    assert recomputed == {"metrics": result["metrics"], "problems": result["problems"]}
    assert {"smooth_length/mean", "completion_tokens", "truncated", "nll_per_token"} <= set(result["metrics"])
    # --baseline: both evaluated the same way, then compared (the same model against itself: all ties).
    argv = _eval_argv(tiny_llama, tmp_path, "both")
    del argv[argv.index("--records") : argv.index("--records") + 2]
    assert cli.main([*argv, "--baseline", tiny_llama]) == 0
    both = json.loads((tmp_path / "both.json").read_text())
    assert both["after"]["metrics"] == result["metrics"] == both["before"]["metrics"]
    assert {e["diff"] for e in both["comparison"]["metrics"].values()} == {0.0}
    # Sampling is seeded: another seed samples other completions.
    assert cli.main(_eval_argv(tiny_llama, tmp_path, "three", "--seed", "1")) == 0
    assert read_records(tmp_path / "three.jsonl") != records


class FakeVLLM(types.ModuleType):
    """`vllm` for the eval backend's calls: records the engine's arguments, returns EOS-only completions."""

    def __init__(self):
        super().__init__("vllm")
        self.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
        self.engines = []
        fake = self

        class LLM:
            def __init__(self, **kwargs):
                fake.engines.append(kwargs)

            def generate(self, prompts, params, use_tqdm=False):
                sample = types.SimpleNamespace(token_ids=[], finish_reason="stop")
                return [types.SimpleNamespace(outputs=[sample] * p.n) for p in params]

            def collective_rpc(self, method, kwargs=None):
                fake.calls.append(("rpc", method if isinstance(method, str) else method.__name__, kwargs))

            def reset_prefix_cache(self):
                fake.calls.append(("reset_prefix_cache", None, None))

        self.calls = []
        self.LLM, self.SamplingParams = LLM, lambda **kwargs: types.SimpleNamespace(**kwargs)


@pytest.mark.parametrize("recipe, flag, expected", [({}, None, 0.3), ({"vllm_gpu_memory_utilization": 0.2}, None, 0.2),
                                                    ({"vllm_gpu_memory_utilization": 0.2}, "0.1", 0.1)])  # fmt: skip
def test_the_vllm_backend_takes_the_memory_share_from_the_flag_the_recipe_or_trl(
    tiny_llama, tmp_path, monkeypatch, recipe, flag, expected
):
    """vLLM's own default (0.92 of GPU memory, on CPU of RAM) fails on a machine where anything else runs."""
    fake = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"task": "length", **recipe}))
    argv = _eval_argv(tiny_llama, tmp_path, "vllm", "--config", str(tmp_path / "recipe.yaml"), "--backend", "vllm")
    argv += ["--vllm-gpu-memory-utilization", flag] if flag else []
    assert cli.main(argv) == 0
    assert [engine["gpu_memory_utilization"] for engine in fake.engines] == [expected]
    settings = json.loads((tmp_path / "vllm.json").read_text())["settings"]
    assert settings["backend"] == "vllm" and settings["vllm_gpu_memory_utilization"] == expected
    with pytest.raises(SystemExit, match=r"must be in \(0, 1\] \(got 1.5\)"):
        cli.main([*argv, "--vllm-gpu-memory-utilization", "1.5"])
    assert len(fake.engines) == 1  # refused before an engine starts


def test_a_kept_vllm_engine_serves_every_model_of_its_architecture_and_only_inside_the_block(tmp_path, monkeypatch):
    """Inside `kept_vllm_engine()` a second model of the same architecture is loaded into the running engine (vLLM's
    reload, then the CPU LM head packed again, then the prefix cache emptied); another architecture gets a new
    engine; outside the block every evaluation starts its own."""
    from trl_guided.tiny_models import build_tiny_model
    from trl_guided.vllm_engine import kept_vllm_engine

    fake = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
    models = [build_tiny_model(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 1))]
    models.append(build_tiny_model(tmp_path / "wide", hidden_size=64))

    def evaluate(model: str) -> None:
        argv = _eval_argv(model, tmp_path, "out", "--backend", "vllm", "--quality-model", "none")
        assert cli.main(argv) == 0

    with kept_vllm_engine():
        for model in [models[0], models[1], models[0], models[2]]:
            evaluate(model)
    assert [engine["model"] for engine in fake.engines] == [models[0], models[2]]
    reloads = [call for call in fake.calls if call[0] == "rpc" and call[1] == "reload_weights"]
    assert [call[2]["weights_path"] for call in reloads] == [models[1], models[0]]
    assert [call[1] for call in fake.calls[:3]] == ["reload_weights", "_repack_cpu_lm_head", None]
    # Room for another split's longer prompts: the kept engine's length is rounded up, within the model's positions.
    assert fake.engines[0]["max_model_len"] % 256 == 0 and fake.engines[0]["max_model_len"] <= 512

    # The block allowed vLLM to send our repack function to its workers; after it, vLLM's default is back.
    assert "VLLM_ALLOW_INSECURE_SERIALIZATION" not in os.environ
    evaluate(models[0])
    evaluate(models[1])
    assert [engine["model"] for engine in fake.engines[2:]] == models[:2]
    assert sum(call[1] == "reload_weights" for call in fake.calls) == 2  # none outside the block


def test_the_vllm_engine_runs_float32_on_cpu_auto_on_a_gpu_and_what_trl_guided_vllm_dtype_says(tmp_path, monkeypatch):
    """On CPU vLLM's `auto` would take a bf16 checkpoint's dtype (many times slower on a CPU without native bf16, and
    not what the transformers backend scores with): the engine runs float32 there; on a GPU `auto`; the environment
    variable overrides both."""
    from trl_guided.tiny_models import build_tiny_model
    from trl_guided.vllm_engine import engine_dtype

    fake = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.delenv("TRL_GUIDED_VLLM_DTYPE", raising=False)
    model = build_tiny_model(tmp_path / "model", seed=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(_eval_argv(model, tmp_path, "out", "--backend", "vllm", "--quality-model", "none")) == 0
    assert [engine["dtype"] for engine in fake.engines] == ["float32"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine_dtype() == "auto"
    monkeypatch.setenv("TRL_GUIDED_VLLM_DTYPE", "bfloat16")
    assert engine_dtype() == "bfloat16"


def _model_folder(path: Path, complete: bool = True) -> Path:
    """A folder the locator takes for a saved model (a config.json; weights are not read to locate it)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    if complete:
        (path / "trainer_state.json").write_text("{}")
    return path


def test_a_run_folder_means_its_final_model_else_its_newest_complete_checkpoint(tmp_path):
    """One locator for eval, chat, quality and report: a run folder's saved model, else its newest complete
    checkpoint-N holding a model (a half-written one is skipped), else one line saying what is missing and what to
    do."""
    run = tmp_path / "run"
    _model_folder(run / "checkpoint-2")
    _model_folder(run / "checkpoint-10")
    _model_folder(run / "checkpoint-12", complete=False)  # killed while saving
    (run / "checkpoint-11").mkdir()  # no model in it
    assert locate_model(str(run)).path == str(run / "checkpoint-10")  # numeric order, not text order
    (run / "config.json").write_text("{}")
    assert locate_model(str(run)).path == str(run)  # the final model wins
    empty_run = tmp_path / "empty_run"
    _model_folder(empty_run / "checkpoint-1", complete=False)
    for folder, message in (
        (empty_run, "training run folder without a saved model.*none complete with a model.*let the run save"),
        (tmp_path / "nothing", "holds no model: no config.json"),
    ):
        folder.mkdir(exist_ok=True)
        with pytest.raises(ModelError, match=message):
            locate_model(str(folder))
        with pytest.raises(SystemExit, match=message):
            cli.main(["chat", str(folder)])


def test_checkpoint_and_lora_adapter_folders_load(tiny_llama, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    shutil.copytree(tiny_llama, run / "checkpoint-3")
    (run / "trainer_state.json").write_text("{}")
    assert locate_model(str(run / "checkpoint-3")).kind == "folder"

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=4, target_modules="all-linear")
    )
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 1.0)  # a non-zero adapter, so that it changes the model
    model.save_pretrained(tmp_path / "adapter")
    adapter = locate_model(str(tmp_path / "adapter"))
    assert adapter.kind == "adapter" and adapter.base == tiny_llama

    settings = dict(task="length", reward_funcs=["smooth_length"], max_new_tokens=6, quality_model=None)
    results = {
        name: evaluate(model, EvalSettings(**settings, task_options={"eval_size": 3}), progress=False, log=lambda _: 0)
        for name, model in (
            ("base", tiny_llama),
            ("checkpoint", str(run / "checkpoint-3")),
            ("adapter", str(tmp_path / "adapter")),
        )
    }
    assert results["checkpoint"]["metrics"] == results["base"]["metrics"]
    assert results["adapter"]["model"]["kind"] == "adapter"
    assert results["adapter"]["metrics"]["smooth_length/mean"] != results["base"]["metrics"]["smooth_length/mean"]


def test_fluency_on_the_first_problems_only_is_the_full_evaluations_fluency_there(tiny_llama, tmp_path):
    """`quality_limit`: the quality model scores the samples of the first N problems (a forward pass over prompt and
    answer costs as much as generating them); those scores are the ones a full evaluation gives."""
    settings = dict(task="length", reward_funcs=["smooth_length"], max_new_tokens=6, quality_model=tiny_llama)
    settings.update(task_options={"eval_size": 5})
    full = evaluate(tiny_llama, EvalSettings(**settings), tmp_path / "full.jsonl", progress=False, log=lambda _: 0)
    part = EvalSettings(**settings, quality_limit=2)
    limited = evaluate(tiny_llama, part, tmp_path / "part.jsonl", progress=False, log=lambda _: 0)
    assert full["metrics"]["nll_per_token"]["problems"] == 5 and limited["metrics"]["nll_per_token"]["problems"] == 2
    scored = [r for r in read_records(tmp_path / "part.jsonl") if r["nll"] is not None]
    assert len(scored) == 2 and all(r["nll_tokens"] > 0 for r in scored)
    for problem, values in limited["problems"].items():
        if "nll_per_token" in values:
            # The same sums, in batches of another width (right-padded): equal up to the last bits.
            assert values["nll_per_token"] == pytest.approx(full["problems"][problem]["nll_per_token"], rel=1e-5)
    assert limited["metrics"]["smooth_length/mean"] == full["metrics"]["smooth_length/mean"]
    with pytest.raises(EvalError, match="--quality-limit must be at least 1"):
        evaluate(tiny_llama, EvalSettings(**settings, quality_limit=0), progress=False, log=lambda _: 0)
    # The command line's --quality-limit is the same setting; a bad value is refused before anything is generated.
    argv = _eval_argv(tiny_llama, tmp_path, "cli")
    assert cli.main([*argv, "--quality-limit", "2"]) == 0
    from_cli = json.loads((tmp_path / "cli.json").read_text())
    assert from_cli["settings"]["quality_limit"] == 2 and from_cli["metrics"]["nll_per_token"]["problems"] == 2
    with pytest.raises(SystemExit, match="--quality-limit must be at least 1"):
        cli.main([*argv, "--quality-limit", "0"])
    with pytest.raises(SystemExit, match="--quality-limit limits the quality model's"):  # it would have no effect
        cli.main([*argv, "--quality-limit", "2", "--quality-model", "none"])


def test_guided_sampling_uses_the_trainers_sampler(tiny_llama, tmp_path):
    """--sampling guided: the K samples of a problem branch from one shared prefix, cut at a recipe's punctuation."""
    recipe = dict(task="length", punctuation=list("etaoinshrdlu"), prefix_min_tokens=4, prefix_max_tokens=8)
    recipe.update(min_guide_tokens=1, max_guide_tokens=2)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    argv = _eval_argv(tiny_llama, tmp_path, "guided", "--config", str(tmp_path / "recipe.yaml"))
    argv[argv.index("--num-samples") + 1] = "4"
    argv[argv.index("--max-new-tokens") + 1] = "16"
    assert cli.main([*argv, "--sampling", "guided"]) == 0
    records = read_records(tmp_path / "guided.jsonl")
    shared = 0
    for start in range(0, len(records), 4):
        texts = [r["completion"] for r in records[start : start + 4]]
        assert len({r["problem_id"] for r in records[start : start + 4]}) == 1
        shared += len(os.path.commonprefix(texts)) >= 2 and len(set(texts)) > 1
    # A group whose drawn prefix holds no mark gets an empty one (plain sampling); most groups here get a prefix.
    assert shared >= 2, [r["completion"] for r in records]
    assert json.loads((tmp_path / "guided.json").read_text())["settings"]["guidance"]["prefix_max_tokens"] == 8


# A non-default value for every sampler field of GuidedGRPOConfig: K = 2 prefixes, entropy cut snapped to punctuation.
EVERY_SAMPLER_FIELD = dict(
    prefix_min_tokens=3,
    prefix_max_tokens=7,
    punctuation=list("etaoin"),
    branch_point="entropy",
    branch_min_prefix_tokens=2,
    branch_snap_to_punctuation=True,
    branch_snap_window=3,
    num_prefixes_per_group=2,
    min_guide_tokens=1,
    max_guide_tokens=3,
    prefix_eos_retries=1,
)


def test_the_sampler_fields_are_the_settings_the_sampler_reads():
    """A sampler setting missing from config.SAMPLER_FIELDS would be dropped by `eval --sampling guided`."""
    read = set(re.findall(r"settings\.([a-z_]+)", Path(sampler_module.__file__).read_text())) - {
        "max_completion_length"
    }
    assert set(SAMPLER_FIELDS) == read == set(EVERY_SAMPLER_FIELD)


def test_guided_eval_hands_every_sampler_field_of_a_recipe_to_the_sampler(tiny_llama, tmp_path, monkeypatch):
    seen = []
    original = sampler_module.GuidedSampler.__init__

    def spy(self, settings, *args, **kwargs):
        seen.append(settings)
        original(self, settings, *args, **kwargs)

    monkeypatch.setattr(sampler_module.GuidedSampler, "__init__", spy)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(dict(task="length", **EVERY_SAMPLER_FIELD)))
    argv = _eval_argv(tiny_llama, tmp_path, "guided", "--config", str(tmp_path / "recipe.yaml"), "--eval-size", "2")
    argv[argv.index("--num-samples") + 1] = "4"
    argv[argv.index("--max-new-tokens") + 1] = "16"
    assert cli.main([*argv, "--sampling", "guided"]) == 0
    assert seen and {name: getattr(seen[0], name) for name in SAMPLER_FIELDS} == EVERY_SAMPLER_FIELD
    assert json.loads((tmp_path / "guided.json").read_text())["settings"]["guidance"] == EVERY_SAMPLER_FIELD
    assert len(read_records(tmp_path / "guided.jsonl")) == 2 * 4


def test_guided_eval_samples_what_a_trainers_rollout_samples(tiny_llama, tmp_path):
    """Without a trainer, `--sampling guided` draws exactly the completions a GuidedGRPOTrainer's guided rollout (in
    eval mode, through TRL's transformers generation) draws from the same seed and settings."""
    settings = EvalSettings(
        task="length", num_samples=4, temperature=1.0, max_new_tokens=12, batch_size=8, seed=3,
        reward_funcs=["smooth_length"], guidance=dict(EVERY_SAMPLER_FIELD),
    )  # fmt: skip
    model, tokenizer = load_model(locate_model(tiny_llama))
    texts = ["Describe clocks.", "Name a river.", "Why is the sky blue?"]
    prompts = [prompt_token_ids(tokenizer, [{"role": "user", "content": text}]) for text in texts]
    sampled = generate_guided(model, tokenizer, prompts, settings, progress=False)

    model, tokenizer = load_model(locate_model(tiny_llama))
    config = guided_config(settings)
    config.output_dir = str(tmp_path)
    trainer = GuidedGRPOTrainer(
        model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=config,
        train_dataset=Dataset.from_dict({"prompt": ["unused"]}), processing_class=tokenizer,
    )  # fmt: skip
    trainer.model.eval()
    stop, expected = _stop_ids(model, tokenizer), []
    for start in range(0, len(prompts), 2):  # batch_size // num_samples prompts per rollout, as the evaluation
        repeated = [ids for ids in prompts[start : start + 2] for _ in range(4)]
        completions, _ = trainer._generate_single_turn(repeated, None, {}, 4)
        expected += [_cut(list(row), stop, settings.max_new_tokens, None) for row in completions]
    assert sampled == expected
    assert len({tuple(ids) for ids, _ in sampled}) > len(prompts)  # sampled, not one completion per prompt


def test_auto_backend_of_guided_sampling_is_transformers(monkeypatch):
    monkeypatch.setattr(evaluate_module.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(evaluate_module.torch.cuda, "is_available", lambda: True)
    assert evaluate_module.default_backend() == "vllm"  # a GPU with vLLM: plain sampling takes vLLM
    assert evaluate_module.default_backend("guided") == "transformers"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "{tiny}", "--task", "sudoku"], "unknown task 'sudoku'"),
        (
            ["--model", "{tiny}", "--task", "arithmetic", "--reward-funcs", "acuracy"],
            "Unknown reward function 'acuracy'",
        ),
        (["--model", "{tmp}/nowhere", "--task", "arithmetic"], "model '.*nowhere' not found"),
        (["--model", "{tmp}/run", "--task", "arithmetic"], "training run folder without a saved model"),
        (["--model", "{tiny}", "--task", "length", "--eval-size", "0"], "split of task 'length' is empty"),
        (["--model", "{tiny}", "--task", "arithmetic", "--limit", "0"], "--limit must be at least 1"),
        (["--model", "{tiny}", "--task", "arithmetic", "--num-samples", "4"], "identical samples"),
        (
            "--model {tiny} --task length --sampling guided --num-samples 2 --temperature 1 --backend vllm".split(),
            "--sampling guided samples with transformers",
        ),
        (["--compare", "{tmp}/a.json", "{tmp}/b.json"], "different problems"),
        (["--compare", "{tmp}/a.json", "{tmp}/missing.json"], "missing.json: no such file"),
    ],
    ids="task reward model run_folder empty_split limit_0 greedy_k guided_vllm compare compare_missing".split(),
)
def test_bad_input_is_one_line_nonzero_and_writes_nothing(tiny_llama, tmp_path, argv, message):
    (tmp_path / "run" / "checkpoint-1").mkdir(parents=True)
    (tmp_path / "a.json").write_text(json.dumps(_result({"p1": 1.0})))
    (tmp_path / "b.json").write_text(json.dumps(_result({"p2": 1.0})))
    argv = [a.format(tiny=tiny_llama, tmp=tmp_path) for a in argv]
    output = tmp_path / "out.json"
    with pytest.raises(SystemExit, match=message) as error:
        cli.main(["eval", *argv, "--output", str(output), "--quality-model", "none"])
    assert error.value.code not in (0, None) and "\n" not in str(error.value.code)
    assert not output.exists()


def test_generated_test_splits_are_disjoint_from_training_and_large_enough():
    train = load_task("arithmetic", "train", size=1000, terms=2, max_number=20)
    test = load_task("arithmetic", "test", size=200, terms=2, max_number=20)
    assert not set(train["expression"]) & set(test["expression"])
    assert len(test) == 200 and len(set(test["expression"])) == len(test)
    assert test["answer"][:5] == load_task("arithmetic", "test", size=5, terms=2, max_number=20)["answer"]
    small_train = load_task("arithmetic", "train", size=200, terms=2, max_number=9)
    small_test = load_task("arithmetic", "test", size=200, terms=2, max_number=9)
    assert not set(small_train["expression"]) & set(small_test["expression"]) and 20 < len(small_test) < 200
    countdown_train, countdown_test = (
        load_task("countdown", "train", size=300),
        load_task("countdown", "test", size=300),
    )
    key = lambda rows: {(tuple(sorted(n)), t) for n, t in zip(rows["nums"], rows["target"], strict=True)}  # noqa: E731
    assert not key(countdown_train) & key(countdown_test)


def test_eval_before_after_in_a_two_step_run(tiny_llama, tmp_path, capsys):
    recipe = yaml.safe_load((ROOT / "recipes" / "smollm2-135m-instruct" / "length_cpu.yaml").read_text())
    recipe.update(
        model_name_or_path=tiny_llama,
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        save_steps=2,
        max_completion_length=12,
        prefix_min_tokens=2,
        prefix_max_tokens=6,
        max_guide_tokens=4,
        log_completions=False,
        eval_before_after=True,
        heldout_limit=3,
        heldout_max_new_tokens=8,
    )
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert cli.main(["train", "--config", str(tmp_path / "recipe.yaml")]) == 0
    run = tmp_path / "run"
    before, after = (json.loads((run / f"eval_{w}.json").read_text()) for w in ("before", "after"))
    comparison = json.loads((run / "comparison.json").read_text())
    assert before["settings"]["problems"] == after["settings"]["problems"] == comparison["problems"] == 3
    assert before["model"]["path"] == tiny_llama and after["model"]["path"] == str(run)
    assert before["model"]["weights_sha256"] != after["model"]["weights_sha256"]
    summary = json.loads((run / "summary.json").read_text())
    assert (
        summary["eval"]["summary"].startswith("smooth_length: ") and "smooth_length/mean" in summary["eval"]["metrics"]
    )
    assert "Held-out evaluation (3 test problems): smooth_length: " in capsys.readouterr().out
    assert "<h2 id='evaluation'>Before / after evaluation</h2>" in (run / "report.html").read_text()  # written last


def test_before_after_numbers_go_to_the_wandb_run_summary(monkeypatch):
    import sys
    import types

    from trl_guided.train import _log_to_trackers

    run = types.SimpleNamespace(summary={})
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(run=run))
    before = _result({"p1": 0.0, "p2": 1.0})
    after = _result({"p1": 1.0, "p2": 1.0})
    _log_to_trackers(compare(before, after))
    assert run.summary == {"eval_before/acc/mean": 0.5, "eval_after/acc/mean": 1.0, "eval_diff/acc/mean": 0.5}


def test_vllm_requests_are_seeded_per_prompt_except_when_sampling_on_cpu():
    """vLLM's CPU worker refuses a seeded request at a temperature above 0: there the engine's seed seeds the run."""
    greedy, sampled = EvalSettings(task="length", seed=3), EvalSettings(task="length", seed=3, temperature=1.0)
    assert [vllm_request_seed(greedy, index, on_gpu=False) for index in (0, 1)] == [3_000_009, 3_000_010]
    assert [vllm_request_seed(sampled, index, on_gpu=True) for index in (0, 1)] == [3_000_009, 3_000_010]
    assert vllm_request_seed(sampled, 0, on_gpu=False) is None
