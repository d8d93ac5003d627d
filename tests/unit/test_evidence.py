"""bench/evidence.py: the guided configuration the studies make the default, on hand-made study reports."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trl_guided import GuidedGRPOConfig

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("evidence", ROOT / "bench" / "evidence.py")
evidence = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evidence)

PLAIN = {"guidance": False}
SCOPE = {"guidance": True, "guidance_loss_scope": "guidance"}
POSTFIX = {"guidance": True, "guidance_loss_scope": "guidance_postfix"}
SPO = {"guidance": True, "guidance_loss_scope": "low_prob"}


def arm(overrides: dict, difference: float | None = None, ci: tuple[float, float] | None = None, **extra) -> dict:
    entry = {"overrides": overrides, "seeds": [0, 1, 2], **extra}
    if difference is not None:
        entry["difference_to_plain"], entry["difference_to_plain_ci95"] = difference, list(ci)
    return entry


def study(**arms) -> dict:
    return {"arms": {"plain": arm(PLAIN), **arms}}


def test_the_best_lower_bound_wins_when_it_beats_plain_in_every_study():
    studies = {
        "arithmetic": study(guided=arm(SCOPE, -0.16, (-0.21, -0.10)), post=arm(POSTFIX, 0.02, (0.01, 0.04))),
        "regime": study(
            guided=arm(SCOPE, 0.30, (0.20, 0.40)),  # the best here, but it loses on arithmetic
            post=arm({**POSTFIX, "learning_rate": 8e-6}, 0.10, (0.03, 0.17)),  # the rate is not part of it
            spo=arm(SPO, 0.20, (0.15, 0.25)),  # only in one study
        ),
    }
    result = evidence.rule_winner(studies)
    assert result["beats_plain"] and result["winner"]["overrides"] == POSTFIX
    assert result["winner"]["arms"] == {"arithmetic": "post", "regime": "post"}
    assert result["winner"]["lower_bound"] == pytest.approx(0.01)  # the worse of the two studies
    assert result["winner"]["difference"] == pytest.approx(0.02)
    assert [c["overrides"] for c in result["ranking"]] == [POSTFIX, SCOPE]  # spo: not in every study
    # Ranked over the studies that hold them, spo's bound (0.15) is the best.
    assert evidence.rule_winner(studies, require_all=False)["winner"]["overrides"] == SPO


def test_when_nothing_beats_plain_the_one_that_loses_least_wins():
    studies = {
        "a": study(
            guided=arm(SCOPE, -0.05, (-0.30, 0.20)),  # loses least on average, with the widest interval
            post=arm(POSTFIX, -0.08, (-0.12, -0.04)),  # the better lower bound
        )
    }
    result = evidence.rule_winner(studies)
    assert not result["beats_plain"] and result["winner"]["overrides"] == SCOPE
    assert "loses least" in result["rule"]


def test_an_older_report_gives_its_differences_through_the_pairs():
    report = {
        "arms": {"plain": arm(PLAIN), "guided_postfix": arm(POSTFIX)},
        "pairs": {"plain - guided_postfix": {"difference": -0.007, "ci95": [-0.065, 0.053]}},
    }
    difference, ci = evidence.difference_to_plain(report, "guided_postfix")
    assert difference == pytest.approx(0.007) and ci == pytest.approx([-0.053, 0.065])
    assert evidence.rule_winner({"old": report})["winner"]["lower_bound"] == pytest.approx(-0.053)


def test_no_candidate_is_one_clear_error():
    with pytest.raises(ValueError, match="in every study"):
        evidence.rule_winner({"a": study(guided=arm(SCOPE, 0.1, (0.0, 0.2))), "b": study(spo=arm(SPO, 0.1, (0, 0.2)))})
    unfinished = study(guided={**arm(SCOPE, 0.1, (0.0, 0.2)), "seeds": []})
    with pytest.raises(ValueError):
        evidence.rule_winner({"a": unfinished})


def test_default_mismatches_lists_the_fields_a_config_does_not_have():
    class Config:
        guidance = True
        guidance_loss_scope = "guidance"
        learning_rate = 1e-6

    assert evidence.default_mismatches({**POSTFIX, "learning_rate": 8e-6}, Config()) == {
        "guidance_loss_scope": ("guidance", "guidance_postfix")
    }
    assert evidence.default_mismatches(SCOPE, Config()) == {}


def test_command_line_prints_the_winner(tmp_path):
    path = tmp_path / "study.json"
    path.write_text(json.dumps(study(post=arm(POSTFIX, 0.02, (0.01, 0.04)))))
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "evidence.py"), str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["winner"]["arms"] == {"study": "post"}


# Guide-GRPO's own setting, kept as a recipe that reproduces the method (docs/training.md).
NAMED_METHOD_RECIPES = {"qwen2.5-1.5b-instruct/gsm8k_guided.yaml"}


def study_reports() -> dict[str, dict]:
    """The guided-vs-plain studies that have run: bench/learning.json (one-step arithmetic),
    bench/learning_regime.json and bench/learning_decisive.json (instruction following)."""
    paths = [ROOT / "bench" / name for name in ("learning.json", "learning_regime.json", "learning_decisive.json")]
    return {path.stem: json.loads(path.read_text()) for path in paths if path.exists()}


def test_the_default_and_the_recipes_are_the_rules_winner(tmp_path):

    winner = evidence.rule_winner(study_reports())["winner"]["overrides"]
    default = GuidedGRPOConfig(output_dir=str(tmp_path))
    assert evidence.default_mismatches(winner, default) == {}, "apply the rule: docs/training.md"
    for recipe in sorted((ROOT / "recipes").glob("*/*.yaml")):
        name = f"{recipe.parent.name}/{recipe.name}"
        fields = yaml.safe_load(recipe.read_text())
        if not fields.get("guidance") or name in NAMED_METHOD_RECIPES:
            continue
        differing = {key: fields[key] for key in winner if key in fields and fields[key] != winner[key]}
        assert not differing, f"{name} sets {differing}, the rule's winner is {winner}"
