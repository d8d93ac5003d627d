"""The guided-vs-plain study (bench/learning.py, the package bench/study/): its statistics on hand-made run folders
with known answers, its plan, resume bookkeeping and command line."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # bench's scripts import their siblings, as the study's entry point does
from study import analysis, cli, estimate, ledger, plan, runner, tuning  # noqa: E402
from study.plan import StudyPlan  # noqa: E402
from study.tables import markdown_table  # noqa: E402

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
        write_run(runs / plan.run_name(arm, seed), correct, {**record, "curve": curve(steps, 0.1, 100)})
    # A seed that only one arm finished (a killed study) must not enter the paired statistics.
    write_run(
        runs / plan.run_name("guided", 2),
        [1, 1, 1, 1],
        {"arm": "guided", "seed": 2, "steps": 8, "tokens": 800, "train_seconds": 16.0, "curve": curve(8, 0.1, 100)},
    )
    return tmp_path


def test_gains_and_pair_differences_match_a_hand_computation(study):
    report = analysis.analyse(study)
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


def test_fluency_is_compared_on_the_problems_every_run_and_the_starting_model_scored(study):
    """The quality model scores the first N problems (--quality-problems); a problem it could not score for one
    evaluation (e.g. an empty answer) leaves every evaluation's mean, the starting model's included."""
    runs = study / "learning_runs"
    for folder in [runs / "before", *(runs / plan.run_name(arm, seed) for arm, seed in AFTER)]:
        rows = [json.loads(line) for line in (folder / "eval.jsonl").read_text().splitlines()]
        for index, row in enumerate(rows):  # NLL/token = 1 + problem index (+ 1 after training)
            row["nll"], row["nll_tokens"] = (index + 1.0 + (folder.name != "before")) * 2, 2
        rows[-1]["nll"] = None  # every evaluation left the last problem out (the first N only)
        if folder.name == "before":
            rows[0]["nll"] = None  # and the starting model could not be scored on the first
        (folder / "eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    plain = analysis.analyse(study)["arms"]["plain"]
    assert plain["nll_per_token_before"] == pytest.approx((2 + 3) / 2)  # problems 1 and 2
    assert plain["nll_per_token_after"] == pytest.approx([(3 + 4) / 2] * 2)  # the same two, not problem 0


def test_training_reward_at_equal_steps_and_tokens(study):
    report = analysis.analyse(study)
    assert report["equal_steps"] == 4 and report["equal_tokens"] == 400
    guided = report["arms"]["guided"]
    # Rewards rise 0.1 per step: the last 5 steps up to step 4 are steps 1..4 (mean 0.25); at the end, steps 4..8.
    assert guided["train_reward_at_equal_steps"] == pytest.approx([0.25, 0.25])
    assert guided["train_reward_at_equal_tokens"] == pytest.approx([0.25, 0.25])
    assert guided["train_reward_at_end"] == pytest.approx([0.6, 0.6])


def test_hierarchical_ci_is_a_point_without_variation_and_widens_with_it():
    assert analysis.hierarchical_ci(np.full((3, 10), 0.5)) == pytest.approx([0.5, 0.5])
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 2, size=(3, 200)).astype(float)
    low, high = analysis.hierarchical_ci(noisy)
    assert low < noisy.mean() < high
    assert high - low < 0.2


def test_reward_at_takes_the_last_window_up_to_the_limit():
    rows = curve(10, 1.0, 10)
    assert analysis.reward_at(rows, "step", 3) == pytest.approx(2.0)
    assert analysis.reward_at(rows, "tokens", 100, window=2) == pytest.approx(9.5)
    assert analysis.reward_at(rows, "step", 0) is None


@pytest.mark.parametrize("recipe", ["learning.yaml", "learning_gsm8k_gpu.yaml"])
@pytest.mark.parametrize("arm", sorted(plan.ARMS))
def test_every_arm_of_the_study_recipes_is_a_valid_config(recipe, arm):
    """Each arm overlays the base recipe: it parses and no field is refused (a switched-off field only warns)."""
    from trl_guided.recipe import explicit_keys, make_parser, read_recipe, unused_settings

    argv = ["--config", str(ROOT / "bench" / recipe), "--output_dir", "unused"]
    for key, value in plan.ARMS[arm].items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    task_args, training_args, model_args = make_parser().parse_args_and_config(args=argv)
    errors, _ = unused_settings(explicit_keys(argv, read_recipe(argv[1])), task_args, training_args, model_args)
    assert not errors
    assert training_args.guidance == plan.ARMS[arm]["guidance"]


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
    report = analysis.analyse(study)
    table = markdown_table(report).splitlines()
    assert len(table) == 2 + len(report["arms"])
    metric = report["metric"].split()[0].removesuffix("/mean")
    assert table[0].startswith(f"| arm | steps | tokens | {metric} before -> after |")
    assert table[0].endswith("| NLL/token before -> after | repetition before -> after |")
    assert table[2].startswith("| plain | 4.0 | 400 | 0.250 -> 0.375 | +0.125 [")
    assert "| +0.250 [" in table[3]  # guided - plain = 0.375 - 0.125


# ------------------------------------------------------------------------ learning rate per arm, pairs, budget


def write_records(path: Path, values: dict[str, float], tokens: int = 3) -> None:
    rows = [
        {
            "problem_id": pid,
            "sample": 0,
            "completion": "x",
            "tokens": tokens,
            "truncated": False,
            "rewards": {"arithmetic_accuracy": float(v)},
        }
        for pid, v in values.items()
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


VALIDATION = {"v0": 1, "v1": 0, "v2": 0, "v3": 0}  # the starting model solves v0
TUNING = {  # (arm, rate, seed) -> validation problems solved; v3 is a training prompt: left out of every score
    ("plain", 1e-5, 100): {"v0": 1, "v1": 1, "v2": 0, "v3": 1},
    ("plain", 4e-5, 100): {"v0": 1, "v1": 1, "v2": 0, "v3": 0},  # ties 1e-5 once v3 is left out: the smaller wins
    ("guided", 1e-5, 100): {"v0": 1, "v1": 0, "v2": 0, "v3": 0},
    ("guided", 4e-5, 100): {"v0": 1, "v1": 1, "v2": 1, "v3": 0},
    ("guided", 1.6e-4, 100): {"v0": 1, "v1": 1, "v2": 1, "v3": 1},  # best, but its run of seed 101 is missing
    ("plain", 1e-5, 101): {"v0": 1, "v1": 0, "v2": 0, "v3": 0},
    ("plain", 4e-5, 101): {"v0": 0, "v1": 1, "v2": 0, "v3": 0},
    ("guided", 1e-5, 101): {"v0": 0, "v1": 0, "v2": 0, "v3": 0},
    ("guided", 4e-5, 101): {"v0": 1, "v1": 1, "v2": 0, "v3": 0},
}


@pytest.fixture
def tuned_study(study):
    runs = study / "learning_runs"
    (runs / "validation.json").write_text(json.dumps({"limit": 4, "problems": 3, "excluded_training_prompts": ["v3"]}))
    write_records(runs / "before" / "validation.jsonl", VALIDATION)
    for (arm, rate, seed), values in TUNING.items():
        folder = runs / "tune" / plan.tune_name(arm, rate, seed)
        folder.mkdir(parents=True)
        write_records(folder / "validation.jsonl", values)
        record = {
            "arm": arm,
            "seed": seed,
            "learning_rate": rate,
            "steps": 3,
            "train_seconds": 6.0,
            "eval_seconds": 2.0,
            "process_seconds": 20.0,
            "phase": "tune",
        }
        (folder / "run.json").write_text(json.dumps(record))
    ledger = [
        {"phase": "before", "runs": ["before"], "wall_seconds": 30.0},
        {"phase": "tune", "runs": ["a", "b"], "wall_seconds": 60.0},
        {"phase": "final", "runs": ["c", "d"], "wall_seconds": 90.0},
    ]
    (runs / "ledger.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in ledger))
    return study


def test_select_rate_takes_the_best_score_and_the_smaller_rate_on_a_tie():
    assert tuning.select_rate({1e-5: 0.5, 4e-5: 0.75, 1.6e-4: 0.25}) == 4e-5
    assert tuning.select_rate({4e-5: 0.5, 1e-5: 0.5, 1.6e-4: 0.25}) == 1e-5
    assert tuning.select_rate({1e-5: 2 / 3, 4e-5: 1 - 1 / 3}) == 1e-5  # equal up to rounding: a tie


def test_lr_grid_scores_each_rate_on_validation_problems_that_are_not_training_prompts(tuned_study):
    grid = tuning.lr_grid(tuned_study / "learning_runs", "arithmetic_accuracy/mean")
    plain, guided = grid["plain"], grid["guided"]
    assert plain["rates"] == [1e-5, 4e-5] and plain["seeds"] == [100, 101]
    # Means over seeds of v0..v2: plain 1e-5: (2/3 + 1/3) / 2, 4e-5: (2/3 + 1/3) / 2: a tie, the smaller rate wins.
    assert plain["scores"] == pytest.approx([0.5, 0.5]) and plain["chosen"] == 1e-5 and plain["complete"]
    # guided 1.6e-4 scores best on seed 100 but has no run for seed 101: not a candidate until it has.
    assert guided["scores"][:2] == pytest.approx([1 / 6, 5 / 6]) and guided["scores"][2] is None
    assert guided["chosen"] == 4e-5 and not guided["complete"]
    assert {run["learning_rate"] for run in guided["runs"]} == {1e-5, 4e-5, 1.6e-4}


def test_report_holds_the_grid_the_difference_to_plain_the_base_length_and_the_machine_time(tuned_study):
    report = analysis.analyse(tuned_study)
    assert report["lr_grid"]["plain"]["chosen"] == 1e-5
    assert report["validation"] == {
        "problems": 3,
        "evaluated": 4,
        "excluded_training_prompts": 1,
        "score_before": pytest.approx(1 / 3),
    }
    assert report["base_median_completion_tokens"] == 3.0
    guided = report["arms"]["guided"]
    assert guided["difference_to_plain"] == pytest.approx(0.25)  # 0.375 - 0.125 (see the first test)
    low, high = guided["difference_to_plain_ci95"]
    assert low <= 0.25 <= high
    assert "difference_to_plain" not in report["arms"]["plain"]
    assert guided["median_step_seconds"] == [2.0, 2.0]
    time = report["machine_time"]
    assert time["wall_minutes"] == pytest.approx(3.0) and report["study_seconds"] == pytest.approx(180.0)
    assert time["wall_minutes_by_phase"] == pytest.approx({"before": 0.5, "tune": 1.0, "final": 1.5})
    # 9 tuning runs: 6 s training, 2 s evaluation, 12 s start-up and loading each.
    assert time["core_minutes"]["tune"] == pytest.approx({"training": 0.9, "evaluation": 0.3, "other": 1.8})
    table = markdown_table(report)
    assert "| guided | 8.0 | 800 |" in table
    assert "| arm | 1e-05 | 4e-05 | 0.00016 |" in table
    assert "| plain | **0.500** | 0.500 | - |" in table.splitlines()
    assert "| guided | 0.167 | **0.833** | - |" in table.splitlines()  # 1.6e-4 lacks a seed: no score yet
    assert table.index("| plain | **") < table.index("| guided | 0.167")  # the arms' order


def test_learning_curve_scores_the_final_model_on_the_snapshots_problems(tmp_path):
    write_records(tmp_path / "eval-3.jsonl", {"p0": 0, "p1": 1})
    write_records(tmp_path / "eval.jsonl", {"p0": 1, "p1": 1, "p2": 0, "p3": 0})
    run = {
        "evals": [
            {"seconds": 6.0, "step": 3, "records": "eval-3.jsonl", "subset": True, "arithmetic_accuracy/mean": 0.5},
            {"seconds": 12.0, "step": 6, "records": "eval.jsonl", "arithmetic_accuracy/mean": 0.5},
        ]
    }
    before = {"p0": 0.0, "p1": 0.0, "p2": 1.0, "p3": 1.0}
    curve = analysis.learning_curve(tmp_path, run, "arithmetic_accuracy/mean", before)
    # The starting model on p0, p1 (not its 0.5 on all four), the snapshot, the final model on p0, p1 (both solved).
    assert [point["score"] for point in curve] == [0.0, 0.5, 1.0]
    assert [point["seconds"] for point in curve] == [0.0, 6.0, 12.0]
    single = analysis.learning_curve(tmp_path, {"evals": run["evals"][1:]}, "arithmetic_accuracy/mean", before)
    assert single == [{"seconds": 0.0, "step": 0, "score": 0.5}, {"seconds": 12.0, "step": 6, "score": 0.5}]


def test_pairing_check_compares_median_step_times(tmp_path):
    runs = tmp_path / "learning_runs"
    for name, step in (("alone", 2.0), ("paired-a", 2.4), ("paired-b", 2.6)):
        (runs / "pairing" / name).mkdir(parents=True)
        (runs / "pairing" / name / "run.json").write_text(
            json.dumps(
                {
                    "curve": curve(5, 0.1, 10)[:1]
                    + [{"step": s, "seconds": 1.0 + step * (s - 1), "reward": 0.0, "tokens": 0} for s in range(2, 6)]
                }
            )
        )
    check = analysis.pairing_check(runs)
    assert check["median_step_seconds_alone"] == pytest.approx(2.0)
    assert check["median_step_seconds_paired"] == pytest.approx(2.5)
    assert check["paired_over_alone"] == pytest.approx(1.25)
    assert analysis.pairing_check(tmp_path / "nothing") is None
    # A check whose runs made one step each (a step longer than its budget): the first steps' times, said so.
    for name, seconds in (("alone", 70.0), ("paired-a", 80.0), ("paired-b", 90.0)):
        record = {"curve": [{"step": 1, "seconds": seconds, "reward": 0.0, "tokens": 0}]}
        (runs / "pairing" / name / "run.json").write_text(json.dumps(record))
    check = analysis.pairing_check(runs)
    assert check["paired_over_alone"] == pytest.approx(85 / 70) and "warm-up included" in check["measure"]


def test_batches_pair_runs_of_one_seed_and_the_arm_order_rotates():
    order = plan.final_order(["a", "b", "c"], [0, 1])
    assert order == [("a", 0), ("b", 0), ("c", 0), ("b", 1), ("c", 1), ("a", 1)]
    grouped = plan.batches(order, 2, group=lambda item: item[1])
    assert grouped == [[("a", 0), ("b", 0)], [("c", 0)], [("b", 1), ("c", 1)], [("a", 1)]]
    assert plan.batches(order, 1) == [[item] for item in order]


def test_a_finished_run_with_other_settings_is_stale(tmp_path):
    spec = {
        "recipe": str(ROOT / "bench" / "learning.yaml"),
        "overrides": {"guidance": False, "learning_rate": 1e-5},
        "seed": 0,
        "budget": 60,
        "eval": {"split": "test", "limit": None, "records": "eval.jsonl"},
        "phase": "final",
    }
    assert ledger.finished(tmp_path, spec) is None
    (tmp_path / "run.json").write_text(json.dumps({"identity": plan.identity(spec)}))
    assert ledger.finished(tmp_path, spec) is True
    assert ledger.finished(tmp_path, {**spec, "overrides": {"guidance": False, "learning_rate": 4e-5}}) is False
    assert ledger.finished(tmp_path, {**spec, "budget": 120}) is False
    # A run of the first study (no identity): its overrides decide.
    (tmp_path / "run.json").write_text(json.dumps({"overrides": {"guidance": False}}))
    assert ledger.finished(tmp_path, {**spec, "overrides": {"guidance": False}}) is True
    assert ledger.finished(tmp_path, spec) is False


def test_validation_problems_are_neither_test_problems_nor_training_prompts():
    """The study's validation problems on the arithmetic recipe: none is a test problem, none is a training prompt,
    and exactly the training prompts among the first `limit` validation rows are left out of the score."""
    from trl_guided.evaluate import load_problems
    from trl_guided.train import eval_settings, parse_args

    task_args, training_args, _ = parse_args(["--config", str(ROOT / "bench" / "learning.yaml"), "--output_dir", "x"])
    chosen = tuning.validation_plan(task_args, training_args, 64)

    def hashes(split, limit):
        settings = eval_settings(task_args, training_args)
        settings.split, settings.limit = split, limit
        return [pid.split("-", 1)[1] for pid in load_problems(settings)[1]]

    train, test = set(hashes("train", None)), set(hashes("test", None))
    validation = hashes("validation", chosen["limit"])
    excluded = {pid.split("-", 1)[1] for pid in chosen["excluded_training_prompts"]}
    assert not set(validation) & test
    assert excluded == set(validation) & train
    assert len([h for h in validation if h not in train]) == chosen["problems"] == 64


def _generated_tasks() -> list[str]:
    from trl_guided.data import TASK_OPTIONS

    return sorted(name for name, options in TASK_OPTIONS.items() if "dataset_seed" in options)


@pytest.mark.parametrize("task", _generated_tasks())
def test_generated_tasks_keep_validation_and_test_apart(task):
    """Every generated task (any task with a seed, new ones included): no validation problem is a test problem."""
    from trl_guided.data import load_task

    options = {"size": 300, "seed": 3}
    prompts = {
        split: {str(p) for p in load_task(task, split, **options)["prompt"]} for split in ("validation", "test")
    }
    assert prompts["validation"] and prompts["test"]
    assert not prompts["validation"] & prompts["test"]


def test_study_file_options_and_one_line_refusals(tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text(
        "name: regime\nseeds: [0, 1]\nlr_grid: [2.0e-6, 8.0e-6, 3.2e-5]\nparallel: 2\ncores: '0,1'\n"
        "arms_file: bench/learning_regime_arms.yaml\nset: {beta: 0.0}\n"
    )
    args = cli.parse_arguments(["--study", str(study), "--seeds", "0", "1", "2"])
    assert args.name == "regime" and args.seeds == [0, 1, 2] and args.lr_grid == [2e-6, 8e-6, 3.2e-5]
    assert args.set == [("beta", 0.0)] and "treerl" in args.arms and args.parallel == 2
    for argv, message in (
        (["--study", str(study), "--tune-seeds", "1"], "--tune-seeds must differ"),
        (["--lr-grid", "1e-5"], "at least two values"),
        (["--parallel", "2", "--cores", "0"], "as many, e.g. --cores 0,1"),
        (["--arms", "nope"], "not in the arms"),
        (["--task", "nope"], "tasks with a CPU recipe"),
    ):
        with pytest.raises(SystemExit):
            cli.parse_arguments(argv)
        assert message in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("nope: 1\n")
    with pytest.raises(SystemExit):
        cli.parse_arguments(["--study", str(bad)])
    assert "unknown options ['nope']" in capsys.readouterr().err
    bad.write_text("guided: {guidance: true}\n")
    with pytest.raises(SystemExit, match="need a .plain. arm"):
        plan.load_arms(str(bad))


# Arms of the regime study whose fields come with another issue: they must fail to parse on a branch without them,
# naming the field. Once it is merged the arm parses, this test fails, and the entry must go.
@pytest.mark.parametrize("arm", sorted(plan.load_arms(str(ROOT / "bench" / "learning_regime_arms.yaml"))))
def test_every_arm_of_the_regime_study_parses(arm):
    from trl_guided.train import parse_args

    overlay = plan.load_arms(str(ROOT / "bench" / "learning_regime_arms.yaml"))[arm]
    spec = {"recipe": str(ROOT / "bench" / "learning.yaml"), "overrides": overlay, "seed": 0, "work_dir": "unused"}
    _, training_args, _ = parse_args(plan.argv_for(spec))
    assert training_args.guidance == overlay["guidance"]
    assert all(getattr(training_args, name) == value for name, value in overlay.items()), arm


def test_ballast_keeps_running_until_stopped():
    import subprocess
    import time

    process = subprocess.Popen([sys.executable, str(ROOT / "bench" / "learning.py"), "ballast"])
    time.sleep(1.0)
    assert process.poll() is None
    process.terminate()
    assert process.wait(timeout=10) != 0


@pytest.mark.parametrize("name", ["learning_regime_study.yaml", "learning_regime_gpu_study.yaml"])
def test_the_study_files_use_known_options_and_arms(name):
    options = yaml.safe_load((ROOT / "bench" / name).read_text())
    known = {action.dest for action in cli.study_parser()._actions}
    assert set(options) <= known
    arms = plan.load_arms(str(ROOT / options["arms_file"]))
    assert len(arms) >= 7 and "plain" in arms
    assert len(options["lr_grid"]) >= 3 and max(options["lr_grid"]) / min(options["lr_grid"]) >= 16
    assert not set(options["tune_seeds"]) & set(options["seeds"]) and len(options["seeds"]) >= 3


def test_options_that_would_have_no_effect_or_fail_late_are_refused_and_reading_needs_no_vllm(
    tmp_path, monkeypatch, capsys
):
    base = ["--out", str(tmp_path), "--arms", "plain"]
    for extra, message in [
        (["--quality-problems", "0"], "--quality-problems 0: must be at least 1"),
        (["--eval-python", sys.executable], "--eval-python runs the vLLM evaluation rounds"),
    ]:
        with pytest.raises(SystemExit):
            cli.parse_arguments([*base, *extra])
        assert message in capsys.readouterr().err
    # Without vLLM anywhere, a vLLM study's results are still readable (--markdown, --plan, --report-only).
    monkeypatch.setattr(cli, "ROOT", tmp_path)
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit):
        cli.parse_arguments([*base, "--eval-backend", "vllm"])
    for reading in ("--markdown", "--plan", "--report-only"):
        assert cli.parse_arguments([*base, "--eval-backend", "vllm", reading]).eval_python is None
    relative = cli.parse_arguments([*base, "--eval-backend", "vllm", "--eval-python", os.path.relpath(sys.executable)])
    assert relative.eval_python == os.path.abspath(sys.executable)  # the rounds start in another directory


def test_plan_counts_batches_and_estimates_from_the_measured_evaluation(tmp_path):
    argv = ["--out", str(tmp_path), "--name", "s", "--arms", "plain", "guided", "guided_postfix", "--seeds", "0", "1"]
    argv += ["--lr-grid", "1e-5", "4e-5", "--tune-minutes", "1", "--budget-minutes", "4", "--parallel", "2"]
    argv += ["--cores", "0,1", "--test-problems", "100", "--validation-problems", "10"]
    study = StudyPlan(cli.parse_arguments(argv))
    lines = estimate.describe(study).splitlines()
    assert lines[1] == "tuning: 6 runs in 3 batches x 1.0 min of training"
    assert lines[2] == "test runs: 6 runs in 4 batches x 4.0 min of training"  # 3 arms per seed: a pair and a lone run
    assert lines[3] == "training wall-clock: 19 min" and "--stop-after before" in lines[4]
    before = tmp_path / "s_runs" / "before"
    before.mkdir(parents=True)
    (before / "run.json").write_text(json.dumps({"eval_seconds": 50.0, "evals": [{"problems": 100}]}))
    (tmp_path / "s_runs" / "plain-seed0").mkdir()
    (tmp_path / "s_runs" / "plain-seed0" / "run.json").write_text(json.dumps({"setup_seconds": 30.0}))
    # Tuning batch: 60 s + 30 s + 10 x 1.3 x 0.5 s; test batch: 240 s + 30 s + 100 x 0.5 s.
    expected = (3 * (60 + 30 + 6.5) + 4 * (240 + 30 + 50)) / 60
    lines = estimate.describe(study).splitlines()
    assert lines[4].startswith(f"estimate: {expected:.0f} min (0.50 s per problem, as the starting model's 100")
    assert lines[5] == "spent so far: 0 min (ledger.jsonl)"
    # vLLM: batches train and save only; the rounds score every model after them, one engine per core, at the rate
    # of the rounds so far (a tuned model: 48 problems in 12 s, start-up of the engine included).
    vllm = StudyPlan(cli.parse_arguments([*argv, "--eval-backend", "vllm", "--eval-python", sys.executable]))
    tuned = tmp_path / "s_runs" / "tune" / "plain-lr1e-05-seed100"
    tuned.mkdir(parents=True)
    (tuned / "run.json").write_text(
        json.dumps({"setup_seconds": 30.0, "eval_seconds": 12.0, "evals": [{"problems": 48}]})
    )
    (tmp_path / "s_runs" / "ledger.jsonl").write_text('{"phase": "tune", "wall_seconds": 90}\n' * 2)
    rounds = (6 * 10 * 1.3 + 6 * 100) * 0.25 / 2
    expected = (3 * (60 + 30) + 4 * (240 + 30) + rounds) / 60
    lines = estimate.describe(vllm).splitlines()
    assert lines[4].startswith(f"estimate: {expected:.0f} min (evaluation rounds {rounds / 60:.0f} min at 0.25 s per")
    assert lines[5] == "spent so far: 3 min (ledger.jsonl)"


def test_a_training_recipe_gets_the_study_settings_and_every_arm_is_parsed_first(tmp_path):
    argv = ["--task", "arithmetic", "--out", str(tmp_path), "--lr-grid", "1e-5", "4e-5", "--arms", "plain", "guided"]
    study = runner.Study(StudyPlan(cli.parse_arguments(argv)))
    parsed = study.preflight()["training_args"]
    assert parsed.max_steps == 100000 and parsed.save_strategy == "no" and parsed.logging_steps == 1
    assert parsed.lr_scheduler_type == "constant_with_warmup"  # a str enum
    assert not (tmp_path / "learning_runs").exists()  # nothing written before every arm parsed
    bad = tmp_path / "arms.yaml"
    bad.write_text("plain: {guidance: false}\nodd: {guidance: true, guidance_loss_scope: nowhere}\n")
    study = runner.Study(StudyPlan(cli.parse_arguments([*argv[:4], "--arms-file", str(bad)])))
    with pytest.raises(SystemExit, match="arm 'odd' .* cannot run: .*nowhere"):
        study.preflight()


def test_the_parent_reads_the_plan_and_the_tables_without_torch():
    """`--plan`, `--markdown` and the ballast start without torch and trl_guided: the study's command line imports
    the modules that load them (runner, worker, evaluation, outputs) only for the commands that need them."""
    import subprocess

    code = "import sys; import study.cli; print(sorted(m for m in ('torch', 'trl_guided') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "bench")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
