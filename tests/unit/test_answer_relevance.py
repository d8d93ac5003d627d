"""The relevance check of bench/answer_relevance.py: which task topic a request names, and whether an answer names it
(whole words, plural endings, the longest topic), on hand-written answers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from answer_relevance import TOPIC_WORDS, on_topic, relevance_by_problem, request_topic  # noqa: E402

from trl_guided.data import INSTRUCTION_TOPICS  # noqa: E402


def record(request: str, answer: str, problem: str = "0-a", followed: float = 1.0) -> dict:
    prompt = [{"role": "system", "content": "Follow every instruction."}, {"role": "user", "content": request}]
    rewards = {"constraints_followed": followed}
    return {"problem_id": problem, "prompt": prompt, "completion": answer, "rewards": rewards}


def test_every_topic_of_the_task_has_its_words():
    assert set(TOPIC_WORDS) == set(INSTRUCTION_TOPICS)


def test_the_request_names_its_topic():
    assert request_topic("Give a beginner some advice about honey bees. End with P.S.") == "honey bees"
    assert request_topic([{"role": "user", "content": "Write a short story about a lost umbrella."}]) == (
        "a lost umbrella"
    )
    with pytest.raises(ValueError, match="no topic"):
        request_topic("Write a poem about nothing in particular.")


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Bees make honey in their hive.", True),
        ("A BEE visits flowers.", True),  # any case
        ("P.S. I hope this helps.", False),  # the answer that games the postscript constraint
        ("I had a beer at the beach.", False),  # whole words only: "beer" is not "bee"
    ],
)
def test_an_answer_is_on_topic_when_it_names_the_topic(answer, expected):
    assert on_topic(record("Give a beginner some advice about honey bees.", answer)) is expected


def test_per_problem_scores_average_the_samples_and_zero_the_reward_off_topic():
    records = [
        record("Describe coffee in a few sentences.", "Coffee is brewed.", followed=0.5),
        record("Describe coffee in a few sentences.", "Tea is nice.", followed=1.0),
        record("Describe the moon in a few sentences.", "The Moon is bright.", problem="1-b", followed=0.0),
    ]
    scores = relevance_by_problem(records, "constraints_followed")
    assert scores == {
        "0-a": {"on_topic": 0.5, "followed_on_topic": 0.25},
        "1-b": {"on_topic": 1.0, "followed_on_topic": 0.0},
    }
