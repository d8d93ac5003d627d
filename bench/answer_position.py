"""Where does the answer fall in a guided rollout? A diagnostic for the study (bench/learning.py).

For each completion of an evaluation record file (by default the starting model's answers in the study), it draws
prefix and guidance lengths as the study recipe does, cuts the prefix with a branch point (`punctuation`: at the last
mark; `entropy`: before the token of highest entropy under the starting model, at temperature 1), and reports how
often the answer's first token lands in the shared prefix (decided before the branches split), in the guidance
window (trained in the `guidance` scope) or in the postfix (not trained there).

    python bench/answer_position.py [--branch-point entropy] [--records bench/learning_runs/before/eval.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent


def answer_start(text: str) -> int | None:
    """Character offset of the answer: the number after the first '=', else the last number written."""
    equals = re.search(r"=\s*(-?\d+)", text)
    if equals:
        return equals.start(1)
    numbers = list(re.finditer(r"-?\d+", text))
    return numbers[-1].start() if numbers else None


def token_at(tokenizer, ids: list[int], offset: int) -> int:
    """Index of the token that contains character `offset` of the decoded `ids`."""
    return next(i for i in range(len(ids)) if len(tokenizer.decode(ids[: i + 1])) > offset)


def _entropy_scorer(recipe: dict, tokenizer):
    """problem id, completion ids -> the starting model's entropy (temperature 1) at each completion token."""
    import torch
    from transformers import AutoModelForCausalLM

    from trl_guided.data import load_task
    from trl_guided.evaluate import prompt_token_ids
    from trl_guided.models import resolve_model_path
    from trl_guided.train import TaskArguments, task_options

    fields = {k: v for k, v in recipe.items() if k in TaskArguments.__dataclass_fields__ and k != "reward_funcs"}
    problems = load_task(recipe["task"], "test", **task_options(TaskArguments(**fields)))
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(recipe["model_name_or_path"]))
    model.eval()

    def entropies(problem_id: str, ids: list[int]) -> list[float]:
        prompt = prompt_token_ids(tokenizer, problems[int(problem_id.split("-")[0])]["prompt"])
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()
        logp = torch.log_softmax(logits / recipe.get("temperature", 1.0), dim=-1)
        return (-(logp.exp() * logp).sum(-1)).tolist()

    return entropies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", default=str(BENCH / "learning_runs" / "before" / "eval.jsonl"))
    parser.add_argument("--recipe", default=str(BENCH / "learning.yaml"))
    parser.add_argument("--draws", type=int, default=4, help="Prefix/guidance draws per completion.")
    parser.add_argument("--branch-point", choices=["punctuation", "entropy"], default="punctuation")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from trl_guided.guidance import BranchRule, TokenSignals
    from trl_guided.models import resolve_model_path

    recipe = yaml.safe_load(Path(args.recipe).read_text())
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(recipe["model_name_or_path"]))
    rule = BranchRule(args.branch_point)
    entropies = _entropy_scorer(recipe, tokenizer) if args.branch_point == "entropy" else None
    prefix_range = (recipe.get("prefix_min_tokens", 2), recipe.get("prefix_max_tokens", 12))
    guide_range = (recipe.get("min_guide_tokens", 2), recipe.get("max_guide_tokens", 8))
    rng = random.Random(0)
    counts = {"prefix": 0, "guidance": 0, "postfix": 0}
    empty = without_answer = 0
    records = [json.loads(line) for line in Path(args.records).read_text().splitlines() if line.strip()]
    for record in records:
        offset = answer_start(record["completion"])
        if offset is None:
            without_answer += 1
            continue
        ids = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        answer = token_at(tokenizer, ids, offset)
        signals = TokenSignals(entropies=entropies(record["problem_id"], ids)) if entropies else None
        for _ in range(args.draws):
            keep = rule.cut(ids[: rng.randint(*prefix_range)], tokenizer, signals=signals)
            guide = rng.randint(*guide_range)
            empty += keep == 0
            where = "prefix" if answer < keep else "guidance" if answer < keep + guide else "postfix"
            counts[where] += 1
    total = sum(counts.values())
    report = {
        "branch_point": args.branch_point,
        "records": str(args.records),
        "completions": len(records),
        "without_answer": without_answer,
        "draws": total,
        "answer_in": {where: round(count / total, 3) for where, count in counts.items()},
        "empty_prefix": round(empty / total, 3),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
