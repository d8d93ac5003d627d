"""The decisive study's report (bench/decisive/report.py): hand-made records of `trl-guided train` / `eval` runs
become a study report with known gains, differences, steps and machine time."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("decisive_report", ROOT / "bench" / "decisive" / "report.py")
report_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report_module)

# Ids of the instructions task's first test problems (an id starts with the problem's index in the split); problem 0
# asks for at most 3 sentences, no "help", and to start with "Dear reader".
PROBLEMS = ["0-a", "1-b", "2-c", "3-d"]
START = [0.0, 1.0, 0.5, 0.0]
AFTER = {
    ("plain", 1): [1.0, 1.0, 0.5, 0.0],
    ("plain", 2): [0.0, 1.0, 1.0, 0.0],
    ("guided", 1): [1.0, 1.0, 1.0, 0.0],
    ("guided", 2): [1.0, 1.0, 0.5, 0.5],
}
OVERLAYS = {"plain": {"guidance": False}, "guided": {"guidance": True, "guidance_loss_scope": "guidance"}}


def write_eval(path: Path, scores: list[float], first_answer: str = "x") -> None:
    rows = [
        {"problem_id": p, "sample": 0, "completion": first_answer if p == PROBLEMS[0] else "x", "tokens": 5,
         "truncated": False, "prompt": [{"role": "user", "content": "Describe public parks in a few sentences."}],
         "rewards": {"constraints_followed": s}, "nll": 2.0, "nll_tokens": 4}
        for p, s in zip(PROBLEMS, scores, strict=True)
    ]  # fmt: skip
    path.with_suffix(".jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    metrics = {"constraints_followed/mean": {"value": sum(scores) / 4}, "repetition": {"value": 0.1}}
    result = {"settings": {"reward_funcs": ["constraints_followed"]}, "model": {"name": "m"}, "versions": {}}
    path.write_text(json.dumps({**result, "metrics": metrics, "problems": 4}))


def write_run(folder: Path, arm: str, scores: list[float], steps: int = 3, finished: bool = True, **answer) -> None:
    folder.mkdir(parents=True)
    training = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "num_generations": 4,
                "learning_rate": 1e-5, "guidance_loss_scope": "guidance_postfix", **OVERLAYS[arm]}  # fmt: skip
    task = {"task": "instructions", "dataset_size": 400, "dataset_seed": 0}
    (folder / "run_config.json").write_text(json.dumps({"task": task, "training": training}))
    log = [
        {"step": s, "step_time": 10.0, "reward": 0.1 * s, "completions/mean_length": 100.0} for s in range(1, steps)
    ]
    log.append({"step": steps, "train_runtime": 35.0})
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": steps, "log_history": log}))
    (folder / "train_command.sh").write_text(f"train {arm}\n")
    write_eval(folder / "eval_end.json", scores, **answer)
    if finished:
        (folder / "comparison.json").write_text("{}")


def job(start: str, end: str, cores: str = "1") -> dict:
    minutes = (report_module.parse_utc(end) - report_module.parse_utc(start)).total_seconds() / 60
    return {"start_utc": start, "end_utc": end, "wall_minutes": minutes, "cores": cores}


@pytest.fixture
def decisive(tmp_path):
    root = tmp_path / "decisive"
    (root / "phase1" / "start").mkdir(parents=True)
    write_eval(root / "phase1" / "start" / "eval_start.json", START)
    for (arm, seed), scores in AFTER.items():
        answer = {"first_answer": "Dear reader, the park is green."} if (arm, seed) == ("guided", 1) else {}
        write_run(root / "phase2" / f"{arm}-s{seed}", arm, scores, **answer)
    write_run(root / "phase2" / "guided-s3", "guided", [1.0] * 4, finished=False)  # trained, never evaluated
    ledger = [
        job("2026-12-06T10:00:00Z", "2026-12-06T11:00:00Z", "0"),
        job("2026-12-06T10:30:00Z", "2026-12-06T11:30:00Z"),
    ]
    (root / "ledger.jsonl").write_text("".join(json.dumps(line) + "\n" for line in ledger))
    (root / "sittings.json").write_text(json.dumps({"sittings": [{"sitting": 1, "from_utc": "2026-12-06T09:00:00Z"}]}))
    arms = tmp_path / "arms.yaml"
    arms.write_text(yaml.safe_dump(OVERLAYS))
    return root, arms


def test_the_report_has_the_gains_and_differences_of_a_hand_computation(decisive, tmp_path, capsys):
    root, arms = decisive
    out = tmp_path / "out"  # made if missing
    report_module.main(["--decisive", str(root), "--arms", str(arms), "--out", str(out), "--markdown"])
    assert "| guided | 3.0 | 1600 | 0.375 -> 0.750 | +0.375 [" in capsys.readouterr().out  # the README's table
    report = json.loads((out / "learning_decisive.json").read_text())
    assert (out / "learning_decisive.png").stat().st_size > 10_000
    assert report["problems"] == 4 and report["seeds_complete"] == [1, 2]  # guided-s3 has no comparison: left out
    plain, guided = report["arms"]["plain"], report["arms"]["guided"]
    start = sum(START) / 4
    assert plain["gain"] == pytest.approx((sum(AFTER["plain", 1]) + sum(AFTER["plain", 2])) / 8 - start)
    assert guided["gain"] == pytest.approx((sum(AFTER["guided", 1]) + sum(AFTER["guided", 2])) / 8 - start)
    assert guided["difference_to_plain"] == pytest.approx(guided["gain"] - plain["gain"])
    low, high = guided["difference_to_plain_ci95"]
    assert low <= guided["difference_to_plain"] <= high
    assert plain["steps"] == [3, 3] and plain["train_seconds"] == [35.0, 35.0]
    assert plain["tokens"] == [1600, 1600]  # 2 logged steps x 8 rows x 100 tokens
    assert report["pairs"]["plain - guided"]["difference"] == pytest.approx(-guided["difference_to_plain"])
    assert guided["overrides"] == OVERLAYS["guided"]
    assert report["settings"]["train_commands"]["guided-seed1"] == "train guided\n"
    kinds = report["constraint_kinds"]  # problem 0's answer in guided seed 1 follows its three constraints
    assert (
        kinds["guided"]["start_with"][0] == 1
        and kinds["plain"]["start_with"][0] == 0 == kinds["start"]["start_with"][0]
    )
    assert (
        kinds["guided"]["max_sentences"][0] >= 1
        and kinds["guided"]["avoid_word"][0] >= kinds["plain"]["avoid_word"][0]
    )
    assert all(kinds["plain"][kind][1] == 2 * given for kind, (_, given) in kinds["start"].items())
    relevance = report["answer_relevance"]  # only guided seed 1's first answer names the topic (a park)
    assert relevance["on_topic"]["before"] == 0.0 == relevance["on_topic"]["arms"]["plain"]["change"]
    assert relevance["on_topic"]["arms"]["guided"]["after"] == [0.25, 0.0]
    assert relevance["on_topic"]["arms"]["guided"]["difference_to_plain"] == pytest.approx(0.125)
    followed = relevance["followed_on_topic"]["arms"]["guided"]  # that answer's reward, the others count 0
    assert followed["after"] == [AFTER["guided", 1][0] / 4, 0.0] and followed["change"] == pytest.approx(0.125)
    assert report["machine_time"]["wall_minutes"] == 90.0 and report["machine_time"]["core_minutes"] == 120.0


def test_a_run_whose_settings_differ_from_its_arm_is_refused(decisive):
    root, arms = decisive
    config = root / "phase2" / "guided-s1" / "run_config.json"
    config.write_text(json.dumps({"training": {**json.loads(config.read_text())["training"], "guidance": False}}))
    with pytest.raises(SystemExit, match="guided-s1.*guidance"):
        report_module.build_report(root, arms)


def test_without_a_seed_every_arm_finished_the_report_says_so(decisive):
    root, arms = decisive
    for seed in (1, 2):
        (root / "phase2" / f"plain-s{seed}" / "comparison.json").unlink()
    write_run(root / "phase2" / "plain-s3", "plain", START)
    with pytest.raises(
        SystemExit, match=r"no seed that every arm finished yet \(finished: plain \[3\], guided \[1, 2\]"
    ):
        report_module.build_report(root, arms)


def test_machine_time_counts_side_by_side_jobs_once_per_sitting():
    ledger = [
        job("2026-12-06T08:00:00Z", "2026-12-06T09:00:00Z", "1"),
        job("2026-12-06T08:30:00Z", "2026-12-06T08:50:00Z", "0"),  # inside the first: counts once
        job("2026-12-06T08:55:00Z", "2026-12-06T09:10:00Z", "0"),  # overlaps its end: 10 more minutes
        job("2026-12-06T11:00:00Z", "2026-12-06T11:45:00Z", "0,1"),
        job("2026-12-06T14:00:00Z", "2026-12-06T14:30:00Z", "1"),  # the second sitting, after a long pause
    ]
    sittings = [{"sitting": 1, "from_utc": "2026-12-06T08:00:00Z"}, {"sitting": 2, "from_utc": "2026-12-06T10:00:00Z"}]
    time = report_module.machine_time(ledger, sittings)
    assert time["sittings"] == {"1": 70.0, "2": 75.0}
    assert time["wall_minutes"] == 145.0
    assert time["core_minutes"] == 60 + 20 + 15 + 2 * 45 + 30
    with pytest.raises(SystemExit, match="before the first sitting"):
        report_module.machine_time(ledger, sittings[1:])
