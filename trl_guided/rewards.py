"""Reward functions by name, with TRL's reward signature: `f(completions, **columns) -> list[float | None]`.

Malformed model output scores 0, never raises; `None` marks a row whose gold answer itself cannot be parsed (TRL
leaves such rows out of the reward statistics). A bug inside a reward function fails the run with its name
(`get_reward` wraps every function).
"""

from __future__ import annotations

import ast
import importlib
import math
import operator
import os
import re
import sys
from collections.abc import Callable
from fractions import Fraction

from trl import rewards as trl_rewards

from .constraints import followed, parse_specs
from .instruction_reward import ANSWER_SHARE, answer_quality, parse_rows

# ------------------------------------------------------------------------------------------------ answer extraction

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_HASHES = re.compile(r"####\s*(.+)")
_ANSWER_LINE = re.compile(r"^[ \t*#]*answer[ \t*]*:(.*)$", re.I | re.M)  # a line `Answer: 42` (also **Answer:**)
# 1,234 | 1234 | 18.0 | -3 | .5 | 3/4, with an optional $ in front; at most 40 digits (huge numbers are not answers)
_NUMBER = re.compile(
    r"(?<![\w.])-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d{1,40})(?:\.\d{1,20})?(?:/\d{1,20})?(?![\d])|-?\.\d+", re.ASCII
)


def _text(completion) -> str:
    """A completion as plain text: conversational completions are lists of messages."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return completion if isinstance(completion, str) else str(completion)


def parse_number(text: str) -> Fraction | None:
    """`"1,234"`, `"$18"`, `"18.0"`, `"-3"`, `"3/4"` -> an exact number; anything else -> None."""
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if not cleaned or len(cleaned) > 64:
        return None
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def _answer_text(text: str) -> str:
    """The inside of the last `<answer>...</answer>`, or the last line of the text."""
    tagged = _ANSWER_TAG.findall(text)
    return tagged[-1] if tagged else (text.strip().splitlines() or [""])[-1]


def last_number(text: str) -> Fraction | None:
    """The last number written in `text` (a trailing sentence such as "so the answer is $18." works)."""
    for match in reversed(_NUMBER.findall(text)):
        value = parse_number(match)
        if value is not None:
            return value
    return None


def extract_answer(text: str) -> Fraction | None:
    """The numeric answer of a completion: `<answer>...</answer>`, then `#### n`, then `\\boxed{n}`, then the last
    line `Answer: n`, then the last number of the text."""
    for pattern in (_ANSWER_TAG, _HASHES, _BOXED, _ANSWER_LINE):
        found = pattern.findall(text)
        if found:
            return last_number(found[-1])
    return last_number(text)


def gsm8k_gold(answer: str) -> Fraction | None:
    """GSM8K's gold answer: the number after `####` (or the answer itself if it is a bare number)."""
    found = _HASHES.findall(answer or "")
    return last_number(found[-1]) if found else parse_number(str(answer))


def _same(a: Fraction, b: Fraction) -> bool:
    return a == b or abs(a - b) <= Fraction(1, 10**6) * max(1, abs(b))


# ------------------------------------------------------------------------------------------------------- accuracy


def gsm8k_accuracy(completions, answer, **kwargs) -> list[float | None]:
    """1 if the completion's answer equals GSM8K's `#### n` gold answer, else 0 (None if the gold is unparseable)."""
    rewards = []
    for completion, gold_text in zip(completions, answer, strict=True):
        gold = gsm8k_gold(str(gold_text))
        predicted = extract_answer(_text(completion))
        rewards.append(None if gold is None else float(predicted is not None and _same(predicted, gold)))
    return rewards


def arithmetic_accuracy(completions, answer, **kwargs) -> list[float | None]:
    """1 if the completion's answer equals the exact `answer` column, else 0 (None if the gold is unparseable).

    A numeric gold is compared as a number; a polynomial gold in x (the `expand` mode) is compared as a polynomial
    (equal values at more points than its degree), so `6x^2 + 5x - 4` and `5x + 6*x**2 - 4` both count, but not the
    unexpanded product."""
    rewards = []
    for completion, gold_text in zip(completions, answer, strict=True):
        gold = parse_number(str(gold_text))
        if gold is not None:
            predicted = extract_answer(_text(completion))
            rewards.append(float(predicted is not None and _same(predicted, gold)))
            continue
        gold_values = _polynomial_values(str(gold_text))
        if gold_values is None:
            rewards.append(None)
            continue
        candidate = _answer_text(_text(completion))
        expanded = "(" not in candidate  # copying the unexpanded product back is not an answer
        rewards.append(float(expanded and _polynomial_values(candidate) == gold_values))
    return rewards


# ------------------------------------------------------------------------------------------------ exact arithmetic

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def exact_value(
    node: ast.AST,
    x: Fraction | None = None,
    polynomial: bool = False,
    max_constant: int = 10**9,
    numbers: list[int] | None = None,
) -> Fraction:
    """The exact value of a parsed arithmetic expression; model text is parsed with `ast`, never `eval`-ed.

    Always allowed: + - * / on integer constants below `max_constant` (each one appended to `numbers`). With
    `polynomial`: also the name `x` (bound to `x`), unary signs, float constants and constant powers 0..5. Anything
    else raises ValueError.
    """

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) < max_constant:
            if numbers is not None:
                numbers.append(node.value)
            return Fraction(node.value)
        if polynomial:
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
                power = node.right
                if isinstance(power, ast.Constant) and type(power.value) is int and 0 <= power.value <= 5:
                    return value(node.left) ** power.value
            if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
                return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
            if isinstance(node, ast.Name) and node.id == "x" and x is not None:
                return x
            if isinstance(node, ast.Constant) and type(node.value) is float and abs(node.value) < max_constant:
                return Fraction(node.value)
        raise ValueError(f"not allowed in this expression: {ast.dump(node)[:40]}")

    return value(node)


_POLYNOMIAL_CHARS = re.compile(r"^[0-9x\s+\-*/^().]+$")
_SAMPLE_POINTS = (-3, -1, 0, 2, 5, 11)  # more points than any degree <= 5 polynomial can share by chance


def _polynomial_values(expression: str) -> tuple[Fraction, ...] | None:
    """Values of a polynomial in x (`6x^2 + 5x - 4`, `(2x+1)(3x-4)`, `5*x**2`) at fixed points, or None."""
    expression = expression.strip().replace("^", "**")
    if not expression or len(expression) > 200 or not _POLYNOMIAL_CHARS.match(expression):
        return None
    expression = re.sub(r"(\d|\))\s*(?=[x(])", r"\1*", expression)  # implicit products: 6x, 2(x+1), (x+1)(x-1)
    expression = re.sub(r"x\s*(?=[(\d])", "x*", expression)

    try:
        tree = ast.parse(expression, mode="eval").body
        return tuple(exact_value(tree, x=Fraction(point), polynomial=True) for point in _SAMPLE_POINTS)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError, OverflowError):
        return None


def math_accuracy(completions, solution, **kwargs) -> list[float | None]:
    """1 if math-verify judges the completion equal to the `solution` (e.g. a `\\boxed{}` answer), else 0."""
    try:
        from math_verify import parse, verify  # optional: the `eval` extra
    except ImportError as error:
        raise ImportError("math_accuracy needs math-verify: pip install 'trl-guided[eval]'") from error
    rewards = []
    for completion, gold_text in zip(completions, solution, strict=True):
        gold = parse(str(gold_text))
        if not gold:
            rewards.append(None)
            continue
        try:
            rewards.append(float(verify(gold, parse(_text(completion)))))
        except Exception:  # math-verify raises on some malformed model output: that output is simply wrong
            rewards.append(0.0)
    return rewards


# ------------------------------------------------------------------------------------------------------- countdown

_EQUATION_CHARS = re.compile(r"^[0-9\s+\-*/().]+$")


def evaluate_equation(expression: str) -> tuple[Fraction, list[int]] | None:
    """Value and numbers of an arithmetic expression with + - * / and parentheses only, or None.

    Parsed with `ast` and evaluated node by node on exact fractions: nothing is ever `eval`-ed.
    """
    expression = expression.strip().split("=")[0].strip()
    if not expression or len(expression) > 200 or not _EQUATION_CHARS.match(expression):
        return None
    numbers: list[int] = []
    try:
        return exact_value(ast.parse(expression, mode="eval").body, max_constant=10**6, numbers=numbers), numbers
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError):
        return None


def countdown(completions, nums, target, **kwargs) -> list[float]:
    """1 if the `<answer>` equation (or the last line) uses each number of `nums` exactly once, only + - * / and
    parentheses, and equals `target`; else 0."""
    rewards = []
    for completion, numbers, goal in zip(completions, nums, target, strict=True):
        candidate = _answer_text(_text(completion))
        result = evaluate_equation(candidate)
        correct = (
            result is not None and sorted(result[1]) == sorted(int(n) for n in numbers) and result[0] == Fraction(goal)
        )
        rewards.append(float(correct))
    return rewards


# ------------------------------------------------------------------------------------------- instruction following


def constraints_followed(completions, constraints, **kwargs) -> list[float]:
    """The fraction of the row's `constraints` (a JSON list of specs, trl_guided/constraints.py) the completion
    follows: partial credit. A bad spec is an error that names it."""
    verdicts = (followed(parse_specs(specs), _text(c)) for c, specs in zip(completions, constraints, strict=True))
    return [sum(checks) / len(checks) for checks in verdicts]


def constraints_all_followed(completions, constraints, **kwargs) -> list[float]:
    """1 if the completion follows every one of the row's `constraints`, else 0 (IFEval's strict prompt-level
    score)."""
    return [
        float(all(followed(parse_specs(specs), _text(c)))) for c, specs in zip(completions, constraints, strict=True)
    ]


def instruction_following(completions, prompts, constraints, **kwargs) -> list[float]:
    """How far the completion addresses the request (relevance x substance, trl_guided/instruction_reward.py) times
    `ANSWER_SHARE + (1 - ANSWER_SHARE) x` the fraction of the row's `constraints` it follows, in [0, 1]: an answer
    made of the constraints' own words, one sentence repeated, the request echoed back or a text about another
    subject earns little however many constraints it follows."""
    specs = parse_rows(constraints)
    texts = [_text(c) for c in completions]
    quality = answer_quality(texts, list(prompts), specs)
    return [
        q * (ANSWER_SHARE + (1 - ANSWER_SHARE) * sum(checks) / len(checks))
        for q, checks in zip(quality, (followed(s, t) for s, t in zip(specs, texts, strict=True)), strict=True)
    ]


# ---------------------------------------------------------------------------------------------------------- format

_STRICT = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>\n?$", re.S)
_SOFT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.S)


def strict_format(completions, **kwargs) -> list[float]:
    """1 for exactly `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`, else 0."""
    return [float(bool(_STRICT.match(_text(c)))) for c in completions]


def soft_format(completions, **kwargs) -> list[float]:
    """1 if a `<think>...</think>` block is followed by an `<answer>...</answer>` block anywhere, else 0."""
    return [float(bool(_SOFT.search(_text(c)))) for c in completions]


def xml_count(completions, **kwargs) -> list[float]:
    """0.125 per well-placed tag of the think/answer format, minus 0.001 per character after `</answer>`."""
    rewards = []
    for completion in completions:
        text = _text(completion)
        score = 0.0
        if text.count("<think>\n") == 1:
            score += 0.125
        if text.count("\n</think>\n") == 1:
            score += 0.125
        if text.count("\n<answer>\n") == 1:
            score += 0.125
        if text.count("\n</answer>") == 1:
            score += 0.125
            score -= 0.001 * max(len(text.split("\n</answer>")[-1]) - 1, 0)
        rewards.append(score)
    return rewards


# ---------------------------------------------------------------------------------------------------------- length


def length(completions, target: int = 200, **kwargs) -> list[float]:
    """Length reward of TRL's GRPO example: `-|target - characters|` (best 0 at the target)."""
    return [-float(abs(target - len(_text(c)))) for c in completions]


def smooth_length(completions, target: int = 300, tolerance: int = 30, scale: float = 0.05, **kwargs) -> list[float]:
    """Smooth length reward: 0 within `target ± tolerance` characters, else
    `-scale * sqrt(|target - characters| - tolerance)`."""
    return [-scale * math.sqrt(max(abs(target - len(_text(c))) - tolerance, 0)) for c in completions]


# -------------------------------------------------------------------------------------------------------- registry


REWARD_FUNCS: dict[str, Callable] = {
    "gsm8k_accuracy": gsm8k_accuracy,
    "math_accuracy": math_accuracy,
    "countdown": countdown,
    "arithmetic_accuracy": arithmetic_accuracy,
    "constraints_followed": constraints_followed,
    "constraints_all_followed": constraints_all_followed,
    "instruction_following": instruction_following,
    "strict_format": strict_format,
    "soft_format": soft_format,
    "xml_count": xml_count,
    "length": length,
    "smooth_length": smooth_length,
    # TRL's built-ins, by their own names
    "accuracy_reward": trl_rewards.accuracy_reward,
    "reasoning_accuracy_reward": trl_rewards.reasoning_accuracy_reward,
    "think_format_reward": trl_rewards.think_format_reward,
}


def get_reward(name: str, **options) -> Callable:
    """The reward registered as `name` (or importable as `package.module.function`), with `options` bound (e.g.
    `target=120`). The returned function keeps the name (TRL logs `rewards/<name>/mean`) and turns any exception
    into an error that names the reward function."""
    if name in REWARD_FUNCS:
        func = REWARD_FUNCS[name]
    elif "." in name:
        module, _, attribute = name.rpartition(".")
        if os.getcwd() not in sys.path:  # a module next to the recipe, as TRL's grpo script allows
            sys.path.insert(0, os.getcwd())
        try:
            func = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"Reward function {name!r} cannot be imported: {error}") from error
    else:
        raise ValueError(f"Unknown reward function {name!r}. Known: {sorted(REWARD_FUNCS)}, or a dotted import path.")
    short_name = name.rpartition(".")[2]

    def reward(completions, **kwargs):
        try:
            return func(completions, **options, **kwargs)
        except Exception as error:
            raise RuntimeError(f"Reward function {short_name!r} failed: {type(error).__name__}: {error}") from error

    reward.__name__ = short_name
    reward.__doc__ = func.__doc__
    return reward
