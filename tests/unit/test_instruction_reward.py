"""The `instruction_following` reward (trl_guided/instruction_reward.py): gamed answers built by program for every
test problem of the instructions task (bench/instruction_gaming.py) earn far less than the starting model's own
answers (the committed decisive-study records), for every constraint kind; genuine answers keep most of their
checker score; the pieces (request, subject, substance, relevance) on small inputs."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from answer_relevance import on_topic  # noqa: E402
from constraint_kinds import answer_text, problem_specs  # noqa: E402
from instruction_gaming import VARIED_FILLER, attack_answers, content_free, loop, scores  # noqa: E402

from trl_guided.constraints import KINDS, followed, words  # noqa: E402
from trl_guided.data import load_instructions  # noqa: E402
from trl_guided.evaluate import read_records  # noqa: E402
from trl_guided.instruction_reward import (  # noqa: E402
    RELEVANCE_FULL,
    new_content_words,
    relevance,
    request_text,
    subject_text,
    substance,
    substance_target,
)
from trl_guided.rewards import get_reward  # noqa: E402

START_RECORDS = ROOT / "bench" / "decisive" / "phase1" / "start" / "eval_start.jsonl"
PLAIN_GRPO_RECORDS = ROOT / "bench" / "decisive" / "phase2" / "plain-s43" / "eval_end.jsonl"
LONG = 40  # words: the genuine answers the done criterion compares with


@pytest.fixture(scope="module")
def study():
    """The starting model's greedy answers to the 400 test problems, their constraints, and every answer's scores."""
    records = read_records(START_RECORDS)
    specs = problem_specs(load_instructions(split="test", size=400, seed=0))
    rows = [specs[int(r["problem_id"].split("-", 1)[0])] for r in records]
    genuine = scores(records, specs, [answer_text(r) for r in records])
    attacks = {name: scores(records, specs, answers) for name, answers in attack_answers(records, specs).items()}
    return records, rows, genuine, attacks


def _long(records) -> list[int]:
    return [i for i, r in enumerate(records) if len(words(answer_text(r))) >= LONG]


def test_the_content_free_answers_really_follow_every_constraint(study):
    """The attack is real: the checker gives the built answers full marks on (almost) every problem."""
    records, rows, _, attacks = study
    for name in ("content_free", "content_free_varied"):
        full = sum(v == 1.0 for v in attacks[name]["constraints_followed"])
        assert full >= 0.9 * len(records), (name, full)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_content_free_answers_that_follow_a_kind_earn_far_less_than_genuine_answers(study, kind):
    records, rows, genuine, attacks = study
    for name, filler in (("content_free", ("Okay",)), ("content_free_varied", VARIED_FILLER)):
        problems = [i for i, specs in enumerate(rows) if any(s["kind"] == kind for s in specs)]
        assert problems, kind
        follows = [
            i
            for i in problems
            if followed([s for s in rows[i] if s["kind"] == kind], content_free(rows[i], filler))[0]
        ]
        assert len(follows) >= 0.9 * len(problems), (kind, name)
        attack = statistics.fmean(attacks[name]["instruction_following"][i] for i in follows)
        honest = statistics.fmean(genuine["instruction_following"][i] for i in follows)
        assert attack <= 0.2 * honest, (kind, name, attack, honest)


def test_done_criterion_content_free_at_most_half_and_below_the_genuine_answer_on_80_percent(study):
    records, _, genuine, attacks = study
    long = _long(records)
    mean_genuine = statistics.fmean(genuine["instruction_following"])
    for name in ("content_free", "content_free_varied"):
        attack = attacks[name]["instruction_following"]
        assert statistics.fmean(attack) <= 0.5 * mean_genuine
        below = sum(attack[i] < genuine["instruction_following"][i] for i in long)
        assert below >= 0.8 * len(long), (name, below, len(long))


@pytest.mark.parametrize("name", ["off_topic", "loop", "echo"])
def test_other_topics_loops_and_echoes_earn_far_less_than_genuine_answers(study, name):
    records, _, genuine, attacks = study
    long = _long(records)
    attack = attacks[name]["instruction_following"]
    assert statistics.fmean(attack) <= 0.35 * statistics.fmean(genuine["instruction_following"]), name
    assert sum(attack[i] < genuine["instruction_following"][i] for i in long) >= 0.8 * len(long), name


def test_genuine_on_topic_answers_keep_most_of_their_checker_score(study):
    """Margin: the starting model's on-topic answers of 40+ words keep at least 85 % of their `constraints_followed`
    on average (measured 0.93), and three in five keep at least 80 % each."""
    records, _, genuine, _ = study
    topical = [i for i in _long(records) if on_topic(records[i]) and genuine["constraints_followed"][i] > 0]
    kept = [genuine["instruction_following"][i] / genuine["constraints_followed"][i] for i in topical]
    assert statistics.fmean(kept) >= 0.85
    assert sum(k >= 0.8 for k in kept) >= 0.6 * len(kept)


def test_plain_grpos_gamed_answers_lose_what_the_checker_paid(study):
    """Plain GRPO's short answers after training ("P.S. I hope this helps.") that the checker paid in full."""
    _, _, genuine, _ = study
    records = read_records(PLAIN_GRPO_RECORDS)
    specs = problem_specs(load_instructions(split="test", size=400, seed=0))
    gamed = [r for r in records if len(words(answer_text(r))) < 15 and r["rewards"]["constraints_followed"] == 1.0]
    assert len(gamed) >= 20
    new = scores(gamed, specs, [answer_text(r) for r in gamed])["instruction_following"]
    assert statistics.fmean(new) <= 0.5 * statistics.fmean(genuine["instruction_following"])


# ------------------------------------------------------------------------------------------------------ the pieces

REQUEST = (
    'Give a beginner some advice about honey bees. Include the keywords "garden" in your answer. '
    'At the end of your answer, add a postscript starting with "P.S."'
)
SPECS = [{"kind": "include_keywords", "keywords": ["garden"]}, {"kind": "postscript"}]
GENUINE = (
    "Honey bees are calm when they are busy, so start by watching a hive from a safe distance in your garden. Wear a "
    "veil and gloves, move slowly, and use a smoker to calm the bees. Learn to spot the queen, the drones and the "
    "workers, and check the frames for brood and stored nectar every week during spring. Plant lavender and clover "
    "nearby so the foragers find pollen close to home.\nP.S. Join a local beekeeping club to learn from experienced "
    "keepers."
)


def test_the_request_loses_its_constraints_and_the_subject_its_framing():
    chat = [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": REQUEST}]
    assert request_text(chat, SPECS) == "Give a beginner some advice about honey bees."
    assert request_text(REQUEST, SPECS) == "Give a beginner some advice about honey bees."
    assert subject_text("Give a beginner some advice about honey bees.") == "honey bees"
    assert subject_text("Write a short story.") == "Write a short story."  # nothing left: the request itself


def test_substance_counts_new_content_words_only():
    assert new_content_words("Okay. Okay. Honey bees, garden! P.S. okay", REQUEST) == set()
    assert new_content_words("Bees visit clover and lavender.", REQUEST) == {"clover", "lavender", "visit"}
    assert substance(GENUINE, REQUEST, SPECS) == 1.0
    assert substance(loop(GENUINE), REQUEST, SPECS) < 0.5
    assert substance_target([{"kind": "max_words", "n": 30}]) == 10  # a short answer is not asked for 20 words
    assert substance_target(SPECS) == 20


def test_relevance_ramps_with_the_subject_and_survives_an_answer_without_known_tokens():
    related = relevance(
        [GENUINE, "The moon orbits the earth and its craters come from impacts.", "", "!!!"], ["honey bees"] * 4
    )
    assert related[0] == 1.0 and related[1] == 0.0
    assert related[2] == related[3] == 0.0  # no token: cosine 0, never NaN
    assert 0.0 < RELEVANCE_FULL < 1.0


def test_the_registered_reward_works_outside_a_trainer_and_the_checker_stays_the_checker():
    reward, checker = get_reward("instruction_following"), get_reward("constraints_followed")
    prompts = [[{"role": "user", "content": REQUEST}]] * 3
    gamed = "garden\nP.S. I hope this helps."
    answers = [GENUINE, gamed, "Honey bees live in hives."]  # the last one follows no constraint
    columns = {"prompts": prompts, "constraints": [json.dumps(SPECS)] * 3}
    new, old = reward(answers, **columns), checker(answers, **columns)
    assert old[:2] == [1.0, 1.0] and old[2] == 0.0
    assert new[0] == pytest.approx(1.0) and new[1] < 0.1
    assert 0.0 < new[2] < new[0]  # on the request but no constraint: a little, never more than a follower
    assert reward.__name__ == "instruction_following"
