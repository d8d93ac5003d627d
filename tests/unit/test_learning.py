"""The statistics of the guided-vs-plain study (bench/learning.py), on hand-made run folders with known answers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("learning", ROOT / "bench" / "learning.py")
learning = importlib.util.module_from_spec(spec)
spec.loader.exec_module(learning)

PROBLEMS = ["p0", "p1", "p2", "p3"]
BEFORE = [0, 1, 0, 0]
AFTER = {
    ("plain", 0): [1, 1, 0, 0],
    ("plain", 1): [0, 1, 0, 0],
    ("guided", 0): [1, 1, 1, 0],
    ("guided", 1): [1, 1, 0, 0],
}


def write_run(folder: Path, correct: list[int], record: dict) -> None:
    folder.mkdir(parents=True)
    rows = [
        {
            "problem_id": pid,
            "sample": 0,
            "completion": str(c),
            "tokens": 3,
            "truncated": False,
            "rewards": {"arithmetic_accuracy": float(c)},
        }
        for pid, c in zip(PROBLEMS, correct, strict=True)
    ]
    (folder / "eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    evals = [{"seconds": record.get("train_seconds", 0.0), "step": record.get("steps", 0), "records": "eval.jsonl"}]
    (folder / "run.json").write_text(json.dumps({**record, "evals": evals, "wall_seconds": 10.0}))


def curve(steps: int, reward_per_step: float, tokens_per_step: int) -> list[dict]:
    return [
        {"step": s, "seconds": 2.0 * s, "reward": reward_per_step * s, "tokens": tokens_per_step * s}
        for s in range(1, steps + 1)
    ]


@pytest.fixture
def study(tmp_path):
    runs = tmp_path / "learning_runs"
    write_run(
        runs / "before", BEFORE, {"model": {"name": "base"}, "settings": {"reward_funcs": ["arithmetic_accuracy"]}}
    )
    for (arm, seed), correct in AFTER.items():
        steps = 4 if arm == "plain" else 8  # a guided step is cheaper: more of them in the same budget
        record = {"arm": arm, "seed": seed, "steps": steps, "tokens": 100 * steps, "train_seconds": 16.0}
        write_run(runs / learning.run_name(arm, seed), correct, {**record, "curve": curve(steps, 0.1, 100)})
    # A seed that only one arm finished (a killed study) must not enter the paired statistics.
    write_run(
        runs / learning.run_name("guided", 2),
        [1, 1, 1, 1],
        {"arm": "guided", "seed": 2, "steps": 8, "tokens": 800, "train_seconds": 16.0, "curve": curve(8, 0.1, 100)},
    )
    return tmp_path


def test_gains_and_pair_differences_match_a_hand_computation(study):
    report = learning.analyse(study)
    assert report["seeds_complete"] == [0, 1]
    assert report["problems"] == 4
    plain, guided = report["arms"]["plain"], report["arms"]["guided"]
    assert plain["accuracy_before"] == pytest.approx(0.25)
    assert plain["accuracy_after"] == pytest.approx([0.5, 0.25])
    assert guided["accuracy_after"] == pytest.approx([0.75, 0.5])
    assert plain["gain"] == pytest.approx(0.125)  # (1 + 0) / 8 problem-seeds
    assert guided["gain"] == pytest.approx(0.375)  # (2 + 1) / 8
    assert report["pairs"]["plain - guided"]["difference"] == pytest.approx(-0.25)
    for entry in (plain["gain_ci95"], guided["gain_ci95"], report["pairs"]["plain - guided"]["ci95"]):
        assert entry[0] <= entry[1]
    assert plain["gain_ci95"][0] <= 0.125 <= plain["gain_ci95"][1]
    assert plain["steps"] == [4, 4] and guided["steps"] == [8, 8]
    assert report["study_seconds"] == pytest.approx(60.0)  # before + 4 paired runs + the unpaired one, 10 s each


def test_training_reward_at_equal_steps_and_tokens(study):
    report = learning.analyse(study)
    assert report["equal_steps"] == 4 and report["equal_tokens"] == 400
    guided = report["arms"]["guided"]
    # Rewards rise 0.1 per step: the last 5 steps up to step 4 are steps 1..4 (mean 0.25); at the end, steps 4..8.
    assert guided["train_reward_at_equal_steps"] == pytest.approx([0.25, 0.25])
    assert guided["train_reward_at_equal_tokens"] == pytest.approx([0.25, 0.25])
    assert guided["train_reward_at_end"] == pytest.approx([0.6, 0.6])


def test_hierarchical_ci_is_a_point_without_variation_and_widens_with_it():
    assert learning.hierarchical_ci(np.full((3, 10), 0.5)) == pytest.approx([0.5, 0.5])
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 2, size=(3, 200)).astype(float)
    low, high = learning.hierarchical_ci(noisy)
    assert low < noisy.mean() < high
    assert high - low < 0.2


def test_reward_at_takes_the_last_window_up_to_the_limit():
    rows = curve(10, 1.0, 10)
    assert learning.reward_at(rows, "step", 3) == pytest.approx(2.0)
    assert learning.reward_at(rows, "tokens", 100, window=2) == pytest.approx(9.5)
    assert learning.reward_at(rows, "step", 0) is None


@pytest.mark.parametrize("recipe", ["learning.yaml", "learning_gsm8k_gpu.yaml"])
@pytest.mark.parametrize("arm", sorted(learning.ARMS))
def test_every_arm_of_the_study_recipes_is_a_valid_config(recipe, arm):
    """Each arm overlays the base recipe: it parses and no field is refused (a switched-off field only warns)."""
    from trl_guided.train import explicit_keys, make_parser, unused_settings

    argv = ["--config", str(ROOT / "bench" / recipe), "--output_dir", "unused"]
    for key, value in learning.ARMS[arm].items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    task_args, training_args, model_args = make_parser().parse_args_and_config(args=argv)
    errors, _ = unused_settings(explicit_keys(argv, argv[1]), task_args, training_args, model_args)
    assert not errors
    assert training_args.guidance == learning.ARMS[arm]["guidance"]


def test_answer_position_finds_the_answer_token():
    spec = importlib.util.spec_from_file_location("answer_position", ROOT / "bench" / "answer_position.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.answer_start("17 + 15 = 32\nThe final answer is 32.") == 10
    assert module.answer_start("The sum is 7") == 11
    assert module.answer_start("no number") is None

    class Characters:  # one token per character
        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    ids = [ord(c) for c in "4 + 5 = 9"]
    assert module.token_at(Characters(), ids, module.answer_start("4 + 5 = 9")) == 8


def test_markdown_table_reads_the_report(study):
    report = learning.analyse(study)
    table = learning.markdown_table(report).splitlines()
    assert len(table) == 2 + len(report["arms"])
    assert table[2].startswith("| plain | 4.0 | 400 | 0.250 -> 0.375 | +0.125 [")
    assert "| +0.250 [" in table[3]  # guided - plain = 0.375 - 0.125
