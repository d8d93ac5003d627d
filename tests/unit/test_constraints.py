"""Instruction constraints: every kind on hand-written passing and failing answers, hostile answers, bad specs; the
instructions task (split, uniqueness, loading) and its rewards."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from trl_guided.constraints import KINDS, ConstraintError, check, describe, parse_specs, split_sentences, validate
from trl_guided.data import load_task
from trl_guided.rewards import constraints_all_followed, constraints_followed, get_reward

ROOT = Path(__file__).resolve().parents[2]
BULLETS = "Here you go:\n* first point\n* second point\n- third point"
PROSE = "The sea is wide. It is deep! Is it cold? Dr. Smith says yes, e.g. in winter."

# kind -> (spec, answers that follow it, answers that do not)
CASES = {
    "include_keywords": (
        {"kind": "include_keywords", "keywords": ["river", "light"]},
        ["The River shone in the light.", "light... and a river"],
        ["The river was dark.", "Lightning over the riverbank."],
    ),
    "avoid_word": (
        {"kind": "avoid_word", "word": "very"},
        ["It was extremely cold.", "Every day is new."],
        ["It was very cold.", "VERY nice", "so very-very good"],
    ),
    "min_sentences": (
        {"kind": "min_sentences", "n": 4},
        [PROSE, "One.\nTwo\nThree three.\nFour"],
        ["The sea is wide. It is deep.", "Mr. Brown met Dr. Who at St. Paul's, e.g. on Monday. Then left."],
    ),
    "max_sentences": (
        {"kind": "max_sentences", "n": 2},
        ["Pi is 3.14 and e is 2.72. That is all", "Prices rose, i.e. by 5 percent."],
        [PROSE, "One. Two. Three."],
    ),
    "bullet_points": (
        {"kind": "bullet_points", "n": 3},
        [BULLETS, "* a\n* b\n  * c"],
        ["* a\n* b", BULLETS + "\n* fourth", "**bold** text\n*emphasis*"],
    ),
    "min_words": (
        {"kind": "min_words", "n": 5},
        ["one two three four five", "it's a well-known fact, friends"],
        ["one two three four", "— ... !!! 1 2"],
    ),
    "max_words": (
        {"kind": "max_words", "n": 3},
        ["Short and sweet.", "don't stop now"],
        ["This has far too many words.", "a b c d"],
    ),
    "start_with": (
        {"kind": "start_with", "phrase": "Once upon a time"},
        ["Once upon a time, a cat.", "  ## once upon a time there was"],
        ["There was once upon a time.", "Once upon"],
    ),
    "end_with": (
        {"kind": "end_with", "phrase": "Any other questions?"},
        ["Bees make honey. Any other questions?", "Done. any other questions?\n\n"],
        ["Any other questions? Bye.", "Any other questions"],
    ),
    "lowercase": (
        {"kind": "lowercase"},
        ["all small letters here, 42 times.", "ünïcödé façade"],
        ["Capital start.", "all small but one: Élan"],
    ),
    "no_commas": (
        {"kind": "no_commas"},
        ["No commas here.", "Semicolons; dashes — fine"],
        ["Well, no.", "full-width，comma"],
    ),
    "title": (
        {"kind": "title"},
        ["<<The Sea>>\nIt is wide.", "A poem <<moon song>> follows."],
        ["<The Sea>", "<<>> empty", "<<broken\ntitle>>"],
    ),
    "postscript": (
        {"kind": "postscript"},
        ["Bye.\nP.S. Call me.", "Bye.\n\np.s. see you"],
        ["Bye. P.S. inline only", "PS call me"],
    ),
    "json": (
        {"kind": "json"},
        ['{"topic": "sea", "lines": 2}', '```json\n{"a": [1, 2]}\n```', "[1, 2, 3]"],
        ['{"a": 1', "Here is JSON: {}", '"just a string"', "42", "```json\n{'a': 1}\n```"],
    ),
}


def test_every_kind_has_hand_written_cases():
    assert set(CASES) == set(KINDS)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_kind_passes_and_fails_the_hand_written_answers(kind):
    spec, passing, failing = CASES[kind]
    assert validate(spec) is spec
    assert describe(spec)
    for text in passing:
        assert check(spec, text), (kind, text)
    for text in failing:
        assert not check(spec, text), (kind, text)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_hostile_answers_never_raise_and_empty_follows_nothing(kind):
    spec = CASES[kind][0]
    for text in ("", "   \n\t", "...!?", "\x00\ufeff"):
        assert check(spec, text) is False, (kind, repr(text))
    hostile = [
        "word " * 200_000,
        "(" * 50_000,
        "{" * 20_000 + "}" * 20_000,
        "[" * 100_000,
        "🙂 日本語の文。 Ελληνικά! " * 1000,
        "\n" * 100_000 + "x",
        "<<" * 50_000,
        "p." * 50_000,
        "a. " * 100_000,
    ]
    for text in hostile:
        assert check(spec, text) in (True, False)


def test_sentence_splitter_offline_rules():
    assert split_sentences(PROSE) == [
        "The sea is wide.",
        "It is deep!",
        "Is it cold?",
        "Dr. Smith says yes, e.g. in winter.",
    ]
    assert split_sentences('He said "stop." Then he left...  Fine') == ['He said "stop."', "Then he left...", "Fine"]
    assert split_sentences("I play the piano. It is fun.") == ["I play the piano.", "It is fun."]
    assert split_sentences("") == []


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"kind": "shout"}, "unknown kind 'shout'"),
        ({"n": 3}, 'with a "kind"'),
        ("lowercase", 'with a "kind"'),
        ({"kind": "min_words"}, "min_words takes the parameters n (int)"),
        ({"kind": "min_words", "n": "50"}, "n must be a non-negative integer"),
        ({"kind": "min_words", "n": -1}, "n must be a non-negative integer"),
        ({"kind": "min_words", "n": True}, "n must be a non-negative integer"),
        ({"kind": "lowercase", "strict": True}, "lowercase takes the parameters none"),
        ({"kind": "avoid_word", "word": "  "}, "word must be a non-empty string"),
        ({"kind": "include_keywords", "keywords": []}, "non-empty list of words"),
        ({"kind": "include_keywords", "keywords": ["a", 3]}, "non-empty list of words"),
    ],
)
def test_a_bad_spec_is_one_clear_error(spec, message):
    with pytest.raises(ConstraintError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(spec)


def test_parse_specs_reads_json_and_refuses_the_rest():
    assert parse_specs('[{"kind": "title"}]') == [{"kind": "title"}]
    for bad, message in (("[{", "not valid JSON"), ("[]", "non-empty JSON list"), ('{"kind": "title"}', "list")):
        with pytest.raises(ConstraintError, match=message):
            parse_specs(bad)


def test_rewards_give_partial_and_strict_credit_and_name_a_bad_spec():
    specs = json.dumps([{"kind": "lowercase"}, {"kind": "no_commas"}, {"kind": "min_words", "n": 3}])
    completions = [
        [{"role": "assistant", "content": "all lower no commas here"}],
        [{"role": "assistant", "content": "Upper, and commas"}],
        [{"role": "assistant", "content": "lower, with commas"}],
    ]
    assert constraints_followed(completions, [specs] * 3) == [1.0, 1 / 3, 2 / 3]
    assert constraints_all_followed(completions, [specs] * 3) == [1.0, 0.0, 0.0]
    reward = get_reward("constraints_followed")
    with pytest.raises(RuntimeError, match="constraints_followed.*unknown kind 'shout'"):
        reward(completions[:1], constraints=['[{"kind": "shout"}]'])


def test_instructions_task_splits_by_prompt_with_enough_unique_test_problems():
    train = load_task("instructions", "train", size=300, seed=0)
    test = load_task("instructions", "test", size=250, seed=0)
    test_prompts = [row[-1]["content"] for row in test["prompt"]]
    assert len(test) == 250 and len(set(test_prompts)) == 250
    assert not set(test_prompts) & {row[-1]["content"] for row in train["prompt"]}
    for prompt, constraints in zip(test["prompt"], test["constraints"], strict=True):
        specs = parse_specs(constraints)
        assert 1 <= len(specs) <= 3
        assert all(describe(spec) in prompt[-1]["content"] for spec in specs)
    assert load_task("instructions", "test", size=250, seed=0).to_list() == test.to_list()
    assert load_task("instructions", "test", size=20, seed=1).to_list() != test.select(range(20)).to_list()


def test_instructions_from_a_file_and_a_bad_row_is_one_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"instruction": "Write about tea.", "constraints": '[{"kind": "title"}]'}) + "\n")
    rows = load_task("instructions", "train", dataset_path=str(good))
    assert rows[0]["prompt"][-1]["content"] == "Write about tea." and rows[0]["constraints"] == '[{"kind": "title"}]'
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + json.dumps({"instruction": "x", "constraints": '[{"kind": "max_words"}]'}))
    with pytest.raises(ValueError, match=r"bad.jsonl row 1: constraint .*max_words takes the parameters n \(int\)"):
        load_task("instructions", "train", dataset_path=str(bad))


def _bench_answer_position():
    spec = importlib.util.spec_from_file_location("answer_position", ROOT / "bench" / "answer_position.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_answer_position_finds_where_each_constraint_is_decided():
    module = _bench_answer_position()

    def decided(spec, text):  # one token per character
        return module.constraint_decisions(spec, [text[: i + 1] for i in range(len(text))])

    assert decided({"kind": "include_keywords", "keywords": ["river"]}, "The river flows.") == (8, "passed")
    assert decided({"kind": "avoid_word", "word": "very"}, "It is very cold") == (9, "failed")
    assert decided({"kind": "avoid_word", "word": "very"}, "It is cold") == (None, "kept")
    assert decided({"kind": "lowercase"}, "Upper") == (0, "failed")
    assert decided({"kind": "min_words", "n": 5}, "one two") == (None, "never_met")
    assert decided({"kind": "end_with", "phrase": "bye."}, "ok bye.") == (6, "passed")
    assert decided({"kind": "max_words", "n": 2}, "one two three") == (8, "failed")
    steps = "3 + 4 = 7\n7 * 2 = 14\nAnswer: 14"
    assert module.answer_start(steps) == len(steps) - 2


@pytest.mark.parametrize(
    "recipe", ["smollm2-135m-instruct/instructions_cpu.yaml", "qwen2.5-1.5b-instruct/arithmetic_steps.yaml"]
)
def test_trl_guided_eval_runs_on_the_new_recipes(tiny_llama, tmp_path, recipe):
    from trl_guided import cli

    output = tmp_path / "result.json"
    argv = ["eval", "--config", str(ROOT / "recipes" / recipe), "--model", tiny_llama]
    argv += ["--limit", "3", "--max-new-tokens", "6", "--quality-model", "none", "--no-progress"]
    assert cli.main([*argv, "--output", str(output)]) == 0
    metrics = json.loads(output.read_text())["metrics"]
    rewards = ["instruction_following", "constraints_followed", "constraints_all_followed"]
    rewards = rewards if "instructions" in recipe else ["arithmetic_accuracy"]
    assert all(0.0 <= metrics[f"{name}/mean"]["value"] <= 1.0 for name in rewards)
    assert metrics["completion_tokens"]["value"] <= 6


def test_constraint_kinds_tallies_each_kind_per_record_file(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # constraint_kinds imports its sibling answer_position
    spec = importlib.util.spec_from_file_location("constraint_kinds", ROOT / "bench" / "constraint_kinds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    specs = [
        [{"kind": "lowercase"}, {"kind": "avoid_word", "word": "very"}],
        [{"kind": "lowercase"}],
    ]
    records = [
        {"problem_id": "0-aa", "completion": "it is very cold", "truncated": False},
        {"problem_id": "1-bb", "completion": [{"role": "assistant", "content": "Upper case here"}], "truncated": True},
    ]
    assert module.tally(records, specs) == {
        "kinds": {"avoid_word": [0, 1], "lowercase": [1, 2]},
        "truncated": 0.5,
        "median_words": 4,
    }
