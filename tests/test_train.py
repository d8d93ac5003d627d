"""The training script, the recipes, the length task and its rewards, and the embedded CPU demo."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from trl_guided import cli
from trl_guided.data import load_task
from trl_guided.rewards import get_reward, length, smooth_length
from trl_guided.train import make_parser, run, summarize

ROOT = Path(__file__).resolve().parents[1]
# Training recipes; recipes/accelerate/ holds accelerate launcher configs, not recipes.
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.relative_to(ROOT).parts)
DEMO = ROOT / "recipes" / "smollm2-135m-instruct" / "length_cpu.yaml"


def test_length_rewards_follow_the_tldr_seed():
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
    task_args, training_args, model_args = make_parser().parse_args_and_config(
        args=["--config", str(recipe), "--output_dir", str(tmp_path)], fail_with_unknown_args=True
    )
    assert model_args.model_name_or_path and training_args.report_to is not None


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


def test_embedded_demo_recipe_runs_two_steps(tmp_path):
    """The main job's recipe on the embedded SmolLM2-135M, shortened, so it can never rot."""
    out = tmp_path / "run"
    short = ["--max_steps", "2", "--save_steps", "2", "--max_completion_length", "24", "--prefix_min_tokens", "2"]
    short += ["--prefix_max_tokens", "8", "--max_guide_tokens", "4", "--output_dir", str(out), "--summary_window", "1"]
    assert cli.main(["train", "--config", str(DEMO), *short]) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert (out / "checkpoint-2" / "trainer_state.json").exists()
    assert (out / "model.safetensors").exists()
    table = pd.read_parquet(out / "completions" / "completions_00002.parquet")
    assert {"prefix", "guidance", "postfix", "smooth_length"} <= set(table.columns)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["reward_first"]) and math.isfinite(summary["reward_last"])
    assert (out / "reward_curve.png").stat().st_size > 0
