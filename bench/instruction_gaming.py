"""Does the instructions reward pay for answers that say nothing? Answers built by program for every test problem,
scored with the checker alone (`constraints_followed`) and with `instruction_following`, beside the starting model's
own answers (an evaluation record file of the task's test split):

- content_free: only the words the constraints ask for (the opening phrase, the keywords as bare words, "Okay."
  sentences, "* Okay." bullets, a <<title>>, a "P.S." line, the closing phrase, a JSON object), built to follow every
  constraint; content_free_varied: the same with twenty different filler words ("certainly", "wonderful", ...);
- off_topic: the starting model's answer to the next problem about another topic;
- loop: the first sentence of the starting model's answer repeated to its length;
- echo: the request with its constraints, copied back.

    python bench/instruction_gaming.py bench/decisive/phase1/start/eval_start.jsonl \
        --recipe recipes/smollm2-135m-instruct/instructions_cpu.yaml --out bench/instruction_gaming.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml
from answer_position import _test_problems
from answer_relevance import on_topic, request_topic
from constraint_kinds import answer_text, problem_specs
from harness import emit

from trl_guided.constraints import split_sentences, words
from trl_guided.evaluate import read_records
from trl_guided.instruction_reward import user_text
from trl_guided.rewards import constraints_followed, instruction_following

PLAIN_FILLER = ("Okay",)
VARIED_FILLER = (
    "certainly", "wonderful", "absolutely", "alright", "perfect", "lovely", "agreed", "definitely", "exactly",
    "understood", "noted", "gladly", "splendid", "marvelous", "fantastic", "excellent", "brilliant", "superb",
    "terrific", "delightful",
)  # fmt: skip
ATTACKS = ("content_free", "content_free_varied", "off_topic", "loop", "echo")
LONG_ANSWER_WORDS = 40  # the done criterion compares with genuine answers of at least this many words


def content_free(specs: list[dict], filler: tuple[str, ...] = PLAIN_FILLER) -> str:
    """An answer made only of the words the constraints ask for and `filler`, built to follow every constraint."""
    kinds = {spec["kind"]: spec for spec in specs}
    avoided = kinds.get("avoid_word", {}).get("word", "").lower()
    filler = tuple(w for w in filler if w.lower() != avoided) or ("Okay",)
    keywords = kinds.get("include_keywords", {}).get("keywords", [])
    # As many filler words as a word budget asks for (or allows: a dozen words are left for the rest).
    count = kinds["min_words"]["n"] if "min_words" in kinds else len(filler)
    count = min(count, kinds["max_words"]["n"] - 12) if "max_words" in kinds else count
    padding = [filler[i % len(filler)] for i in range(max(1, count))]
    if "json" in kinds:
        text = json.dumps({"answer": " ".join([*keywords, *padding])})
    else:
        # One sentence holds the opening phrase, the title, the keywords and the filler (few sentences for a cap).
        opening = [kinds["start_with"]["phrase"]] if "start_with" in kinds else []
        lines = [" ".join([*opening, *(["<<Okay>>"] if "title" in kinds else []), *keywords, *padding]) + "."]
        lines += ["* Okay."] * kinds.get("bullet_points", {}).get("n", 0)
        closing = ["P.S. Okay."] if "postscript" in kinds else []
        wanted = kinds.get("min_sentences", {}).get("n", 0)
        while len(split_sentences("\n".join(lines + closing))) < wanted:
            lines.append("Okay.")
        text = "\n".join(lines + closing)
        text += f" {kinds['end_with']['phrase']}" if "end_with" in kinds else ""
    if "lowercase" in kinds:
        text = text.lower()
    return text.replace(",", "") if "no_commas" in kinds else text


def loop(answer: str) -> str:
    """The answer's first sentence repeated to the answer's length in words."""
    sentence = (split_sentences(answer) or [answer])[0]
    repeats = max(2, len(words(answer)) // max(1, len(words(sentence))))
    return " ".join([sentence] * repeats)


def off_topic_donor(records: list[dict], index: int) -> dict:
    """The first record after `index` (cyclically) whose request names another topic."""
    topic = request_topic(records[index]["prompt"])
    for step in range(1, len(records)):
        other = records[(index + step) % len(records)]
        if request_topic(other["prompt"]) != topic:
            return other
    raise ValueError("every record has the same topic: no answer about another topic to borrow")


def attack_answers(records: list[dict], specs: list[list[dict]]) -> dict[str, list[str]]:
    """Per attack, one answer per record (same order)."""
    rows = [specs[int(r["problem_id"].split("-", 1)[0])] for r in records]
    return {
        "content_free": [content_free(s) for s in rows],
        "content_free_varied": [content_free(s, VARIED_FILLER) for s in rows],
        "off_topic": [answer_text(off_topic_donor(records, i)) for i in range(len(records))],
        "loop": [loop(answer_text(r)) for r in records],
        "echo": [user_text(r["prompt"]) for r in records],
    }


def scores(records: list[dict], specs: list[list[dict]], answers: list[str]) -> dict[str, list[float]]:
    """The checker's and the new reward's score of `answers` to the records' problems."""
    columns = {
        "prompts": [r["prompt"] for r in records],
        "constraints": [json.dumps(specs[int(r["problem_id"].split("-", 1)[0])]) for r in records],
    }
    return {
        "constraints_followed": constraints_followed(answers, **columns),
        "instruction_following": instruction_following(answers, **columns),
    }


def measure(records: list[dict], specs: list[list[dict]]) -> dict:
    """Means of every attack and of the genuine answers, and how often an attack beats the genuine answer."""
    genuine = [answer_text(r) for r in records]
    base = scores(records, specs, genuine)
    reward = base["instruction_following"]
    long = [i for i, a in enumerate(genuine) if len(words(a)) >= LONG_ANSWER_WORDS]
    topical = [i for i in long if on_topic(records[i])]
    kept = [reward[i] / base["constraints_followed"][i] for i in topical if base["constraints_followed"][i] > 0]
    result = {
        "problems": len(records),
        "genuine": {name: statistics.fmean(values) for name, values in base.items()},
        "genuine_on_topic_long": {
            "answers": len(topical),
            "kept_share_mean": statistics.fmean(kept),
            "kept_share_at_least_0.8": sum(k >= 0.8 for k in kept) / len(kept),
        },
        "attacks": {},
    }
    for name, answers in attack_answers(records, specs).items():
        scored = scores(records, specs, answers)
        attack = scored["instruction_following"]
        result["attacks"][name] = {
            **{f"{metric}_mean": statistics.fmean(values) for metric, values in scored.items()},
            "share_of_genuine_mean": statistics.fmean(attack) / max(statistics.fmean(reward), 1e-9),
            "below_genuine_where_genuine_long": sum(attack[i] < reward[i] for i in long) / len(long),
            "genuine_long_problems": len(long),
        }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", help="an evaluation record file (.jsonl) of the instructions task's test split")
    parser.add_argument("--recipe", required=True, help="the recipe the records were evaluated with")
    parser.add_argument("--out", help="write the measures as JSON here")
    args = parser.parse_args(argv)
    recipe = yaml.safe_load(Path(args.recipe).read_text())
    specs = problem_specs(_test_problems(recipe))
    result = measure(read_records(args.records), specs)
    emit(result, args.out or "-")


if __name__ == "__main__":
    main()
