"""The instructions task's reward: the constraints an answer follows, paid only as far as the answer addresses the
request (docs/rewards.md).

A checker alone (`constraints_followed`) pays full marks for an answer built from the words the constraints ask for
("P.S. I hope this helps." to a request for advice with a postscript), and GRPO learns to write such answers. The
field's fix is to gate the checker with a judge of the answer (VerIF: rule checks times a judge's verdict; IFBench:
a judge's bonus or penalty on the checker's score; CALIF: a likelihood bonus from the frozen reference model). Here
the judge is two offline measures that cost milliseconds a step:

- relevance: how close the answer's meaning is to the request's subject, the cosine of two WordLlama embeddings
  (static token embeddings that ship inside the `wordllama` package: no download, no model forward pass), ramped
  from 0 at `RELEVANCE_FLOOR` (what an answer to another request reaches) to 1 at `RELEVANCE_FULL`;
- substance: how many distinct content words the answer writes that the prompt did not hand it (stop words and the
  prompt's own words, keywords and phrases included, do not count), up to `SUBSTANCE_WORDS` for full credit (fewer
  when the request caps the word count). A loop repeating one sentence, an echo of the request and an answer made of
  "Okay." sentences each have a handful.

reward = relevance x substance x (ANSWER_SHARE + (1 - ANSWER_SHARE) x fraction of the constraints followed), in
[0, 1]: the checker's score gated by the answer's quality, as VerIF multiplies its rule checks by a judge's verdict;
ANSWER_SHARE keeps a genuine answer that misses every constraint above an empty one, so the two are told apart.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import wordllama

from .constraints import describe, parse_specs, words

# Cosine between an answer and its request's subject (measured on the starting SmolLM2-135M's greedy answers to the
# task's 400 test problems, docs/rewards.md): its answers reach a median of 0.50 (a quarter below 0.32), the same
# answers paired with another topic's request a median of 0.02 (5 % above 0.165).
RELEVANCE_FLOOR = 0.10
RELEVANCE_FULL = 0.30
# The share of the reward an answer that addresses its request earns before following any constraint.
ANSWER_SHARE = 0.2
# Distinct new content words for full substance: a genuine 40-word answer writes about 20 (docs/rewards.md).
SUBSTANCE_WORDS = 20

# Words that carry no subject: function words, and the filler a content-free answer is built from.
STOP_WORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being below between
    both but by can could did do does doing down during each few for from further had has have having he her here
    hers herself him himself his how i if in into is it its itself just let me more most my myself no nor not now of
    off on once only or other our ours ourselves out over own same she should so some such than that the their theirs
    them themselves then there these they this those through to too under until up very was we were what when where
    which while who whom why will with would you your yours yourself yourselves okay ok yes yeah sure fine right well
    oh hi hello thanks thank please indeed really just etc one two three four five get got make made like""".split()
)
# Words that frame a writing request rather than name what it is about ("Write a short blog post about ...").
FRAMING_WORDS = frozenset(
    """write writing written short long brief blog post story letter essay poem article paragraph paragraphs text
    explain describe description sentences sentence give beginner advice tips ten year old ten-year-old friend few
    answer request words word""".split()
)


@functools.cache
def embedder() -> wordllama.WordLlamaInference:
    """The WordLlama model whose weights and tokenizer ship inside the package (`cache_dir` pointed at the package:
    its default lookup expects a folder name the wheel does not use and would try to download)."""
    return wordllama.WordLlama.load(cache_dir=Path(wordllama.__file__).parent, disable_download=True)


def user_text(prompt) -> str:
    """The user's words of a prompt: the last user message of a conversation, or the text itself."""
    if isinstance(prompt, str):
        return prompt
    return next((str(m.get("content", "")) for m in reversed(prompt) if m.get("role") == "user"), "")


def request_text(prompt, specs: list[dict]) -> str:
    """The request without its constraints' instructions ("Write a short blog post about honey bees.")."""
    text = user_text(prompt)
    for spec in specs:
        text = text.replace(describe(spec), " ")
    return " ".join(text.split())


def subject_text(request: str) -> str:
    """The words of a request that name its subject: framing and stop words dropped ("honey bees")."""
    kept = [w for w in words(request) if w.lower() not in FRAMING_WORDS and w.lower() not in STOP_WORDS]
    return " ".join(kept) or request


def unit_vectors(texts: list[str]) -> np.ndarray:
    """The texts' embeddings scaled to length 1; a text without a known token stays the zero vector (cosine 0)."""
    vectors = embedder().embed(texts, norm=False)
    lengths = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, lengths, out=np.zeros_like(vectors), where=lengths > 0)


def relevance(answers: list[str], subjects: list[str]) -> list[float]:
    """Per answer, 0..1: the cosine of its embedding with its subject's, ramped from RELEVANCE_FLOOR (0) to
    RELEVANCE_FULL (1)."""
    cosine = (unit_vectors(answers) * unit_vectors(subjects)).sum(axis=1)
    ramp = (cosine - RELEVANCE_FLOOR) / (RELEVANCE_FULL - RELEVANCE_FLOOR)
    return [float(x) for x in np.clip(ramp, 0.0, 1.0)]


def new_content_words(answer: str, prompt_text: str) -> set[str]:
    """The distinct content words of `answer` (lowercase, with a letter, not stop words) that the prompt lacks."""
    given = {w.lower() for w in words(prompt_text)}
    found = {w.lower() for w in words(answer)}
    return {w for w in found if w not in given and w not in STOP_WORDS and any(c.isalpha() for c in w)}


def substance_target(specs: list[dict]) -> int:
    """Distinct new content words for full substance: SUBSTANCE_WORDS, or a third of a `max_words` cap below it."""
    caps = [spec["n"] // 3 for spec in specs if spec["kind"] == "max_words"]
    return max(1, min([SUBSTANCE_WORDS, *caps]))


def substance(answer: str, prompt_text: str, specs: list[dict]) -> float:
    """0..1: the answer's distinct new content words over `substance_target`."""
    return min(1.0, len(new_content_words(answer, prompt_text)) / substance_target(specs))


def answer_quality(answers: list[str], prompts: list, specs_per_row: list[list[dict]]) -> list[float]:
    """Per answer, relevance x substance in [0, 1]: how far it addresses its request."""
    subjects = [subject_text(request_text(p, s)) for p, s in zip(prompts, specs_per_row, strict=True)]
    related = relevance(answers, subjects)
    return [
        r * substance(a, user_text(p), s) for a, p, s, r in zip(answers, prompts, specs_per_row, related, strict=True)
    ]


def parse_rows(constraints) -> list[list[dict]]:
    """Each row's constraints column parsed and validated (trl_guided.constraints.parse_specs)."""
    return [parse_specs(value) for value in constraints]
