"""Which constraints did training win or lose? Per constraint kind of the instructions task: how many of the given
constraints the answers of each evaluation record file follow, with their truncation and median length.

    python bench/constraint_kinds.py --recipe recipes/smollm2-135m-instruct/instructions_cpu.yaml \
        RUN/eval_before.jsonl RUN/eval_after.jsonl [OTHER_RUN/eval_after.jsonl ...]

Each file is one column group of the printed table (tab-separated); a file's records name their problems by id, so
the files must come from evaluations of the same test split (the recipe's task settings make it again).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import yaml
from answer_position import _test_problems

from trl_guided.constraints import check, parse_specs
from trl_guided.evaluate import read_records


def problem_specs(problems) -> list[list[dict]]:
    """The constraints of each test problem, in split order (a problem id starts with its index)."""
    return [parse_specs(value) for value in problems["constraints"]]


def answer_text(record: dict) -> str:
    completion = record["completion"]
    return completion if isinstance(completion, str) else completion[-1]["content"]


def tally(records: list[dict], specs: list[list[dict]]) -> dict:
    """followed / given per kind, the truncated share and the median answer length in words."""
    followed, given = defaultdict(int), defaultdict(int)
    for record in records:
        text = answer_text(record)
        for spec in specs[int(record["problem_id"].split("-", 1)[0])]:
            given[spec["kind"]] += 1
            followed[spec["kind"]] += check(spec, text)
    lengths = sorted(len(answer_text(r).split()) for r in records)
    return {
        "kinds": {kind: [followed[kind], given[kind]] for kind in sorted(given)},
        "truncated": sum(bool(r["truncated"]) for r in records) / len(records),
        "median_words": lengths[len(lengths) // 2],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", nargs="+", help="evaluation record files (.jsonl) of the same test split")
    parser.add_argument("--recipe", required=True, help="the recipe the records were evaluated with")
    args = parser.parse_args(argv)
    recipe = yaml.safe_load(Path(args.recipe).read_text())
    if recipe.get("task") != "instructions":
        parser.error(f"{args.recipe}: task {recipe.get('task')!r}; constraint kinds exist for task: instructions")
    specs = problem_specs(_test_problems(recipe))
    tallies = {path: tally(read_records(path), specs) for path in args.records}
    kinds = sorted({kind for t in tallies.values() for kind in t["kinds"]})
    print("records", "truncated", "median words", *kinds, sep="\t")
    for path, t in tallies.items():
        cells = [f"{t['kinds'][k][0]}/{t['kinds'][k][1]}" if k in t["kinds"] else "-" for k in kinds]
        print(path, f"{t['truncated']:.2f}", t["median_words"], *cells, sep="\t")


if __name__ == "__main__":
    main()
