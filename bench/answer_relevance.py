"""Is an answer about what was asked? The instructions task's reward checks the constraints only, so an answer like
"P.S. I hope this helps." to "Give a beginner some advice about coffee. [...] add a postscript" scores full marks.
This check counts the answers that name their request's topic (a word of the topic or a close one: "bees" or "hive"
for "honey bees"): a crude relevance proxy, transparent and deterministic, for reading a study's gains beside the
reward. The starting model names its topic in most answers; a trained model that stops doing so games the checker.

    python bench/answer_relevance.py RUN/eval_before.jsonl RUN/eval_after.jsonl [...]
"""

from __future__ import annotations

import argparse
import re

from constraint_kinds import answer_text

from trl_guided.data import INSTRUCTION_TOPICS
from trl_guided.evaluate import read_records

# Each topic of the task (trl_guided.data.INSTRUCTION_TOPICS) -> words that show an answer is about it, matched as
# whole words, also with an "s" or "es" ending.
TOPIC_WORDS = {
    "the ocean": ("ocean", "sea", "wave", "marine", "beach"),
    "learning to cook": ("cook", "cooking", "cooked", "recipe", "kitchen", "chef", "meal"),
    "a rainy day in the city": ("rain", "rainy", "raining", "umbrella", "city", "storm", "puddle"),
    "public libraries": ("library", "libraries", "librarian", "book"),
    "growing tomatoes": ("tomato", "garden", "gardening", "plant", "grow", "growing", "seed"),
    "the first day at a new job": ("job", "work", "office", "colleague", "coworker", "boss", "company", "first day"),
    "honey bees": ("bee", "honey", "hive", "pollen"),
    "riding a bicycle": ("bicycle", "bike", "cycling", "ride", "riding", "cyclist", "pedal"),
    "the moon": ("moon", "lunar"),
    "saving money": ("money", "save", "saving", "savings", "budget"),
    "a mountain village": ("mountain", "village"),
    "playing chess": ("chess", "game"),
    "recycling": ("recycle", "recycling", "recycled", "waste"),
    "a family dinner": ("dinner", "family", "meal"),
    "learning a new language": ("language", "vocabulary", "grammar", "fluent", "fluency"),
    "the history of bread": ("bread", "baking", "bake", "flour", "dough", "loaf", "loaves"),
    "autumn leaves": ("autumn", "fall", "leaf", "leaves"),
    "a visit to the dentist": ("dentist", "teeth", "tooth", "dental"),
    "train travel": ("train", "railway", "rail", "station"),
    "volcanoes": ("volcano", "volcanic", "lava", "eruption", "erupt"),
    "keeping a diary": ("diary", "diaries", "journal", "journaling"),
    "dogs as pets": ("dog", "pet", "puppy", "puppies"),
    "the night sky": ("sky", "star", "night", "constellation", "planet", "telescope"),
    "a school science fair": ("science", "fair", "experiment", "project"),
    "coffee": ("coffee", "caffeine", "espresso", "brew"),
    "a small bakery": ("bakery", "bakeries", "baker", "bread", "pastry", "pastries", "cake", "bake", "baking"),
    "desert animals": ("desert", "animal", "camel", "lizard", "sand"),
    "winter sports": ("winter", "ski", "skiing", "snow", "skate", "skating", "sport", "hockey", "snowboard"),
    "the invention of the telephone": ("telephone", "phone", "bell", "call", "invention", "invented"),
    "a lost umbrella": ("umbrella", "lost", "rain"),
    "public parks": ("park",),
    "solar power": ("solar", "sun", "energy", "panel"),
    "birthday parties": ("birthday", "party", "parties", "cake", "celebrate", "celebration"),
    "a long walk": ("walk", "walking", "walked", "stroll", "hike", "path"),
    "the internet": ("internet", "online", "web", "website", "computer"),
    "old photographs": ("photograph", "photo", "picture", "camera", "album"),
    "a lighthouse keeper": ("lighthouse", "keeper", "lamp", "ship"),
    "rainforests": ("rainforest", "forest", "jungle", "tree"),
    "making friends": ("friend", "friendship"),
    "a museum trip": ("museum", "exhibit", "exhibition", "gallery"),
}
PATTERNS = {
    topic: re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")(?:s|es)?\b", re.IGNORECASE)
    for topic, words in TOPIC_WORDS.items()
}


def request_topic(prompt: list[dict] | str) -> str:
    """The task topic a request names (the longest, so "a lost umbrella" wins over a topic inside it)."""
    text = prompt if isinstance(prompt, str) else next(m["content"] for m in prompt if m["role"] == "user")
    found = [topic for topic in INSTRUCTION_TOPICS if topic in text]
    if not found:
        raise ValueError(f"no topic of the instructions task in the request {text[:120]!r}")
    return max(found, key=len)


def on_topic(record: dict) -> bool:
    """Whether an evaluation record's answer names its request's topic."""
    return bool(PATTERNS[request_topic(record["prompt"])].search(answer_text(record)))


def relevance_by_problem(records: list[dict], metric: str) -> dict[str, dict[str, float]]:
    """problem id -> {"on_topic": 1.0 if the answer names its topic, "followed_on_topic": the reward `metric` of an
    answer on topic, 0 off it}, each the mean over the problem's samples."""
    scores: dict[str, dict[str, list[float]]] = {}
    for record in records:
        hit = float(on_topic(record))
        problem = scores.setdefault(record["problem_id"], {"on_topic": [], "followed_on_topic": []})
        problem["on_topic"].append(hit)
        problem["followed_on_topic"].append(hit * record["rewards"][metric])
    return {pid: {name: sum(v) / len(v) for name, v in measures.items()} for pid, measures in scores.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", nargs="+", help="evaluation record files (.jsonl) of the instructions task")
    parser.add_argument("--metric", default="constraints_followed", help="the reward the answers were scored with")
    args = parser.parse_args(argv)
    for path in args.records:
        scores = relevance_by_problem(read_records(path), args.metric).values()
        means = {name: sum(s[name] for s in scores) / len(scores) for name in ("on_topic", "followed_on_topic")}
        print(f"{path}\ton topic {means['on_topic']:.3f}\t{args.metric} on topic {means['followed_on_topic']:.3f}")


if __name__ == "__main__":
    main()
