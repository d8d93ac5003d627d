"""The training script, the recipes, the length task and its rewards, and the embedded CPU demo."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from trl_guided import cli
from trl_guided.data import load_task
from trl_guided.recipe import _check_recipe_types, make_parser, read_recipe, validate
from trl_guided.rewards import get_reward, length, smooth_length
from trl_guided.train import run, summarize

ROOT = Path(__file__).resolve().parents[2]
# Training recipes; recipes/accelerate/ holds accelerate launcher configs, not recipes.
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.relative_to(ROOT).parts)
DEMO = ROOT / "recipes" / "smollm2-135m-instruct" / "length_cpu.yaml"


def test_length_rewards_score_the_distance_to_the_target():
    as_chat = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    assert length([as_chat("x" * 150), "x" * 260], target=200) == [-50.0, -60.0]
    rewards = smooth_length(["x" * 300, "x" * 325, "x" * 339, as_chat("x" * 400)], target=300, tolerance=30)
    assert rewards[:2] == [0.0, 0.0]
    assert math.isclose(rewards[2], -0.05 * 3) and math.isclose(rewards[3], -0.05 * math.sqrt(70))
    bound = get_reward("smooth_length", target=10, tolerance=0)
    assert bound.__name__ == "smooth_length" and bound(["x" * 14]) == [-0.1]
    with pytest.raises(ValueError, match="Unknown reward function 'lenght'"):
        get_reward("lenght")


def test_length_task_ships_prompts_and_splits(tmp_path):
    train, test = load_task("length", "train"), load_task("length", "test")
    assert len(train) >= 32 and len(test) == 8
    assert {p[-1]["content"] for p in train["prompt"]}.isdisjoint(p[-1]["content"] for p in test["prompt"])
    assert train[0]["prompt"][0]["role"] == "system" and train[0]["prompt"][1]["role"] == "user"
    assert load_task("length", "train", system_prompt="Be brief.")[0]["prompt"][0]["content"] == "Be brief."
    own = tmp_path / "prompts.txt"
    own.write_text("# comment\nOne.\n\nTwo.\nThree.\n")
    assert [p[-1]["content"] for p in load_task("length", "train", dataset_path=str(own), eval_size=1)["prompt"]] == [
        "One.",
        "Two.",
    ]
    with pytest.raises(FileNotFoundError, match="dataset_path"):
        load_task("length", dataset_path=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="Unknown task"):
        load_task("sudoku")


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(r.relative_to(ROOT)) for r in RECIPES])
def test_every_recipe_parses_without_unknown_keys(recipe, tmp_path):
    _check_recipe_types(str(recipe), read_recipe(str(recipe)))
    task_args, training_args, model_args = make_parser().parse_args_and_config(
        args=["--config", str(recipe), "--output_dir", str(tmp_path)], fail_with_unknown_args=True
    )
    validate(task_args)  # the task, every reward and any data file resolve
    assert model_args.model_name_or_path and training_args.report_to is not None
    header = recipe.read_text().splitlines()[:6]
    assert any("Launch" in line or "launch" in line for line in header), "a recipe header gives its launch command"


def test_unknown_recipe_key_is_an_error_naming_the_file(tmp_path):
    recipe = yaml.safe_load(DEMO.read_text())
    recipe["num_generation"] = 4  # typo of num_generations
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit, match=r"bad\.yaml.*num_generation"):
        run(["--config", str(bad), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists(), "a bad recipe must not create a run directory"


def test_summary_compares_first_and_last_steps():
    history = [{"step": s, "loss": 0.0, "reward": float(s)} for s in range(1, 11)] + [{"train_runtime": 1.0}]
    assert summarize(history, 3) == {"steps": 10, "window": 3, "reward_first": 2.0, "reward_last": 9.0}
    assert summarize([], 3) == {}


def test_cli_train_help_lists_recipe_fields():
    result = subprocess.run(
        [sys.executable, "-m", "trl_guided.cli", "train", "--help"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--config", "--guidance_loss_scope", "--length_target", "--model_name_or_path"):
        assert flag in result.stdout


CPU_RECIPES = sorted((ROOT / "recipes" / "smollm2-135m-instruct").glob("*_cpu.yaml"))


@pytest.mark.parametrize("recipe", CPU_RECIPES, ids=[r.name for r in CPU_RECIPES])
def test_embedded_cpu_recipes_run_two_steps(tmp_path, recipe):
    """The CPU recipes (the main job's among them) on the embedded SmolLM2-135M, shortened, so they never rot."""
    out = tmp_path / "run"
    short = ["--max_steps", "2", "--save_steps", "2", "--max_completion_length", "24", "--prefix_min_tokens", "2"]
    short += ["--prefix_max_tokens", "8", "--max_guide_tokens", "4", "--output_dir", str(out), "--summary_window", "1"]
    short += ["--log_completions", "true", "--heldout_limit", "2"]  # the recipes' before/after eval, on 2 problems
    assert cli.main(["train", "--config", str(recipe), *short]) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert (out / "checkpoint-2" / "trainer_state.json").exists()
    assert (out / "model.safetensors").exists()
    table = pd.read_parquet(out / "completions" / "completions_00002.parquet")
    rewards = yaml.safe_load(recipe.read_text())["reward_funcs"]
    assert {"prefix", "guidance", "postfix", *rewards} <= set(table.columns)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["reward_first"]) and math.isfinite(summary["reward_last"])
    assert (out / "reward_curve.png").stat().st_size > 0


def _recipe(tmp_path, **changes):
    recipe = yaml.safe_load(DEMO.read_text())
    recipe.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.parametrize(
    "changes, argv_extra, message",
    [
        (
            dict(learning_rat=1e-5),
            [],
            r"recipe\.yaml: unknown key\(s\) 'learning_rat' \(did you mean 'learning_rate'\?\)",
        ),
        ({}, ["--guidance_los_scope", "guidance"], r"command line: unknown key.*did you mean 'guidance_loss_scope'"),
        (dict(num_generations="four"), [], r"recipe\.yaml: num_generations must be int, got 'four'"),
        (dict(task="gsm9k"), [], r"Unknown task 'gsm9k'.*Did you mean 'gsm8k'"),
        (dict(reward_funcs=["lenght"]), [], r"Unknown reward function 'lenght'"),
        (dict(dataset_path="/nonexistent/prompts.txt"), [], r"dataset_path='/nonexistent/prompts.txt' does not exist"),
        (
            dict(model_name_or_path="Qwen/No-Such-Model"),
            [],
            r"Cannot load model 'Qwen/No-Such-Model': looked in the local Hugging Face cache only \(HF_HUB_OFFLINE=1",
        ),
    ],
    ids=["unknown_key", "unknown_flag", "wrong_type", "unknown_task", "unknown_reward", "missing_data", "no_model"],
)
def test_cli_errors_are_one_clear_line_and_write_nothing(tmp_path, changes, argv_extra, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=message) as error:
        cli.main(["train", "--config", _recipe(tmp_path, **changes), "--output_dir", str(out), *argv_extra])
    assert "\n" not in str(error.value.code)
    assert not out.exists()


def test_cli_error_exit_code_and_missing_recipe(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "trl_guided.cli", "train", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"Recipe file not found: {tmp_path / 'nope.yaml'}"


def test_deepspeed_without_gpu_and_without_use_cpu_is_one_line(tmp_path):
    """`accelerate launch` with a DeepSpeed config (ACCELERATE_USE_DEEPSPEED) and a recipe without use_cpu on a CPU
    machine: one line that says what to set, instead of DeepSpeed's train_batch_size mismatch on every rank."""
    recipe = _recipe(tmp_path, use_cpu=False, bf16=False, output_dir=str(tmp_path / "out"))
    env = {**os.environ, "ACCELERATE_USE_DEEPSPEED": "true", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "trl_guided.cli", "train", "--config", recipe]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert (
        result.stderr.strip().splitlines()[-1].startswith("DeepSpeed on a machine without a GPU: set `use_cpu: true`")
    )
    assert not (tmp_path / "out").exists()


def test_gpu_recipe_on_a_cpu_machine_names_the_typo_first_then_the_fix(tmp_path):
    """TRL / transformers check bf16 while the configs are built; our key check runs before, and their error becomes
    one line with the fix (a subprocess: the test kit forces use_cpu on every config built in this process)."""
    gpu_recipe = dict(model_name_or_path="embedded:smollm2-135m-instruct", task="length", bf16=True)
    command = [sys.executable, "-m", "trl_guided.cli", "train", "--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    for changes, expected in (
        (dict(learning_rat=1e-5), "unknown key(s) 'learning_rat' (did you mean 'learning_rate'?)"),
        ({}, "No GPU found for this recipe's bf16/fp16 settings: set `use_cpu: true` and `bf16: false`"),
    ):
        path = tmp_path / "gpu.yaml"
        path.write_text(yaml.safe_dump({**gpu_recipe, **changes}))
        argv = [*command, "--config", str(path)]
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert expected in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_env_block_and_resume_from_last_checkpoint(tmp_path, tiny_llama, monkeypatch):
    out = tmp_path / "run"
    short = dict(
        model_name_or_path=tiny_llama, max_steps=2, save_steps=1, max_completion_length=16, prefix_min_tokens=2
    )
    short.update(prefix_max_tokens=6, max_guide_tokens=4, output_dir=str(out), log_completions=False)
    short["env"] = {"TRL_GUIDED_TEST_ENV": "from-recipe"}
    monkeypatch.delenv("TRL_GUIDED_TEST_ENV", raising=False)
    recipe = _recipe(tmp_path, **short)
    run(["--config", recipe])
    assert os.environ["TRL_GUIDED_TEST_ENV"] == "from-recipe"
    run(["--config", recipe, "--max_steps", "3", "--resume_from_checkpoint", "true"])
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3]  # steps 1-2 came from checkpoint-2


def test_model_config_fields_reach_the_model_or_are_refused(tmp_path, tiny_llama, monkeypatch):
    """ModelConfig's loading fields are forwarded as TRL's grpo.py forwards them; 4/8-bit without a GPU is refused."""
    import trl_guided.train as train_module

    seen = {}
    build = train_module.GuidedGRPOTrainer

    def recording_trainer(*args, **kwargs):
        trainer = build(*args, **kwargs)
        seen.update(kwargs=kwargs["args"].model_init_kwargs, attn=trainer.model.config._attn_implementation)
        seen["quantization_config"] = kwargs["quantization_config"]
        return trainer

    monkeypatch.setattr(train_module, "GuidedGRPOTrainer", recording_trainer)
    short = dict(model_name_or_path=tiny_llama, max_steps=1, max_completion_length=16, prefix_min_tokens=2)
    short.update(prefix_max_tokens=6, max_guide_tokens=4, output_dir=str(tmp_path / "run"), save_strategy="no")
    short.update(eval_before_after=False, attn_implementation="eager", model_revision="main", dtype="float32")
    run(["--config", _recipe(tmp_path, **short)])
    assert seen["kwargs"] == {"revision": "main", "dtype": "float32", "attn_implementation": "eager"}
    assert seen["attn"] == "eager" and seen["quantization_config"] is None
    with pytest.raises(SystemExit, match="load_in_4bit / load_in_8bit quantize with bitsandbytes, which needs a CUDA"):
        run(["--config", _recipe(tmp_path, **short, load_in_4bit=True), "--output_dir", str(tmp_path / "q")])
    assert not (tmp_path / "q").exists()
