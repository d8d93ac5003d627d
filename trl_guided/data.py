"""Tasks by name: `load_task(name, split, **options)` returns a dataset with a conversational `prompt` column."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from fractions import Fraction
from importlib import resources
from pathlib import Path

import datasets
from datasets import Dataset, load_dataset, load_from_disk

from .constraints import ConstraintError, describe, parse_specs
from .rewards import evaluate_equation

LENGTH_SYSTEM_PROMPT = "You are a helpful assistant. Answer the user's request."
GSM8K_SYSTEM_PROMPT = "Solve the math word problem step by step. End your answer with a final line '#### <number>'."
MATH_SYSTEM_PROMPT = "Solve the problem step by step. Put the final answer in \\boxed{}."
TLDR_SYSTEM_PROMPT = "Summarize the Reddit post in one short TL;DR."
THINK_ANSWER_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The Assistant first thinks about the reasoning process and then "
    "gives the answer, in the format:\n<think>\n...\n</think>\n<answer>\n...\n</answer>"
)


def _length_prompts(path: str | None) -> list[str]:
    if path is None:
        text = resources.files("trl_guided").joinpath("assets/length_prompts.txt").read_text()
    else:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"dataset_path={path!r} does not exist: give a text file with one prompt per line."
            )
        text = Path(path).read_text()
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"No prompts found in {path or 'the shipped length prompt set'}.")
    return prompts


def load_length(
    split: str = "train",
    dataset_path: str | None = None,
    eval_size: int = 8,
    system_prompt: str = LENGTH_SYSTEM_PROMPT,
) -> Dataset:
    """Length control: short open requests; rewards score the answer's length.

    The shipped prompt set (trl_guided/assets/length_prompts.txt) or a local text file, one prompt per line; the last
    `eval_size` prompts form the `test` split.
    """
    prompts = _length_prompts(dataset_path)
    cut = max(0, len(prompts) - eval_size)  # eval_size=0: no test prompts (a slice [-0:] would take them all)
    chosen = prompts[cut:] if split == "test" else prompts[:cut]
    return Dataset.from_dict(
        {"prompt": [[{"role": "system", "content": system_prompt}, {"role": "user", "content": p}] for p in chosen]}
    )


def _split_seed(seed: int, split: str) -> int:
    return seed * 1_000_003 + {"train": 0, "test": 1, "validation": 2}.get(split, 3)


# Generated tasks: a problem belongs to the test split when a hash of its text falls in one of TEST_SHARE buckets, and
# to train/validation otherwise, so the splits never share a problem however large either is drawn. Test problems are
# also unique, so that each counts once in an evaluation.
TEST_SHARE = 5


def _in_test_partition(key: str) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % TEST_SHARE == 0


def _draw_split(rng: random.Random, draw: Callable[[random.Random], tuple], key, split: str, size: int) -> list:
    """`size` problems drawn with `draw` whose `key` puts them in `split`'s partition (unique ones for test). A small
    problem space may hold fewer test problems than asked: then all of them are returned."""
    test = split == "test"
    rows, seen = [], set()
    for _ in range(50 * size + 1000):
        if len(rows) == size:
            break
        row = draw(rng)
        name = key(row)
        if _in_test_partition(name) != test or (test and name in seen):
            continue
        seen.add(name)
        rows.append(row)
    return rows


def _chat(system_prompt: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]


def _countdown_instance(rng: random.Random, count: int, max_number: int) -> tuple[list[int], int, str]:
    """Numbers, a target and one solution built from them: solvable by construction."""
    while True:
        numbers = [rng.randint(1, max_number) for _ in range(count)]
        order = rng.sample(numbers, count)
        expression, value = str(order[0]), Fraction(order[0])
        for number in order[1:]:
            op = rng.choice("+-*/")
            if op == "/" and (number == 0 or (value / number).denominator != 1):
                op = "+"
            value = {"+": value + number, "-": value - number, "*": value * number, "/": value / number}[op]
            expression = f"({expression} {op} {number})"
        if value.denominator == 1 and 0 < value <= 1000:
            return numbers, int(value), expression[1:-1] if expression.startswith("(") else expression


def load_countdown(
    split: str = "train",
    size: int = 1000,
    seed: int = 0,
    numbers: int = 4,
    max_number: int = 99,
    system_prompt: str = THINK_ANSWER_SYSTEM_PROMPT,
) -> Dataset:
    """Countdown (TinyZero): reach `target` with each of `nums` once and + - * /. Generated locally, deterministic by
    seed and split; every instance is solvable (built from a solution, kept in `solution`). The test split shares no
    problem (numbers and target) with train."""
    rng = random.Random(_split_seed(seed, split))
    rows = _draw_split(
        rng,
        lambda r: _countdown_instance(r, numbers, max_number),
        lambda row: f"{sorted(row[0])}->{row[1]}",
        split,
        size,
    )
    return Dataset.from_dict(
        {
            "prompt": [
                _chat(
                    system_prompt,
                    f"Using the numbers {nums}, create an equation that equals {target}. Use + - * / and "
                    "parentheses, each number exactly once. Give the equation in <answer> </answer> tags, e.g. "
                    "<answer>(1 + 2) / 3</answer>.",
                )
                for nums, target, _ in rows
            ],
            "nums": [nums for nums, _, _ in rows],
            "target": [target for _, target, _ in rows],
            "solution": [solution for _, _, solution in rows],
        }
    )


def load_arithmetic(
    split: str = "train",
    size: int = 1000,
    seed: int = 0,
    terms: int = 3,
    max_number: int = 20,
    mode: str = "evaluate",
    system_prompt: str = THINK_ANSWER_SYSTEM_PROMPT,
) -> Dataset:
    """Synthetic arithmetic, generated locally, deterministic by seed and split, exact answers in
    `answer`. `mode="evaluate"`: an integer expression with + - * and parentheses. `mode="steps"`: the same
    expressions, worked one operation per line and closed by a line `Answer: N`. `mode="expand"`: a product
    `(a x + b)(c x + d)` to expand into `p x^2 + q x + r`. The test split shares no expression with train; a small
    problem space (e.g. 2 terms up to 9: 243 expressions) holds about a fifth of it as test problems."""
    if mode not in ("evaluate", "expand", "steps"):
        raise ValueError(f"arithmetic mode={mode!r} is unknown; choose 'evaluate', 'expand' or 'steps'.")

    def draw(rng: random.Random) -> tuple[str, str, str]:
        if mode == "expand":
            a, b, c, d = (rng.randint(1, max_number // 2) * rng.choice((1, -1)) for _ in range(4))
            expression = f"({a}x {'+' if b > 0 else '-'} {abs(b)})({c}x {'+' if d > 0 else '-'} {abs(d)})"
            answer = _polynomial(a * c, a * d + b * c, b * d)
            return expression, answer, f"Expand {expression}. Put the expanded polynomial in <answer> </answer> tags."
        expression = str(rng.randint(1, max_number))
        for _ in range(terms - 1):
            expression = f"({expression} {rng.choice('+-*')} {rng.randint(1, max_number)})"
        expression = expression[1:-1] if expression.startswith("(") else expression
        if mode == "steps":
            return expression, None, STEPS_PROMPT.format(expression=expression)
        return expression, None, f"Evaluate {expression}. Put the final number in <answer> </answer> tags."

    rows = _draw_split(random.Random(_split_seed(seed, split)), draw, lambda row: row[0], split, size)
    # Evaluated once a problem is kept (a small problem space makes the split draw many more than it keeps).
    rows = [(e, str(_evaluate_integer(e)) if a is None else a, p) for e, a, p in rows]
    return Dataset.from_dict(
        {
            "prompt": [_chat(system_prompt, prompt) for _, _, prompt in rows],
            "expression": [expression for expression, _, _ in rows],
            "answer": [answer for _, answer, _ in rows],
        }
    )


STEPS_PROMPT = (
    "Evaluate {expression} step by step. Write one line per operation, such as '3 + 4 = 7', and finish with a "
    "final line 'Answer: N'."
)

# ------------------------------------------------------------------------------------------- instruction following

INSTRUCTIONS_SYSTEM_PROMPT = "You are a helpful assistant. Follow every instruction of the user's request exactly."
INSTRUCTION_TOPICS = (
    "the ocean", "learning to cook", "a rainy day in the city", "public libraries", "growing tomatoes",
    "the first day at a new job", "honey bees", "riding a bicycle", "the moon", "saving money", "a mountain village",
    "playing chess", "recycling", "a family dinner", "learning a new language", "the history of bread",
    "autumn leaves", "a visit to the dentist", "train travel", "volcanoes", "keeping a diary", "dogs as pets",
    "the night sky", "a school science fair", "coffee", "a small bakery", "desert animals", "winter sports",
    "the invention of the telephone", "a lost umbrella", "public parks", "solar power", "birthday parties",
    "a long walk", "the internet", "old photographs", "a lighthouse keeper", "rainforests", "making friends",
    "a museum trip",
)  # fmt: skip
INSTRUCTION_REQUESTS = (
    "Write a short blog post about {topic}.",
    "Write a short story about {topic}.",
    "Explain {topic} to a ten-year-old.",
    "Write a letter to a friend about {topic}.",
    "Describe {topic} in a few sentences.",
    "Give a beginner some advice about {topic}.",
)
_KEYWORDS = (
    "light", "morning", "family", "journey", "balance", "window", "river", "story", "simple", "garden", "future",
    "music", "color", "friend", "memory", "energy", "silence", "history", "surprise", "weather", "patience", "home",
)  # fmt: skip
_AVOIDED = ("important", "also", "very", "really", "many", "great", "help", "people", "good", "make", "can")
_OPENINGS = ("Here is", "Imagine", "In short", "Once upon a time", "Dear reader", "Today", "Let me explain")
_ENDINGS = (
    "Is there anything else I can help with?",
    "Thank you for reading.",
    "That is all.",
    "Any other questions?",
)
# Constraint kinds that cannot be asked together (a JSON answer has no bullet lines, one word budget per prompt, ...).
_CONFLICTS = {
    "json": {
        "bullet_points",
        "min_sentences",
        "max_sentences",
        "start_with",
        "end_with",
        "title",
        "postscript",
        "no_commas",
    },
    "bullet_points": {"min_sentences", "max_sentences"},
    "lowercase": {"start_with", "end_with"},
    "end_with": {"postscript"},
    "min_words": {"max_words"},
    "min_sentences": {"max_sentences"},
}


def _conflict(a: str, b: str) -> bool:
    return a == b or b in _CONFLICTS.get(a, ()) or a in _CONFLICTS.get(b, ())


def _constraint(rng: random.Random, kind: str) -> dict:
    """One spec of `kind` with parameters drawn from the catalogue."""
    parameters = {
        "include_keywords": lambda: {"keywords": rng.sample(_KEYWORDS, rng.randint(1, 2))},
        "avoid_word": lambda: {"word": rng.choice(_AVOIDED)},
        "min_sentences": lambda: {"n": rng.randint(3, 6)},
        "max_sentences": lambda: {"n": rng.randint(2, 4)},
        "bullet_points": lambda: {"n": rng.randint(2, 4)},
        "min_words": lambda: {"n": rng.choice((40, 50, 60, 80))},
        "max_words": lambda: {"n": rng.choice((30, 50, 70))},
        "start_with": lambda: {"phrase": rng.choice(_OPENINGS)},
        "end_with": lambda: {"phrase": rng.choice(_ENDINGS)},
    }.get(kind, dict)()
    return {"kind": kind, **parameters}


# How often each kind is drawn (the common IFEval kinds more often).
_KIND_WEIGHTS = {
    "include_keywords": 4, "avoid_word": 3, "min_sentences": 2, "max_sentences": 2, "bullet_points": 2,
    "min_words": 2, "max_words": 2, "start_with": 2, "end_with": 2, "lowercase": 1, "no_commas": 1, "title": 2,
    "postscript": 2, "json": 1,
}  # fmt: skip


def _instruction_problem(rng: random.Random, max_constraints: int) -> tuple[str, str]:
    """(user request, constraints as JSON): a topic, a kind of text and 1..max_constraints compatible constraints."""
    request = rng.choice(INSTRUCTION_REQUESTS).format(topic=rng.choice(INSTRUCTION_TOPICS))
    kinds: list[str] = []
    for _ in range(rng.randint(1, max_constraints)):
        allowed = [k for k in _KIND_WEIGHTS if not any(_conflict(k, chosen) for chosen in kinds)]
        kinds.append(rng.choices(allowed, weights=[_KIND_WEIGHTS[k] for k in allowed])[0])
    specs = [_constraint(rng, kind) for kind in kinds]
    text = " ".join([request, *(describe(spec) for spec in specs)])
    return text, json.dumps(specs)


def load_instructions(
    split: str = "train",
    size: int = 1000,
    seed: int = 0,
    system_prompt: str = INSTRUCTIONS_SYSTEM_PROMPT,
    **source,
) -> Dataset:
    """Verifiable instruction following (IFEval-style): a short writing request with one to three constraints that
    a program can check (keywords, a word to avoid, sentence/word/bullet counts, opening/closing phrase, lowercase,
    no commas, a <<title>>, a postscript, JSON; trl_guided/constraints.py). Generated from a fixed catalogue of
    topics and constraints, deterministic by seed and split; the test split shares no prompt with train. Or a local
    .jsonl/.json/.csv/.parquet file or a dataset (`source`: `dataset_path` or `dataset_name`, see `_load_rows`) with an
    `instruction` and a `constraints` column (a JSON list of specs such as `[{"kind": "min_words", "n": 50}]`),
    checked when loaded."""
    given = _own_data(source)
    if given is None:
        rng = random.Random(_split_seed(seed, split))
        rows = _draw_split(rng, lambda r: _instruction_problem(r, 3), lambda row: row[0], split, size)
    else:
        loaded = _load_rows("", None, split, **source)
        _need(loaded, ("instruction", "constraints"), "instructions")
        rows = [(row["instruction"], row["constraints"]) for row in loaded]
    for index, (_, constraints) in enumerate(rows):
        try:
            specs = parse_specs(constraints)
        except ConstraintError as error:
            raise ValueError(f"{given or 'instructions task'} row {index}: {error}") from None
        rows[index] = (rows[index][0], json.dumps(specs))
    return Dataset.from_dict(
        {
            "prompt": [_chat(system_prompt, text) for text, _ in rows],
            "constraints": [constraints for _, constraints in rows],
        }
    )


def _polynomial(square: int, linear: int, constant: int) -> str:
    terms = [(square, "x^2"), (linear, "x"), (constant, "")]
    text = ""
    for coefficient, power in terms:
        if coefficient == 0:
            continue
        sign = "-" if coefficient < 0 else "+"
        magnitude = abs(coefficient)
        body = f"{'' if magnitude == 1 and power else magnitude}{power}"
        text += (f"-{body}" if sign == "-" else body) if not text else f" {sign} {body}"
    return text or "0"


def _evaluate_integer(expression: str) -> int:
    result = evaluate_equation(expression)
    if result is None or result[0].denominator != 1:
        raise ValueError(f"generated expression {expression!r} does not evaluate to an integer")
    return int(result[0])


class DataError(ValueError):
    """Data that cannot be loaded; the message says what is wrong and how to fix it, in one line."""


def _load_rows(
    default_name: str,
    default_config: str | None,
    split: str,
    dataset_path: str | None = None,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
) -> Dataset:
    """A task's rows: from `dataset_path` (a local .json/.jsonl/.csv/.parquet file or a saved dataset folder), from
    `dataset_name` (TRL's key: a local file or folder, a folder written by `save_to_disk`, or a Hub dataset with
    `dataset_config`), else from the task's own Hub dataset. `split` "train" / "test" reads `train_split` /
    `test_split` (TRL's `dataset_train_split` / `dataset_test_split`)."""
    if dataset_path is not None and dataset_name is not None:
        raise DataError(f"dataset_path={dataset_path!r} and dataset_name={dataset_name!r}: give one of them")
    split = {"train": train_split, "test": test_split}.get(split, split)
    if dataset_path is not None:
        if not Path(dataset_path).exists():
            raise DataError(f"dataset_path={dataset_path!r} does not exist.")
        return _local_rows(Path(dataset_path), None, split, "dataset_path")
    if dataset_name is not None and Path(dataset_name).expanduser().exists():
        return _local_rows(Path(dataset_name).expanduser(), dataset_config, split, "dataset_name")
    name, config = (dataset_name, dataset_config) if dataset_name is not None else (default_name, default_config)
    if _hub_offline():
        raise DataError(
            f"{name!r} is not a local file or folder, and the Hub is off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): set "
            "dataset_name to a local copy (a .jsonl/.json/.csv/.parquet file, a folder of them, or a folder written "
            "by Dataset.save_to_disk; dataset_path takes a local file too), or allow the Hub (HF_HUB_OFFLINE=0)."
        )
    try:
        return load_dataset(name, config, split=split)
    except Exception as error:  # no network, gated, missing split or config: say what to do instead
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(
            f"Could not load {name!r} (config {config}, split {split!r}) from the Hub: {first}. Check the name, "
            "dataset_config and the split names (dataset_train_split / dataset_test_split), or set dataset_name to a "
            "local copy."
        ) from error


def _own_data(source: dict) -> str | None:
    """The user's data of a task's `source` options (`dataset_path` or `dataset_name`), None for the task's own."""
    return source.get("dataset_path") or source.get("dataset_name")


def _hub_offline() -> bool:
    """Whether `datasets` may not reach the Hub (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE, read now, not at import)."""
    flags = (os.environ.get("HF_DATASETS_OFFLINE"), os.environ.get("HF_HUB_OFFLINE"))
    return datasets.config.HF_HUB_OFFLINE or any(str(f).upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _local_rows(path: Path, config: str | None, split: str, key: str) -> Dataset:
    """Rows of a local data file (every row, whatever the split), a saved dataset folder or a folder of data files."""
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():  # written by save_to_disk
            loaded = load_from_disk(str(path))
            if not hasattr(loaded, "keys"):
                return loaded
            if split not in loaded:
                raise DataError(
                    f"{key}={str(path)!r} has the splits {sorted(loaded)}, not {split!r}: set "
                    "dataset_train_split / dataset_test_split to the split names it has."
                )
            return loaded[split]
        return load_dataset(str(path), config, split=split)
    kind = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
    if kind is None:
        raise DataError(f"{key}={str(path)!r}: use a .json, .jsonl, .csv or .parquet file, or a folder.")
    return load_dataset(kind, data_files=str(path), split="train")


def _need(rows: Dataset, columns: tuple[str, ...], task: str) -> None:
    missing = [c for c in columns if c not in rows.column_names]
    if missing:
        raise ValueError(f"The {task} data lacks column(s) {missing}; it has {rows.column_names}.")


def load_gsm8k(split: str = "train", system_prompt: str = GSM8K_SYSTEM_PROMPT, **source) -> Dataset:
    """GSM8K (openai/gsm8k, config main, or `source`, see `_load_rows`): `question` -> prompt; `answer` keeps the
    `#### n` gold for the reward."""
    rows = _load_rows("openai/gsm8k", "main", split, **source)
    _need(rows, ("question", "answer"), "gsm8k")
    return rows.map(lambda r: {"prompt": _chat(system_prompt, r["question"])})


def load_math(split: str = "test", system_prompt: str = MATH_SYSTEM_PROMPT, **source) -> Dataset:
    """MATH with boxed answers (default HuggingFaceH4/MATH-500, which has a test split only; or `source`, see
    `_load_rows`): `problem` -> prompt; `solution` for math_accuracy (built as `$answer$` when only an `answer` column
    exists)."""
    rows = _load_rows("HuggingFaceH4/MATH-500", None, split if _own_data(source) else "test", **source)
    _need(rows, ("problem",), "math")
    if "solution" not in rows.column_names:
        _need(rows, ("answer",), "math")
        rows = rows.map(lambda r: {"solution": f"${r['answer']}$"})
    return rows.map(lambda r: {"prompt": _chat(system_prompt, r["problem"])})


def load_tldr(split: str = "train", system_prompt: str = TLDR_SYSTEM_PROMPT, **source) -> Dataset:
    """TL;DR (trl-lib/tldr, or `source`, see `_load_rows`), in dialogue form as TRL's GRPO example uses it: the post
    becomes the user message."""
    rows = _load_rows("trl-lib/tldr", None, split, **source)
    _need(rows, ("prompt",), "tldr")
    if len(rows) and not isinstance(rows[0]["prompt"], str):
        return rows  # already conversational
    return rows.map(lambda r: {"prompt": _chat(system_prompt, r["prompt"].strip())})


TASKS = {
    "length": load_length,
    "countdown": load_countdown,
    "arithmetic": load_arithmetic,
    "instructions": load_instructions,
    "gsm8k": load_gsm8k,
    "math": load_math,
    "tldr": load_tldr,
}


# The data source fields of the tasks that read data (`_load_rows`), with TRL's names for a dataset and its splits.
DATA_SOURCE = {
    "dataset_path": "dataset_path",
    "dataset_name": "dataset_name",
    "dataset_config": "dataset_config",
    "dataset_train_split": "train_split",
    "dataset_test_split": "test_split",
}
# Which TaskArguments fields each task reads, and the loader option each one sets. A field a task does not read is
# refused when set (`trl_guided.train.unused_settings`), so e.g. an arithmetic option never changes another task.
TASK_OPTIONS = {
    "length": {"dataset_path": "dataset_path", "eval_size": "eval_size", "system_prompt": "system_prompt"},
    "countdown": {"dataset_size": "size", "dataset_seed": "seed", "system_prompt": "system_prompt"},
    "arithmetic": {
        "dataset_size": "size",
        "dataset_seed": "seed",
        "system_prompt": "system_prompt",
        "arithmetic_mode": "mode",
        "arithmetic_terms": "terms",
        "arithmetic_max_number": "max_number",
    },
    "instructions": {"dataset_size": "size", "dataset_seed": "seed", "system_prompt": "system_prompt", **DATA_SOURCE},
    "gsm8k": {"system_prompt": "system_prompt", **DATA_SOURCE},
    "math": {"system_prompt": "system_prompt", **DATA_SOURCE},
    "tldr": {"system_prompt": "system_prompt", **DATA_SOURCE},
}


def load_task(name: str, split: str = "train", **options) -> Dataset:
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}. Known tasks: {sorted(TASKS)}.")
    return TASKS[name](split=split, **options)
