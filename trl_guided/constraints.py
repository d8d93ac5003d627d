"""Verifiable instruction constraints (IFEval-style): a spec is a dict `{"kind": ..., <parameters>}`.

`describe(spec)` is the instruction a prompt shows, `check(spec, text)` whether an answer follows it, `parse_specs`
reads and validates the `constraints` column of a dataset row (a JSON list of specs) with one clear error for a bad
spec. Pure functions on text, no model and no trainer state.

Why not lm-eval's IFEval checkers: `lm_eval/tasks/ifeval/instructions_util.py` calls `nltk.download("punkt")` when it
is imported (network at run time) and the language checks need `langdetect`; here sentences are split by a small
offline regular expression (`split_sentences`), and every check is a few lines of tested code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

# Sentence ends: . ! ? (one or more, maybe closed by a quote or bracket) followed by white space or the end, and line
# breaks (bullet lines and titles are sentences of their own). Common abbreviations do not end a sentence.
_ABBREVIATION = re.compile(r"(?<![\w.])(?:mr|mrs|ms|dr|prof|st|vs|etc|e\.g|i\.e|jr|sr)\.$", re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'”’)\]])\s+|\n+")
_WORD = re.compile(r"\w+(?:['’-]\w+)*")
_BULLET = re.compile(r"^[ \t]*[*\-•][ \t]+\S", re.M)
_TITLE = re.compile(r"<<[^<>\n]+>>")
_POSTSCRIPT = re.compile(r"^[ \t]*p\.[ \t]?s\.", re.M | re.I)
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


class ConstraintError(ValueError):
    """A constraint spec that cannot be checked (unknown kind, missing or wrong parameter)."""


def words(text: str) -> list[str]:
    """The words of `text` (letters/digits, with inner apostrophes or hyphens), any script."""
    return _WORD.findall(text)


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`: split after . ! ? followed by white space, and at line breaks; pieces without a word are
    dropped; an abbreviation such as "e.g." or "Dr." does not end a sentence."""
    pieces, current = [], ""
    for part in _SENTENCE_END.split(text):
        current = f"{current} {part}" if current else part
        if _ABBREVIATION.search(current.rstrip()):
            continue
        pieces.append(current)
        current = ""
    if current:
        pieces.append(current)
    return [piece.strip() for piece in pieces if _WORD.search(piece)]


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.I) is not None


def _json_answer(text: str) -> bool:
    body = _FENCE.sub("", text.strip()).strip()
    try:
        return isinstance(json.loads(body), dict | list)
    except (ValueError, RecursionError):
        return False


def _starts_with(text: str, phrase: str) -> bool:
    return text.lstrip(" \t\n#*>").lower().startswith(phrase.lower())


def _ends_with(text: str, phrase: str) -> bool:
    return text.rstrip().lower().endswith(phrase.lower())


# kind -> (parameters with their type, check(text, **parameters), instruction(**parameters))
KINDS: dict[str, tuple[dict[str, type], Callable[..., bool], Callable[..., str]]] = {
    "include_keywords": (
        {"keywords": list},
        lambda text, keywords: all(_has_word(text, k) for k in keywords),
        lambda keywords: "Include the keywords " + " and ".join(f'"{k}"' for k in keywords) + " in your answer.",
    ),
    "avoid_word": (
        {"word": str},
        lambda text, word: not _has_word(text, word),
        lambda word: f'Do not use the word "{word}" anywhere in your answer.',
    ),
    "min_sentences": (
        {"n": int},
        lambda text, n: len(split_sentences(text)) >= n,
        lambda n: f"Your answer must have at least {n} sentences.",
    ),
    "max_sentences": (
        {"n": int},
        lambda text, n: len(split_sentences(text)) <= n,
        lambda n: f"Your answer must have at most {n} sentences.",
    ),
    "bullet_points": (
        {"n": int},
        lambda text, n: len(_BULLET.findall(text)) == n,
        lambda n: f"Your answer must contain exactly {n} bullet points, each on its own line starting with '* '.",
    ),
    "min_words": (
        {"n": int},
        lambda text, n: len(words(text)) >= n,
        lambda n: f"Answer with at least {n} words.",
    ),
    "max_words": (
        {"n": int},
        lambda text, n: len(words(text)) <= n,
        lambda n: f"Answer with at most {n} words.",
    ),
    "start_with": (
        {"phrase": str},
        lambda text, phrase: _starts_with(text, phrase),
        lambda phrase: f'Start your answer with the words "{phrase}".',
    ),
    "end_with": (
        {"phrase": str},
        lambda text, phrase: _ends_with(text, phrase),
        lambda phrase: f'Finish your answer with the exact phrase "{phrase}". No other words should follow it.',
    ),
    "lowercase": (
        {},
        lambda text: text == text.lower(),
        lambda: "Write your entire answer in lowercase letters: no capital letters at all.",
    ),
    "no_commas": (
        {},
        lambda text: "," not in text and "，" not in text,
        lambda: "Do not use any commas in your answer.",
    ),
    "title": (
        {},
        lambda text: _TITLE.search(text) is not None,
        lambda: "Give your answer a title wrapped in double angular brackets, such as <<my title>>.",
    ),
    "postscript": (
        {},
        lambda text: _POSTSCRIPT.search(text) is not None,
        lambda: 'At the end of your answer, add a postscript starting with "P.S."',
    ),
    "json": (
        {},
        _json_answer,
        lambda: "Wrap your entire answer in JSON format (a JSON object); you may use markdown code fences.",
    ),
}


def validate(spec) -> dict:
    """`spec` if it is a checkable constraint, else ConstraintError saying what is wrong and what is expected."""
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
        raise ConstraintError(f'constraint {spec!r} is not a mapping with a "kind" (e.g. {{"kind": "lowercase"}})')
    kind = spec["kind"]
    if kind not in KINDS:
        raise ConstraintError(f"constraint {spec!r}: unknown kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}")
    parameters = KINDS[kind][0]
    given = set(spec) - {"kind"}
    if given != set(parameters):
        wanted = ", ".join(f"{name} ({kind_.__name__})" for name, kind_ in parameters.items()) or "none"
        raise ConstraintError(f"constraint {spec!r}: {kind} takes the parameters {wanted}")
    for name, expected in parameters.items():
        value = spec[name]
        valid = isinstance(value, expected) and not isinstance(value, bool)
        if expected is int:
            valid = valid and value >= 0
        elif expected is str:
            valid = valid and bool(value.strip())
        else:
            valid = valid and bool(value) and all(isinstance(v, str) and v.strip() for v in value)
        if not valid:
            wanted = {int: "a non-negative integer", str: "a non-empty string", list: "a non-empty list of words"}
            raise ConstraintError(f"constraint {spec!r}: {name} must be {wanted[expected]}")
    return spec


def parse_specs(value) -> list[dict]:
    """A row's constraints (a JSON string or a list of specs), each validated; ConstraintError otherwise."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as error:
            raise ConstraintError(f"constraints {value[:80]!r} are not valid JSON ({error})") from None
    if not isinstance(value, list) or not value:
        raise ConstraintError(f"constraints must be a non-empty JSON list of specs, got {str(value)[:80]!r}")
    return [validate(spec) for spec in value]


def describe(spec: dict) -> str:
    """The instruction that asks for `spec`."""
    parameters, _, instruction = KINDS[spec["kind"]]
    return instruction(**{name: spec[name] for name in parameters})


def check(spec: dict, text: str) -> bool:
    """Whether `text` follows the constraint. An answer without a single word follows none (so that saying
    nothing never pays)."""
    if not _WORD.search(text):
        return False
    parameters, checker, _ = KINDS[spec["kind"]]
    return bool(checker(text, **{name: spec[name] for name in parameters}))


def followed(specs: list[dict], text: str) -> list[bool]:
    """Per constraint, whether `text` follows it."""
    return [check(spec, text) for spec in specs]
