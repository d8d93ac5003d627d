"""Where is the reward decided in a guided rollout? A diagnostic for the study (bench/learning.py).

For each completion of an evaluation record file (by default the starting model's answers in the study), it draws
prefix and guidance lengths as the recipe does, cuts the prefix with each branch point (`punctuation`: at the last
mark; `entropy`: before the token of highest entropy under the starting model, at the recipe's temperature;
`low_prob`: before the sampled token of lowest probability), and reports how often the deciding token lands in the
shared prefix (decided before the branches split), in the guidance window (trained in the `guidance` scope) or in the
postfix (not trained there).

The deciding token: for arithmetic, the answer's first token (the number on a final `Answer:` line, else the number
after the first '=', else the last number). For the instructions task, one per constraint: the token from which the
constraint's verdict on the growing answer no longer changes (`constraint_decisions`).

    python bench/answer_position.py [--records bench/learning_runs/before/eval.jsonl] [--recipe bench/learning.yaml]
        [--branch-point punctuation entropy low_prob] [--output result.json]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_guided.constraints import check, parse_specs, words
from trl_guided.data import load_task
from trl_guided.evaluate import prompt_token_ids, read_records
from trl_guided.guidance import BranchRule, TokenSignals
from trl_guided.locate import locate_model
from trl_guided.tasks import TaskArguments, task_options

BENCH = Path(__file__).resolve().parent
# Constraints an answer keeps unless a token breaks them (a word to avoid, lowercase, ...): they hold before the
# first word. The others (a keyword, a word count to reach, a closing phrase, ...) are met by some token.
KEPT_KINDS = {"avoid_word", "lowercase", "no_commas", "max_words", "max_sentences"}


def answer_start(text: str) -> int | None:
    """Character offset of the answer: the number on the last `Answer:` line, else the number after the first '=',
    else the last number written."""
    answer_lines = list(re.finditer(r"^[ \t*#]*answer[ \t*]*:[^\d\n-]*(-?\d+)", text, re.I | re.M))
    if answer_lines:
        return answer_lines[-1].start(1)
    equals = re.search(r"=\s*(-?\d+)", text)
    if equals:
        return equals.start(1)
    numbers = list(re.finditer(r"-?\d+", text))
    return numbers[-1].start() if numbers else None


def constraint_decisions(spec: dict, prefixes: list[str]) -> tuple[int | None, str]:
    """(token index, how) at which `spec` is decided in an answer whose token-by-token prefixes are `prefixes`: the
    token after which the verdict stays at its final value. A kept constraint (KEPT_KINDS) that no token breaks is
    `kept` (no position: every token keeps it); a constraint no token meets is `never_met` (no position: decided by
    where the answer stops)."""
    default = spec["kind"] in KEPT_KINDS
    verdicts = [check(spec, text) if words(text) else default for text in prefixes]
    final = verdicts[-1] if verdicts else default
    changes = [i for i in range(len(verdicts)) if verdicts[i] != (verdicts[i - 1] if i else default)]
    if not changes:
        return None, "kept" if final else "never_met"
    return changes[-1], "passed" if final else "failed"


def token_at(tokenizer, ids: list[int], offset: int) -> int:
    """Index of the token that contains character `offset` of the decoded `ids`."""
    return next(i for i in range(len(ids)) if len(tokenizer.decode(ids[: i + 1])) > offset)


def _test_problems(recipe: dict):
    fields = {k: v for k, v in recipe.items() if k in TaskArguments.__dataclass_fields__ and k != "reward_funcs"}
    return load_task(recipe["task"], "test", **task_options(TaskArguments(**fields)))


def _signal_scorer(recipe: dict, tokenizer, problems):
    """problem id, completion ids -> the starting model's TokenSignals (entropy and log-prob of each completion
    token, at the recipe's temperature)."""
    model = AutoModelForCausalLM.from_pretrained(locate_model(recipe["model_name_or_path"]).path)
    model.eval()

    def signals(problem_id: str, ids: list[int]) -> TokenSignals:
        prompt = prompt_token_ids(tokenizer, problems[int(problem_id.split("-")[0])]["prompt"])
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()
        logp = torch.log_softmax(logits / recipe.get("temperature", 1.0), dim=-1)
        entropies = (-(logp.exp() * logp).sum(-1)).tolist()
        return TokenSignals(entropies=entropies, logprobs=logp.gather(-1, torch.tensor(ids)[:, None])[:, 0].tolist())

    return signals


def deciding_tokens(record: dict, ids: list[int], tokenizer, problems) -> tuple[list[int], dict[str, int]]:
    """The completion's deciding token indices and counts of how each was decided (see the module docstring)."""
    if problems is None or "constraints" not in problems.column_names:
        offset = answer_start(record["completion"])
        if offset is None:
            return [], {"without_answer": 1}
        return [token_at(tokenizer, ids, offset)], {"answer": 1}
    specs = parse_specs(problems[int(record["problem_id"].split("-")[0])]["constraints"])
    prefixes = [tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    positions, how = [], {}
    for spec in specs:
        position, kind = constraint_decisions(spec, prefixes)
        how[kind] = how.get(kind, 0) + 1
        if position is not None:
            positions.append(position)
    return positions, how


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", default=str(BENCH / "learning_runs" / "before" / "eval.jsonl"))
    parser.add_argument("--recipe", default=str(BENCH / "learning.yaml"))
    parser.add_argument("--draws", type=int, default=4, help="Prefix/guidance draws per completion.")
    parser.add_argument(
        "--branch-point", nargs="+", choices=["punctuation", "entropy", "low_prob"], default=["punctuation"]
    )
    parser.add_argument("--output", help="also write the result JSON here")
    args = parser.parse_args()

    recipe = yaml.safe_load(Path(args.recipe).read_text())
    tokenizer = AutoTokenizer.from_pretrained(locate_model(recipe["model_name_or_path"]).path)
    needs_signals = any(BranchRule(name).needs_signals for name in args.branch_point)
    problems = _test_problems(recipe) if needs_signals or recipe["task"] == "instructions" else None
    scorer = _signal_scorer(recipe, tokenizer, problems) if needs_signals else None
    prefix_range = (recipe.get("prefix_min_tokens", 2), recipe.get("prefix_max_tokens", 12))
    guide_range = (recipe.get("min_guide_tokens", 2), recipe.get("max_guide_tokens", 8))
    records = read_records(args.records)
    counts = {name: {"prefix": 0, "guidance": 0, "postfix": 0} for name in args.branch_point}
    empty = dict.fromkeys(args.branch_point, 0)
    decided_how: dict[str, int] = {}
    positions_seen, lengths, with_positions = [], [], 0
    for record in records:
        ids = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        positions, how = deciding_tokens(record, ids, tokenizer, problems)
        lengths.append(len(ids))
        for kind, count in how.items():
            decided_how[kind] = decided_how.get(kind, 0) + count
        if not positions:
            continue
        positions_seen += positions
        with_positions += 1
        signals = scorer(record["problem_id"], ids) if scorer else None
        for name in args.branch_point:
            rule, rng = BranchRule(name), random.Random(0)  # the same draws for every branch point
            for _ in range(args.draws):
                keep = rule.cut(ids[: rng.randint(*prefix_range)], tokenizer, signals=signals)
                guide = rng.randint(*guide_range)
                empty[name] += keep == 0
                for position in positions:
                    where = "prefix" if position < keep else "guidance" if position < keep + guide else "postfix"
                    counts[name][where] += 1
    report = {
        "records": str(args.records),
        "recipe": str(args.recipe),
        "completions": len(records),
        "deciding_tokens": len(positions_seen),
        "decided": decided_how,
        "median_deciding_token": sorted(positions_seen)[len(positions_seen) // 2] if positions_seen else None,
        "median_completion_tokens": sorted(lengths)[len(lengths) // 2] if lengths else None,
        "prefix_tokens": list(prefix_range),
        "guide_tokens": list(guide_range),
        "draws_per_completion": args.draws,
        "by_branch_point": {
            name: {
                "deciding_token_in": {
                    where: round(count / max(len(positions_seen) * args.draws, 1), 3)
                    for where, count in counts[name].items()
                },
                "empty_prefix": round(empty[name] / max(args.draws * with_positions, 1), 3),
            }
            for name in args.branch_point
        },
    }
    print(json.dumps(report, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
