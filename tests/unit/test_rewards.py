"""Rewards on hand-written cases (right, wrong, malformed, adversarial) and property tests that nothing raises."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_guided.data import DataError, load_task
from trl_guided.rewards import (
    REWARD_FUNCS,
    arithmetic_accuracy,
    countdown,
    evaluate_equation,
    extract_answer,
    get_reward,
    gsm8k_accuracy,
    math_accuracy,
    soft_format,
    strict_format,
    xml_count,
)


def chat(text):
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The total is #### 1,234", Fraction(1234)),
        ("She pays $18 in all.", Fraction(18)),
        ("<answer>18.0</answer>", Fraction(18)),
        ("<think>3+4=7, 7*2=14</think>\n<answer>\n14\n</answer>", Fraction(14)),
        ("First 5 apples, then 7 more, so the answer is 12.", Fraction(12)),
        ("\\boxed{3/4}", Fraction(3, 4)),
        ("It drops to -3 degrees.", Fraction(-3)),
        ("3 + 4 = 7\n7 * 2 = 14\nAnswer: 14", Fraction(14)),
        ("Step 1: 5 - 9 = -4\n**Answer:** -4", Fraction(-4)),
        ("Answer: 12\nCheck: 3 + 4 = 7, 7 + 5 = 12 so we have 99 left", Fraction(12)),  # the Answer line wins
        ("no numbers here", None),
        ("", None),
        ("9" * 500, None),  # a huge number is not an answer
    ],
)
def test_answer_extraction(text, expected):
    assert extract_answer(text) == expected


def test_gsm8k_accuracy_right_wrong_malformed_and_bad_gold():
    gold = "Natalia sold 48/2 = 24 clips in May.\n#### 72"
    completions = [chat("So she sold 72 clips."), chat("#### 71"), chat("¯\\_(ツ)_/¯"), "#### 72", chat("72")]
    assert gsm8k_accuracy(completions, [gold] * 5) == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert gsm8k_accuracy([chat("#### 5")], ["#### five"]) == [None]
    assert gsm8k_accuracy([chat("#### 1,234")], ["#### 1234"]) == [1.0]


def test_arithmetic_accuracy():
    assert arithmetic_accuracy([chat("<answer>-6</answer>"), chat("<answer>6</answer>")], ["-6", "-6"]) == [1.0, 0.0]
    assert arithmetic_accuracy([chat("<answer>1</answer>")], ["not a number"]) == [None]


def test_math_accuracy_uses_math_verify():
    completions = [chat("The answer is $\\boxed{\\frac{1}{2}}$"), chat("$\\boxed{0.5}$"), chat("\\boxed{3}"), chat("")]
    assert math_accuracy(completions, ["$\\frac{1}{2}$"] * 4) == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "answer, reward",
    [
        ("<answer>(1 + 2) * 3 - 4</answer>", 1.0),  # 5 with each number once
        ("<answer>3 * (2 + 1) - 4</answer>", 1.0),
        ("<answer>(1 + 2) * 3</answer>", 0.0),  # 4 not used
        ("<answer>(1 + 2) * 3 - 4 + 4</answer>", 0.0),  # 4 used twice
        ("<answer>1 + 2 + 3 + 4</answer>", 0.0),  # wrong value
        ("<answer>(1 + 2) ** 3 - 4</answer>", 0.0),  # power is not allowed
        ("<answer>__import__('os').system('echo pwned')</answer>", 0.0),
        ("<answer>(1 + 2) * 3 - 4 / 0</answer>", 0.0),
        ("<answer>" + "(" * 150 + "1" + ")" * 150 + "</answer>", 0.0),
        ("<answer>(1 + 2) * 3 - 4 = 5</answer>", 1.0),  # a trailing "= target" is fine
        ("(1+2)*3-4", 1.0),  # no tags: the last line
        ("<answer>１ + 2</answer>", 0.0),  # unicode digits are not accepted
    ],
)
def test_countdown_checker(answer, reward):
    assert countdown([chat(answer)], [[1, 2, 3, 4]], [5]) == [reward]


def test_evaluate_equation_is_exact():
    assert evaluate_equation("7 / 3 * 3") == (Fraction(7), [7, 3, 3])
    assert evaluate_equation("-1 + 2") is None  # unary minus is not an allowed operator


def test_format_rewards():
    good = "<think>\nreason\n</think>\n<answer>\n42\n</answer>"
    sloppy = "<think>reason</think> <answer>42</answer>"
    assert strict_format([good, sloppy, ""]) == [1.0, 0.0, 0.0]
    assert soft_format([good, sloppy, "<answer>42</answer>"]) == [1.0, 1.0, 0.0]
    assert xml_count([good])[0] == pytest.approx(0.5)
    assert xml_count([good + "\ntrailing junk"])[0] < 0.5
    assert xml_count(["nothing"]) == [0.0]


def test_registry_names_trl_builtins_and_import_paths():
    for name in ("gsm8k_accuracy", "math_accuracy", "countdown", "arithmetic_accuracy", "strict_format"):
        assert name in REWARD_FUNCS
    for name in ("soft_format", "xml_count", "length", "smooth_length", "accuracy_reward", "think_format_reward"):
        assert name in REWARD_FUNCS
    assert get_reward("think_format_reward")(completions=[chat("<think>\nx\n</think>\ny")]) == [1.0]
    imported = get_reward("trl_guided.rewards.strict_format")
    assert imported.__name__ == "strict_format"
    with pytest.raises(ValueError, match="cannot be imported"):
        get_reward("trl_guided.rewards.nope")


def test_a_bug_in_a_reward_names_the_function():
    reward = get_reward("gsm8k_accuracy")
    with pytest.raises(RuntimeError, match="Reward function 'gsm8k_accuracy' failed"):
        reward([chat("1")])  # the `answer` column is missing: a bug in the setup, not in the model output


anything = st.one_of(st.text(max_size=300), st.builds(chat, st.text(max_size=300)))


@settings(max_examples=300, deadline=None)
@given(completion=anything, gold=st.text(max_size=50), nums=st.lists(st.integers(0, 200), max_size=5))
def test_no_input_raises(completion, gold, nums):
    for name, columns in [
        ("gsm8k_accuracy", {"answer": [gold]}),
        ("arithmetic_accuracy", {"answer": [gold]}),
        ("countdown", {"nums": [nums], "target": [7]}),
        ("strict_format", {}),
        ("soft_format", {}),
        ("xml_count", {}),
        ("length", {}),
        ("smooth_length", {}),
    ]:
        values = get_reward(name)([completion], **columns)
        assert len(values) == 1 and (values[0] is None or isinstance(values[0], float))


def test_generated_tasks_are_deterministic_and_solvable():
    first, again = load_task("countdown", size=50, seed=3), load_task("countdown", size=50, seed=3)
    assert first["nums"] == again["nums"] and first["target"] == again["target"]
    assert load_task("countdown", "test", size=50, seed=3)["nums"] != first["nums"]
    solutions = [chat(f"<answer>{s}</answer>") for s in first["solution"]]
    assert countdown(solutions, first["nums"], first["target"]) == [1.0] * 50
    arithmetic = load_task("arithmetic", size=50, seed=1)
    assert arithmetic["answer"] == load_task("arithmetic", size=50, seed=1)["answer"]
    exact = [chat(f"<answer>{a}</answer>") for a in arithmetic["answer"]]
    assert arithmetic_accuracy(exact, arithmetic["answer"]) == [1.0] * 50
    for row in arithmetic.select(range(10)):
        assert row["prompt"][-1]["content"].startswith(f"Evaluate {row['expression']}")


def test_hub_tasks_load_from_local_files(tmp_path):
    import json

    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_text(json.dumps({"question": "2 + 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    rows = load_task("gsm8k", "train", dataset_path=str(gsm8k))
    assert rows[0]["prompt"][-1] == {"role": "user", "content": "2 + 3?"}
    assert gsm8k_accuracy([chat("So 5.\n#### 5")], rows["answer"]) == [1.0]

    math = tmp_path / "math.jsonl"
    math.write_text(json.dumps({"problem": "Half of 1?", "answer": "\\frac{1}{2}"}) + "\n")
    rows = load_task("math", "test", dataset_path=str(math))
    assert rows[0]["solution"] == "$\\frac{1}{2}$"
    assert math_accuracy([chat("\\boxed{0.5}")], rows["solution"]) == [1.0]

    tldr = tmp_path / "tldr.jsonl"
    tldr.write_text(
        json.dumps({"prompt": "SUBREDDIT: r/cats\nPOST: my cat sleeps all day.\nTL;DR:", "completion": "x"})
    )
    rows = load_task("tldr", "train", dataset_path=str(tldr))
    assert rows[0]["prompt"][0]["role"] == "system" and rows[0]["prompt"][1]["content"].startswith("SUBREDDIT")

    with pytest.raises(ValueError, match=r"lacks column\(s\) \['question'\]"):
        load_task("gsm8k", dataset_path=str(math))
    with pytest.raises(DataError, match="dataset_path=.* does not exist"):
        load_task("tldr", dataset_path=str(tmp_path / "missing.jsonl"))


def test_hub_task_offline_says_to_use_a_local_file(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="the Hub is off .*: set dataset_name to a local copy") as error:
        load_task("gsm8k", "train")
    assert "\n" not in str(error.value)


def test_own_reward_module_in_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_task.py").write_text(
        "def reward_polite(completions, **kwargs):\n"
        "    return [float('please' in c[0]['content'].lower()) for c in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    reward = get_reward("my_task.reward_polite")
    assert reward.__name__ == "reward_polite"
    assert reward([chat("Please sit."), chat("Sit.")]) == [1.0, 0.0]


def test_arithmetic_steps_mode():
    rows = load_task("arithmetic", size=30, seed=3, mode="steps", terms=4)
    assert rows["expression"] == load_task("arithmetic", size=30, seed=3, terms=4)["expression"]
    assert rows[0]["prompt"][-1]["content"].startswith(f"Evaluate {rows[0]['expression']} step by step.")
    assert "'Answer: N'" in rows[0]["prompt"][-1]["content"]
    worked = [chat(f"Step 1: 1 + 2 = 3\nStep 2: 3 * 4 = 12\nAnswer: {a}") for a in rows["answer"]]
    assert arithmetic_accuracy(worked, rows["answer"]) == [1.0] * 30
    gold = ["-3"]
    for text, reward in [
        ("(7 - 4) = 3\n3 - 6 = -3\nAnswer: -3", 1.0),
        ("7 - 4 = 3\n3 - 6 = -3\n\n**Answer:** -3", 1.0),
        ("7 - 4 = 3\n3 - 6 = -3\nAnswer: 3\nSo the result is -3.", 0.0),  # the Answer line is the answer
        ("7 - 4 = 3\n3 - 6 = -3", 1.0),  # no Answer line: the last number
        ("Answer:", 0.0),
    ]:
        assert arithmetic_accuracy([chat(text)], gold) == [reward], text


def test_arithmetic_expand_mode():
    rows = load_task("arithmetic", size=30, seed=2, mode="expand")
    assert rows["answer"] == load_task("arithmetic", size=30, seed=2, mode="expand")["answer"]
    assert rows[0]["prompt"][-1]["content"].startswith(f"Expand {rows[0]['expression']}")
    exact = [chat(f"<answer>{a}</answer>") for a in rows["answer"]]
    assert arithmetic_accuracy(exact, rows["answer"]) == [1.0] * 30
    copied = [chat(f"<answer>{e}</answer>") for e in rows["expression"]]
    assert arithmetic_accuracy(copied, rows["answer"]) == [0.0] * 30  # the unexpanded product is not an answer
    gold = ["6x^2 + 5x - 4"]
    for text, reward in [
        ("<answer>6x^2+5x-4</answer>", 1.0),
        ("<answer>5x + 6*x**2 - 4</answer>", 1.0),
        ("<answer>6x^2 + 5x + 4</answer>", 0.0),
        ("<answer>x**99999</answer>", 0.0),
        ("<answer>__import__('os')</answer>", 0.0),
        ("6x^2 + 5x - 4", 1.0),
    ]:
        assert arithmetic_accuracy([chat(text)], gold) == [reward], text
    with pytest.raises(ValueError, match="arithmetic mode='factor'"):
        load_task("arithmetic", mode="factor")
