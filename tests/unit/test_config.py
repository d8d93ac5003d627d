"""GuidedGRPOConfig validation: every bad combination is refused with a message that says what to change."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import trl_guided.config as config_module
from trl_guided import GuidedGRPOConfig, GuidedGRPOTrainer
from trl_guided.recipe import parse_args

from .common import config, reward_len

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(min_guide_tokens=5, max_guide_tokens=3), "min_guide_tokens=5 > max_guide_tokens=3"),
        (dict(prefix_min_tokens=9, prefix_max_tokens=4), "prefix_min_tokens=9"),
        (dict(prefix_max_tokens=20, max_guide_tokens=4), "leave room for a postfix"),
        (dict(guidance_loss_scope="prefix"), "guidance_loss_scope='prefix'"),
        (dict(branch_point="entropie"), "branch_point='entropie'"),
        (dict(branch_min_prefix_tokens=-1, branch_point="entropy"), "branch_min_prefix_tokens=-1"),
        (dict(branch_snap_to_punctuation=True), "branch_snap_to_punctuation applies to branch_point"),
        (dict(branch_point="random", branch_snap_window=0), "branch_snap_window=0"),
        (dict(num_prefixes_per_group=3), "num_prefixes_per_group=3 must be >= 1 and divide num_generations"),
        (dict(num_prefixes_per_group=0), "num_prefixes_per_group=0"),
        (dict(tree_advantage="local", num_prefixes_per_group=2), "tree_advantage='local' is unknown"),
        (dict(tree_advantage="branch"), "needs num_prefixes_per_group > 1"),
        (dict(prefix_advantage_weight=0.5), "prefix_advantage_weight > 0 needs num_prefixes_per_group > 1"),
        (
            dict(num_prefixes_per_group=2, tree_advantage="branch", multi_objective_aggregation="normalize_then_sum"),
            "need multi_objective_aggregation='sum_then_normalize'",
        ),
        (dict(guidance_loss_scope="low_prob", loss_prob_threshold=0.0), "loss_prob_threshold=0.0 must be in"),
        (dict(loss_prob_threshold=1.5), "loss_prob_threshold=1.5 must be in"),
        (
            dict(num_prefixes_per_group=2, tree_advantage="treerl", guidance_loss_scope="guidance"),
            "tree_advantage='treerl' weights the shared prefix tokens, which guidance_loss_scope='guidance'",
        ),
        (
            dict(
                num_prefixes_per_group=2,
                tree_advantage="treerl",
                guidance_loss_scope="completion",
                prefix_advantage_weight=0.5,
            ),
            "treerl' sets the prefix tokens' advantage itself",
        ),
        (dict(tree_advantage="treerl", guidance_loss_scope="completion"), "needs num_prefixes_per_group > 1"),
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


@pytest.mark.parametrize(
    "generation_kwargs",
    [{"num_beams": 2}, {"num_beams": 4, "length_penalty": 0.8}, {"length_penalty": 1.2}, {"num_return_sequences": 2}],
)
def test_beam_search_is_refused_with_guidance(tmp_path, generation_kwargs):
    """Beam search changes the rows a generate call returns (it crashed inside the shared-prefix cache before)."""
    with pytest.raises(ValueError, match=r"ask for beam search, which guided sampling does not support"):
        config(tmp_path, generation_kwargs=generation_kwargs)
    config(tmp_path, generation_kwargs=generation_kwargs, guidance=False)  # plain GRPO: TRL's business
    config(tmp_path, generation_kwargs={"num_beams": 1})


def test_tree_settings_are_accepted(tmp_path):
    args = config(tmp_path, num_prefixes_per_group=2, tree_advantage="group+branch", prefix_advantage_weight=0.5)
    assert args.num_prefixes_per_group == 2
    assert config(tmp_path, branch_point="entropy", branch_snap_to_punctuation=True).branch_snap_window == 8


# ------------------------------------------------------------------------------------ vLLM where it cannot train


@pytest.fixture
def without_gpu(monkeypatch):
    monkeypatch.setattr(config_module, "gpu_weight_semantics", lambda: False)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(vllm_mode="colocate"), "vllm_mode='colocate' cannot train on a machine without a GPU: vLLM's CPU"),
        (
            dict(vllm_mode="colocate", vllm_enable_sleep_mode=True),
            "without a GPU (vllm_enable_sleep_mode is GPU-only too):",
        ),
        (dict(vllm_mode="server"), "vllm_mode='server' needs a GPU in the training process: TRL pushes"),
    ],
)
def test_vllm_training_without_a_gpu_is_one_line_naming_the_transformers_backend(
    tmp_path, without_gpu, overrides, message
):
    refusal = config_module.vllm_training_refusal(config(tmp_path, use_vllm=True, **overrides))
    assert message in refusal and "\n" not in refusal
    assert "use_vllm: false" in refusal and "docs/distributed.md" in refusal
    assert config_module.vllm_training_refusal(config(tmp_path, use_vllm=False, **overrides)) is None


def test_vllm_on_a_gpu_machine_is_refused_only_when_not_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "gpu_weight_semantics", lambda: True)
    args = config(tmp_path, use_vllm=True, vllm_mode="server")
    find_spec = config_module.importlib.util.find_spec
    monkeypatch.setattr(config_module.importlib.util, "find_spec", lambda name: find_spec(name + "-missing"))
    refusal = config_module.vllm_training_refusal(args)
    assert refusal.startswith("use_vllm=True, but vllm is not installed") and 'pip install -e ".[vllm]"' in refusal
    monkeypatch.setattr(config_module.importlib.util, "find_spec", lambda name: object())
    assert config_module.vllm_training_refusal(args) is None


def test_the_trainer_refuses_vllm_without_a_gpu_before_loading_the_model(tmp_path, without_gpu):
    args = config(tmp_path, use_vllm=True, vllm_mode="colocate")
    unloadable = tmp_path / "unloadable-model"  # found by the model resolver, but loading it would fail
    unloadable.mkdir()
    (unloadable / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot train on a machine without a GPU"):  # not the loading error
        GuidedGRPOTrainer(model=str(unloadable), reward_funcs=reward_len, args=args)


@pytest.mark.parametrize("mode", ["server", "colocate"])
def test_a_vllm_recipe_without_a_gpu_is_refused_when_parsed(tmp_path, without_gpu, mode):
    recipe = ROOT / "recipes" / "smollm2-135m-instruct" / "instructions_cpu.yaml"
    argv = ["--config", str(recipe), "--output_dir", str(tmp_path), "--use_vllm", "true", "--vllm_mode", mode]
    with pytest.raises(SystemExit, match=f"vllm_mode='{mode}'"):
        parse_args(argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_train_with_vllm_colocate_on_cpu_exits_at_once_with_one_line(tmp_path):
    """A command that used to start the engine (about 2 minutes) and die at its first weight sync."""
    command = [sys.executable, "-m", "trl_guided.train"]
    command += ["--config", str(ROOT / "recipes" / "smollm2-135m-instruct" / "instructions_cpu.yaml")]
    command += ["--max_steps", "4", "--report_to", "none", "--save_strategy", "no", "--eval_before_after", "false"]
    command += ["--use_vllm", "true", "--vllm_mode", "colocate", "--output_dir", str(tmp_path / "run")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    seconds = time.monotonic() - started
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("use_vllm=True with vllm_mode='colocate' cannot train on a machine without a GPU")
    assert seconds < 60, f"the refusal took {seconds:.0f} s"
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ precision without a GPU


@pytest.mark.parametrize(
    "set_by_user, bf16_accelerator, use_cpu, expected",
    [
        ({}, False, False, False),  # nothing set, no GPU: float32 instead of TRL's bf16 refusal
        ({}, True, True, False),  # nothing set, training on CPU although a GPU is there
        ({}, True, False, None),  # nothing set, a GPU: TRL's default (bf16 unless fp16) decides
        ({"bf16": True}, False, False, True),  # asked for: kept, and transformers refuses it
        ({"fp16": True}, False, False, None),  # fp16 asked for: bf16 left to TRL (not fp16)
    ],
)
def test_precision_default_without_a_gpu(tmp_path, monkeypatch, set_by_user, bf16_accelerator, use_cpu, expected):
    """The test kit forces bf16=False on every config it builds, so the decision is called on its own here; the
    subprocess test below runs it end to end."""
    monkeypatch.setattr(config_module, "is_torch_bf16_gpu_available", lambda: bf16_accelerator)
    args = config(tmp_path)
    args.bf16, args.fp16, args.use_cpu = None, False, use_cpu
    for name, value in set_by_user.items():
        setattr(args, name, value)
    args._default_precision()
    assert args.bf16 is expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default is for machines without a GPU")
def test_a_config_without_precision_settings_builds_on_cpu_and_explicit_bf16_is_refused(tmp_path):
    """Outside the test kit (a subprocess): GuidedGRPOConfig(output_dir=...) builds in float32 on a CPU machine, while
    an explicit bf16=True still stops with transformers' error saying what to set."""
    script = (
        "import sys\nfrom trl_guided import GuidedGRPOConfig\n"
        "args = GuidedGRPOConfig(output_dir=sys.argv[1])\n"
        "print('default', args.bf16, args.fp16)\n"
        "try:\n    GuidedGRPOConfig(output_dir=sys.argv[1], bf16=True)\n"
        "except ValueError as error:\n    print('refused', error)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "default False False" in result.stdout
    assert "refused Your setup doesn't support bf16/gpu" in result.stdout
